"""The routing benchmark's model: random weights whose generated text round-trips through the chat template.

A trained chat model's answer, sent back as text in the next turn's history, re-tokenizes to the tokens it
generated (mostly), so the next turn can reuse the KV of the whole previous turn, answer included. The
tiny BPE model's random token strings do not: decoding and re-encoding merges them differently, which caps
any router's hit rate at the previous *prompt*. This model keeps that property of a real one with a
word-level tokenizer (one token per word of the workload vocabulary, split on whitespace, decoded
space-joined) and output rows that never pick a special token. Sizes: a few times the tiny model, so that
prefill costs what it costs in production relative to the fixed per-request overheads.
"""
from __future__ import annotations

from pathlib import Path

from load_tests.tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_model
from load_tests.workloads import _VOCAB

# Words of the workload's system prompts and the chat template's roles, besides its vocabulary.
_EXTRA_WORDS = ("You are a private assistant conversation system user".split()
                + [f"{i}." for i in range(128)])


def build_word_tokenizer(words=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys([*(_VOCAB if words is None else words), *_EXTRA_WORDS]))
    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_bench_model(out_dir: str | Path, *, hidden: int = 256, layers: int = 4, num_heads: int = 4,
                      num_kv_heads: int = 2, seed: int = 0) -> Path:
    tok = build_word_tokenizer()
    return build_tiny_model(out_dir, hidden=hidden, layers=layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                            seed=seed, tokenizer=tok, silent_tokens=tuple(tok.convert_tokens_to_ids(SPECIAL_TOKENS)))
