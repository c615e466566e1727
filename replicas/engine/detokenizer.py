"""Streaming text out of token ids: incremental detokenization and stop strings.

IncrementalDetokenizer turns tokens into text as it becomes stable, using vLLM's prefix/read offsets:
decode a short window of earlier tokens plus the new ones and emit what the new ones added to the
window's text. The window keeps merges and leading spaces (SentencePiece "▁", byte-level "Ġ") right,
and a multi-byte UTF-8 character split across tokens is held back until complete (the window's text
ends in U+FFFD while it is not). Tokens are processed one at a time, so what has been emitted after
token t depends only on the tokens, never on how the engine grouped them into calls: replaying a
failover's resume tokens through a fresh detokenizer reproduces the original replica's state.

StopChecker applies stop strings to that text stream, holding back any tail that could still become
a stop string so that the client never sees text that is later cut.

Decoding goes straight to the Rust tokenizer (`backend_tokenizer.decode`): it equals
`tokenizer.decode` when clean_up_tokenization_spaces is off, as for every BPE tokenizer we serve.
"""
from __future__ import annotations

from typing import Sequence

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5  # prompt tokens decoded before the first output token, for its leading space


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self._backend = tokenizer.backend_tokenizer
        self._skip = skip_special_tokens
        # Only the window is kept: earlier tokens never influence new text.
        # The window starts at index 0 ("prefix offset"); tokens from read_offset on are not emitted yet.
        self._tokens: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._read_offset = len(self._tokens)
        self._prefix_text = self._decode(self._tokens)
        if self._prefix_text.endswith(_REPLACEMENT):
            # The prompt ends inside a character: its bytes would glue onto the output's, so decode
            # the output on its own instead.
            self._tokens, self._read_offset, self._prefix_text = [], 0, ""

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip)

    def append(self, token_ids: Sequence[int]) -> str:
        """Add output tokens; return the text that is newly stable (possibly "")."""
        out = []
        for t in token_ids:
            self._tokens.append(t)
            text = self._decode(self._tokens)
            if len(text) > len(self._prefix_text) and not text.endswith(_REPLACEMENT):
                out.append(text[len(self._prefix_text):])
                self._advance()
        return "".join(out)

    def _advance(self) -> None:
        # The old read point becomes the window start; drop what lies before it.
        del self._tokens[:self._read_offset]
        self._read_offset = len(self._tokens)
        self._prefix_text = self._decode(self._tokens)

    def flush(self) -> str:
        """At finish: everything held back (an incomplete character decodes as U+FFFD, as in decode())."""
        if len(self._tokens) == self._read_offset:
            return ""
        text = self._decode(self._tokens)[len(self._prefix_text):]
        self._advance()
        return text


class StopChecker:
    """Cuts a text stream at the first stop string. push() returns the text safe to send now."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False):
        self._stops = [s for s in stop if s]
        self._include = include_stop_str_in_output
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Feed new text; after a stop string appears, `stopped` is True and later pushes return ""."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        # Any stop string not seen before must end in `text`, and starts inside buf: the held tail is
        # the longest suffix that is a stop-string prefix, so no match reaches further back.
        # The stop string that completes first wins (ties: the longer one, which starts earlier), so
        # the cut does not depend on how the text was split into pushes.
        hit_end, hit_stop = len(buf) + 1, ""
        start = max(0, len(self._held) - max(len(s) for s in self._stops) + 1)
        for s in self._stops:
            i = buf.find(s, start)
            if i != -1 and (i + len(s) < hit_end or (i + len(s) == hit_end and len(s) > len(hit_stop))):
                hit_end, hit_stop = i + len(s), s
        if hit_stop:
            self.stopped = True
            self._held = ""
            return buf[:hit_end] if self._include else buf[:hit_end - len(hit_stop)]
        keep = self._stop_prefix_len(buf)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """At finish without a stop string: the held-back tail, which is no longer a stop candidate."""
        text, self._held = self._held, ""
        return "" if self.stopped else text


def token_texts(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """Each token's own text (for logprobs); a token holding part of a UTF-8 character shows U+FFFD."""
    return tokenizer.backend_tokenizer.decode_batch([[t] for t in token_ids], skip_special_tokens=False)
