"""Structured output by constrained decoding: each sequence with a grammar (JSON object, JSON Schema) holds an
xgrammar matcher, advanced on every token it accepts; per step, one int32 bitmask [B, ceil(V/32)] of the tokens
each constrained sampling row may take is filled in one batched call and applied to those rows' logits in the
sampler (`sampler.apply_token_bitmask`); other rows are left alone.

xgrammar over llguidance: both compile small schemas in milliseconds, but xgrammar fills a batch's masks several
times faster (its per-grammar token-mask cache), which is the per-step cost (docs/benchmarks.md, bench_grammar).

JSON is generated compact (`, ` and `: ` separators, no free whitespace): a grammar that allows any whitespace
lets a weak model pad forever and hit max_tokens with invalid JSON.

Failover: a resumed request's resume tokens are replayed through a fresh matcher, so it continues in the same
grammar state; a resume the grammar refuses is an EngineError.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Sequence as Seq

import torch

from replicas.engine.protocol import EngineError, StructuredOutput

_CACHE_SIZE = 256


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer (LRU-cached by spec; thread-safe, so the replica compiles
    off the engine loop) and makes matchers."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Seq[int], max_threads: int = 2):
        import xgrammar as xgr

        self._xgr = xgr
        # The bitmask spans the model's vocabulary (the embedding may be padded beyond the tokenizer).
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_token_ids))
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._batch = xgr.BatchGrammarMatcher(max_threads=max_threads)
        self._cache: OrderedDict[StructuredOutput, object] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutput):
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        try:
            if spec.kind == "json_object":
                compiled = self._compiler.compile_json_schema(
                    json.dumps({"type": "object"}), any_whitespace=False, strict_mode=False)
            else:
                ebnf = str(self._xgr.Grammar.from_json_schema(spec.json_schema, any_whitespace=False))
                compiled = self._compiler.compile_grammar(json_string_chars_fixed(ebnf))
        except Exception as e:  # noqa: BLE001 - the library's message names what it refused
            raise EngineError(f"the JSON schema cannot be compiled to a grammar: {e}") from None
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutput, replay: Seq[int] = ()) -> "Matcher":
        m = Matcher(self._xgr.GrammarMatcher(self.compile(spec)))
        for tok in replay:
            if not m.accept(tok):
                raise EngineError("resume tokens do not follow the request's response format")
        return m

    def bitmask(self, matchers: Seq["Matcher | None"]) -> tuple[list[int], torch.Tensor]:
        """(rows with a live grammar, int32 [B, ceil(V/32)] bitmask on the CPU whose listed rows hold what each
        allows; the other rows allow everything) for a step's B sampling rows."""
        rows = [i for i, m in enumerate(matchers) if m is not None and not m.terminated]
        mask = torch.full((len(matchers), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        if len(rows) == 1:
            matchers[rows[0]].m.fill_next_token_bitmask(mask, rows[0])
        elif rows:
            self._batch.batch_fill_next_token_bitmask([matchers[i].m for i in rows], mask, rows)
        return rows, mask


# xgrammar writes a string with minLength/maxLength as `"` chars{m,n} `"` whose character class lets raw control
# characters (U+0000-U+001F) through, which JSON forbids unescaped (its plain strings exclude them), and UTF-8
# encoded surrogates, which decode to three U+FFFD each and so break maxLength.
_LOOSE_CHARS = '([^\\"\\\\\\r\\n])'
_JSON_CHARS = '([^\\0-\\x1f\\"\\\\\\r\\n\\uD800-\\uDFFF])'


def json_string_chars_fixed(ebnf: str) -> str:
    return ebnf.replace(_LOOSE_CHARS, _JSON_CHARS)


class Matcher:
    """One sequence's grammar state."""
    __slots__ = ("m",)

    def __init__(self, m):
        self.m = m

    def accept(self, token_id: int) -> bool:
        return bool(self.m.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and took its stop token: nothing more may follow."""
        return bool(self.m.is_terminated())
