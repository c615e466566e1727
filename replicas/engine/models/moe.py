"""Mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a replicated router picks the top-k experts of each
token; the experts' gated MLPs run on the tokens routed to them and their outputs are summed with the routing
weights. Qwen2-MoE adds a shared expert behind a sigmoid gate.

Tensor parallel: every rank holds every expert, with its intermediate dim split across ranks (w13 rows, w2
columns), so a rank's expert outputs are partial sums and the whole block ends in one all-reduce.

Two expert paths compute the same thing: the reference loops over the experts that received tokens (CPU), the
grouped path sorts the (token, expert) pairs by expert and runs two grouped GEMMs over all experts at once
(`torch.nn.functional.grouped_mm`; GPU by default: no host sync, so it captures into CUDA graphs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from replicas.engine import gemv
from replicas.engine.envs import SWITCHES
from replicas.engine.models.args import ModelArgs
from replicas.engine.models.layers import MergedColumnParallelLinear, TPInfo, _divide, _read

# LLMC_MOE_GROUPED (`envs`): True / False forces the grouped / reference expert path; None: grouped on CUDA.
_GROUPED: bool | None = SWITCHES.moe_grouped
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def activation(name: str):
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.silu


class FusedExperts(nn.Module):
    """All experts' weights as two 3-D parameters: w13 [E, 2 * I/tp, H] (gate rows, then up rows) and
    w2 [E, H, I/tp]. Checkpoint tensors are per expert; shard ids are (expert, 0 gate | 1 up | None down)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, tp: TPInfo):
        super().__init__()
        self.tp = tp
        self.num_experts = num_experts
        self.local = _divide(intermediate, tp.size)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.local, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, self.local), requires_grad=False)
        self.w13.weight_loader = self._load_w13
        self.w2.weight_loader = self._load_w2
        self.w13.shards = [(e, p) for e in range(num_experts) for p in (0, 1)]
        self.w2.shards = [(e, None) for e in range(num_experts)]

    def _load_w13(self, param, sl, shard_id) -> None:
        e, part = shard_id
        n = self.local
        param.data[e, part * n:(part + 1) * n].copy_(_read(sl, 0, self.tp.rank * n, n))

    def _load_w2(self, param, sl, shard_id) -> None:
        e, _ = shard_id
        n = self.local
        param.data[e].copy_(_read(sl, 1, self.tp.rank * n, n))


class SparseMoE(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPInfo):
        super().__init__()
        self.tp = tp
        self.top_k = args.num_experts_per_tok
        self.renormalize = args.norm_topk_prob
        self.act = activation(args.hidden_act)
        # Replicated router: every rank routes every token the same way.
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.gate.weight.requires_grad_(False)
        self.experts = FusedExperts(args.num_experts, args.hidden_size, args.moe_intermediate_size, tp)
        if args.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(args.hidden_size, args.shared_expert_intermediate_size, tp)
            self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)
            self.shared_expert_gate.weight.requires_grad_(False)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k weights [T, k] in x's dtype, expert ids [T, k]): softmax over all experts in fp32, top-k,
        renormalised to sum to 1 where the family does (Mixtral always, Qwen per norm_topk_prob)."""
        probs = torch.softmax(F.linear(x, self.gate.weight).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        grouped = x.is_cuda if _GROUPED is None else _GROUPED
        out = (experts_grouped if grouped and _grouped_mm is not None else experts_reference)(
            x, self.experts.w13, self.experts.w2, weights, ids, self.act)
        if self.shared_expert is not None:
            gate = torch.sigmoid(F.linear(x, self.shared_expert_gate.weight))
            out = out + gate * self.shared_expert(x)  # partial sums too: reduced with the experts'
        return self.tp.all_reduce(out)


class SharedExpert(nn.Module):
    """A dense gated MLP whose output stays a per-rank partial sum (the MoE block reduces once)."""

    def __init__(self, hidden: int, intermediate: int, tp: TPInfo):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, False, tp)
        self.down_proj = _RowShard(intermediate, hidden, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class _RowShard(nn.Module):
    """A row-parallel linear without its all-reduce."""

    def __init__(self, in_features: int, out_features: int, tp: TPInfo):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, _divide(in_features, tp.size)), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param, sl, shard_id=None) -> None:
        n = param.shape[1]
        param.data.copy_(_read(sl, 1, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv.linear(x, self.weight)


def experts_reference(x, w13, w2, weights, ids, act) -> torch.Tensor:
    """Loop over the experts that received tokens, in expert order (transformers' order of summation)."""
    out = torch.zeros_like(x)
    flat = ids.flatten()
    for e in torch.unique(flat).tolist():
        pair = (flat == e).nonzero().squeeze(1)
        tok = pair // ids.shape[1]
        gate, up = F.linear(x[tok], w13[e]).chunk(2, -1)
        y = F.linear(act(gate) * up, w2[e]) * weights.flatten()[pair].unsqueeze(1)
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def experts_grouped(x, w13, w2, weights, ids, act) -> torch.Tensor:
    """Sort the T x k (token, expert) pairs by expert; one grouped GEMM for gate/up, one for down, over
    contiguous row groups per expert (`offs`: cumulative rows); then scatter-add back to the tokens."""
    num_experts, k = w13.shape[0], ids.shape[1]
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    tok = order // k
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.index_add_(0, flat.to(torch.int32), torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = _grouped_mm(x.index_select(0, tok), w13.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, -1)
    y = _grouped_mm((act(gate) * up).contiguous(), w2.transpose(1, 2), offs=offs)
    y = y * weights.flatten().index_select(0, order).unsqueeze(1)
    return torch.zeros_like(x).index_add_(0, tok, y.to(x.dtype))
