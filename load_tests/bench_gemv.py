"""Triton GEMV (`replicas.engine.kernels.gemv`) against cuBLAS (F.linear) on the Llama-3-8B decode shapes, on GPU.

    python3 -m load_tests.bench_gemv --out $OUT/gemv.json [--quick]

Each figure is device time per call inside a CUDA graph that cycles over enough weight copies (> 4x L2) that
every call streams its weights from HBM, as decode does. GB/s counts weight bytes read. Sections:
- `shapes`: M=1 for qkv/o/gate_up/down/lm_head, cuBLAS and a sweep of (BLOCK_N, BLOCK_K, num_warps);
- `fused`: qkv with residual-add+RMSNorm prologue, gate_up with norm prologue and SiLU-mul epilogue, against
  cuBLAS plus the separate Triton norm / SiLU-mul kernels they replace;
- `layer`: the four projections of a decoder layer (no attention) over 8 layers of weights, both ways;
- `rows`: M = 2, 4, 8, 16 (tl.dot path) against cuBLAS.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

H, I, QKV, V = 4096, 14336, 6144, 128256  # noqa: E741 - Llama's hidden and intermediate sizes
SHAPES = {"qkv": (QKV, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I), "lm_head": (V, H)}
CONFIGS_1 = [(2, 1024, 2), (2, 2048, 4), (2, 4096, 8), (4, 4096, 8), (4, 4096, 16), (8, 4096, 16), (4, 512, 2),
             (4, 1024, 4), (4, 2048, 8), (4, 1024, 2), (4, 2048, 4),
             (8, 512, 4), (8, 1024, 4), (8, 512, 2), (8, 1024, 8), (8, 2048, 8),
             (16, 256, 4), (16, 512, 4), (16, 512, 8), (16, 1024, 8),
             (32, 256, 8), (32, 256, 4), (32, 512, 8)]
CONFIGS_DOT = [(16, 128, 4), (16, 256, 4), (16, 512, 4), (32, 128, 4), (32, 256, 4), (32, 256, 8), (64, 128, 4)]


def log(*a):
    print(*a, flush=True)


def copies_for(nbytes: int, l2: int) -> int:
    return max(2, math.ceil(4 * l2 / nbytes))


def graph_time_us(fns, reps: int = 3) -> float:
    """Device µs per call of the functions, called round-robin in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    calls = max(len(fns), 40)
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) * 1000 / calls)
    del g
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gemv.json")
    ap.add_argument("--sections", default="shapes,fused,layer,rows")
    ap.add_argument("--configs-out", help="write the best M=1 config per (N, K) here (LLMC_GEMV_CONFIGS format)")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    from replicas.engine.kernels import fused_ops
    from replicas.engine.kernels.gemv import gemv, norm_linear
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = props.L2_cache_size
    dt = torch.bfloat16
    res = {"device": props.name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    import triton
    res["triton"] = triton.__version__
    torch.manual_seed(0)

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    x1 = torch.randn(1, H, device=dev, dtype=dt)
    xi = torch.randn(1, I, device=dev, dtype=dt)

    if "shapes" in sections:
        res["shapes"] = {}
        for name, (n, k) in SHAPES.items():
            nbytes = n * k * 2
            ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies_for(nbytes, l2))]
            x = xi if k == I else x1
            ref = F.linear(x, ws[0]).float()
            row = {"N": n, "K": k, "MB": round(nbytes / 1e6, 1)}
            us = graph_time_us([lambda w=w: F.linear(x, w) for w in ws])
            row["cublas_us"] = round(us, 2)
            row["cublas_GBps"] = round(nbytes / us / 1e3, 1)
            sweep = {}
            for cfg in CONFIGS_1:
                try:
                    y = gemv(x, ws[0], config=cfg).float()
                    err = ((y - ref).norm() / ref.norm()).item()
                    us = graph_time_us([lambda w=w: gemv(x, w, config=cfg) for w in ws])
                    sweep[str(cfg)] = {"us": round(us, 2), "GBps": round(nbytes / us / 1e3, 1), "rel_err": err}
                except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
                    sweep[str(cfg)] = {"error": repr(e)[:200]}
            row["triton"] = sweep
            ok = {c: v for c, v in sweep.items() if "us" in v}
            best = min(ok, key=lambda c: ok[c]["us"])
            row["best"] = best
            row["best_us"] = ok[best]["us"]
            row["best_GBps"] = ok[best]["GBps"]
            row["best_vs_cublas"] = round(ok[best]["us"] / row["cublas_us"], 3)
            log(name, json.dumps({k: v for k, v in row.items() if k != "triton"}))
            res["shapes"][name] = row
            del ws
            torch.cuda.empty_cache()
            save()

    eps = 1e-5
    if "fused" in sections:
        res["fused"] = {}
        nw = torch.randn(H, device=dev, dtype=dt)
        r1 = torch.randn(1, H, device=dev, dtype=dt)
        for name, silu in (("qkv", False), ("gate_up", True)):
            n, k = SHAPES[name]
            nbytes = n * k * 2
            ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies_for(nbytes, l2))]

            def unfused(w):
                h, _ = fused_ops.add_rms_norm(x1, r1, nw, eps)
                y = F.linear(h, w)
                return fused_ops.silu_and_mul(y) if silu else y
            ref = unfused(ws[0]).float()
            row = {"unfused_us": round(graph_time_us([lambda w=w: unfused(w) for w in ws]), 2)}
            cfgs = CONFIGS_1 if not silu else [c for c in CONFIGS_1 if c[0] * c[1] // (32 * c[2]) <= 64]
            sweep = {}
            for cfg in cfgs:
                try:
                    y, rr = norm_linear(x1, r1, nw, eps, ws[0], silu=silu, config=cfg)
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    assert torch.equal(rr, x1 + r1)
                    us = graph_time_us([lambda w=w: norm_linear(x1, r1, nw, eps, w, silu=silu, config=cfg)
                                        for w in ws])
                    sweep[str(cfg)] = {"us": round(us, 2), "GBps": round(nbytes / us / 1e3, 1), "rel_err": err}
                except Exception as e:  # noqa: BLE001
                    sweep[str(cfg)] = {"error": repr(e)[:200]}
            ok = {c: v for c, v in sweep.items() if "us" in v}
            best = min(ok, key=lambda c: ok[c]["us"])
            row.update(triton=sweep, best=best, best_us=ok[best]["us"],
                       best_vs_unfused=round(ok[best]["us"] / row["unfused_us"], 3))
            log(name + "+norm" + ("+silu" if silu else ""),
                json.dumps({k: v for k, v in row.items() if k != "triton"}))
            res["fused"][name] = row
            del ws
            torch.cuda.empty_cache()
            save()

    if args.configs_out:  # the fused sweeps decide qkv and gate_up (the shapes decode runs them in)
        table = {f"{r['N']},{r['K']}": ast.literal_eval(r["best"]) for r in res.get("shapes", {}).values()}
        for name, row in res.get("fused", {}).items():
            n, k = SHAPES[name]
            table[f"{n // 2 if name == 'gate_up' else n},{k}"] = ast.literal_eval(row["best"])
        with open(args.configs_out, "w") as f:
            json.dump(table, f)
        res["configs"] = table
        log("configs", json.dumps(table))

    if "layer" in sections:
        from replicas.engine.kernels import gemv as gemv_mod
        if "configs" in res:
            gemv_mod.OVERRIDES.update({tuple(map(int, c.split(","))): tuple(v) for c, v in res["configs"].items()})
            gemv_mod.one_row_table.cache_clear()
        name = torch.cuda.get_device_name()
        config_for = lambda m, n, k: gemv_mod.config_for(m, n, k, name)  # noqa: E731
        layers = []
        for _ in range(8):
            layers.append({nm: torch.randn(*SHAPES[nm], device=dev, dtype=dt) * 0.02
                           for nm in ("qkv", "o", "gate_up", "down")} | {"n1": torch.randn(H, device=dev, dtype=dt),
                                                                           "n2": torch.randn(H, device=dev, dtype=dt)})
        res["layer"] = {}
        for m in (1, 4, 8):
            xs, rs = torch.randn(m, H, device=dev, dtype=dt), torch.randn(m, H, device=dev, dtype=dt)

            def cublas_layer(L):
                h, r = fused_ops.add_rms_norm(xs, rs, L["n1"], eps)
                qkv = F.linear(h, L["qkv"])
                o = F.linear(qkv[:, :H].contiguous(), L["o"])
                h, r = fused_ops.add_rms_norm(o, r, L["n2"], eps)
                return F.linear(fused_ops.silu_and_mul(F.linear(h, L["gate_up"])), L["down"])

            def gemv_layer(L):
                qkv, r = norm_linear(xs, rs, L["n1"], eps, L["qkv"])
                o = gemv(qkv[:, :H].contiguous(), L["o"])
                h, r = norm_linear(o, r, L["n2"], eps, L["gate_up"], silu=True)
                return gemv(h, L["down"])
            a = graph_time_us([lambda L=L: cublas_layer(L) for L in layers])
            b = graph_time_us([lambda L=L: gemv_layer(L) for L in layers])
            nbytes = sum(SHAPES[nm][0] * SHAPES[nm][1] * 2 for nm in ("qkv", "o", "gate_up", "down"))
            row = {"cublas_plus_triton_norm_silu_us": round(a, 2), "gemv_fused_us": round(b, 2),
                   "weight_MB": round(nbytes / 1e6, 1), "cublas_GBps": round(nbytes / a / 1e3, 1),
                   "gemv_GBps": round(nbytes / b / 1e3, 1), "gemv_vs_cublas": round(b / a, 3),
                   "configs": {nm: config_for(m, *SHAPES[nm]) for nm in SHAPES} | {
                       "gate_up(silu)": config_for(m, I, H)}}
            res["layer"][f"M{m}"] = row
            log(f"layer M={m}", json.dumps(row))
        del layers
        torch.cuda.empty_cache()
        save()

    if "rows" in sections:
        res["rows"] = {}
        for name in ("qkv", "o", "gate_up", "down"):
            n, k = SHAPES[name]
            nbytes = n * k * 2
            ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies_for(nbytes, l2))]
            for m in (2, 4, 8, 16):
                x = torch.randn(m, k, device=dev, dtype=dt)
                ref = F.linear(x, ws[0]).float()
                row = {"cublas_us": round(graph_time_us([lambda w=w: F.linear(x, w) for w in ws]), 2)}
                for cfg in CONFIGS_DOT:
                    try:
                        y = gemv(x, ws[0], config=cfg).float()
                        err = ((y - ref).norm() / ref.norm()).item()
                        assert err < 1e-2, err
                        row[str(cfg)] = round(graph_time_us([lambda w=w: gemv(x, w, config=cfg) for w in ws]), 2)
                    except Exception as e:  # noqa: BLE001
                        row[str(cfg)] = repr(e)[:120]
                tri = {c: v for c, v in row.items() if c.startswith("(") and isinstance(v, float)}
                best = min(tri, key=tri.get)
                row.update(best=best, best_vs_cublas=round(tri[best] / row["cublas_us"], 3))
                log(f"rows {name} M={m}", json.dumps(row))
                res["rows"][f"{name}/M{m}"] = row
            del ws
            torch.cuda.empty_cache()
            save()
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
