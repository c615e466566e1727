"""Prompt preparation in the router: the model's chat template, tokenization, token-id and context-length
checks, and the prompt's block hashes (for prefix routing; `replicas.engine.hashing` is the one implementation).

The router tokenizes so that it can hash blocks before choosing a replica; replicas take the ids as they are.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from replicas.engine.hashing import block_hashes, extra_key
from replicas.protocol import ReplicaInfo
from router.errors import bad_request


class PromptPreparer:
    def __init__(self, info: ReplicaInfo):
        """`info`: a replica's `model_info()`, what the router needs to know about the served model."""
        from transformers import AutoTokenizer

        self.info = info
        self.tokenizer = AutoTokenizer.from_pretrained(info.model_path)
        self.vocab_size = max(len(self.tokenizer), _config_vocab_size(info.model_path))
        self._extra = extra_key(info.model_id)

    # ------------------------------------------------------------ prompts -> ids

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    @functools.cached_property
    def tool_format(self) -> str:
        """The served family's tool-call format (router.tools)."""
        from router.tools import detect_format
        return detect_format(self.tokenizer)

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True, **template_kw) -> list[int]:
        if not self.tokenizer.chat_template:
            raise bad_request(f"model {self.info.model_id} has no chat template; use /v1/completions",
                              param="messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False, **template_kw)
        except Exception as e:  # templates raise on inputs they refuse (e.g. roles out of order)
            raise bad_request(f"chat template rejected the messages: {e}", param="messages") from None
        # The template already wrote any BOS it wants; adding special tokens again would double it.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion_prompts(self, prompt) -> list[list[int]]:
        """OpenAI's four prompt shapes -> one token-id list per prompt."""
        if isinstance(prompt, str):
            prompts = [self.encode(prompt)]
        elif not prompt:
            raise bad_request("prompt must not be empty", param="prompt")
        elif isinstance(prompt[0], str):
            prompts = [self.encode(p) for p in prompt]
        elif isinstance(prompt[0], int):
            prompts = [list(prompt)]
        else:
            prompts = [list(p) for p in prompt]
        for ids in prompts:
            self.check_ids(ids)
        return prompts

    def check_ids(self, ids: list[int]) -> None:
        if not ids:
            raise bad_request("prompt must contain at least one token", param="prompt")
        # An out-of-range id would crash every replica it is retried on: reject it here.
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise bad_request(f"token ids must lie in [0, {self.vocab_size})", param="prompt")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """Token ids a request names outside its prompt (logit_bias, stop_token_ids, /detokenize)."""
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"{param}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                              param=param)

    # ------------------------------------------------------------ limits and hashes

    def max_tokens(self, prompt_len: int, requested: int | None, default: int | None) -> int:
        """The generation budget; 400 when prompt + budget exceed the context. `default` None means
        "the rest of the context" (chat)."""
        limit = self.info.max_model_len
        room = limit - prompt_len
        if room <= 0:
            raise bad_request(f"the prompt is {prompt_len} tokens; this model's context is {limit} tokens",
                              param="messages" if default is None else "prompt", code="context_length_exceeded")
        want = requested if requested is not None else (room if default is None else min(default, room))
        if want > room:
            raise bad_request(f"prompt ({prompt_len} tokens) + max_tokens ({want}) exceed this model's context "
                              f"of {limit} tokens", param="max_tokens", code="context_length_exceeded")
        return want

    def block_hashes(self, ids: list[int], cache_salt: str | None = None) -> list[int]:
        extra = extra_key(self.info.model_id, cache_salt) if cache_salt else self._extra
        return block_hashes(ids, self.info.block_size, extra)


def _config_vocab_size(model_path: str) -> int:
    # The embedding table may be padded beyond the tokenizer; those ids are still valid input.
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size") or 0)
