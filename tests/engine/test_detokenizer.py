"""Incremental detokenization (UTF-8 safety, merges, leading spaces) and stop strings."""
from __future__ import annotations

import json
import random

import pytest

from load_tests.tiny_model import build_tokenizer
from replicas.engine.detokenizer import IncrementalDetokenizer, StopChecker, token_texts

TEXT = "Hello wörld! naïve café 東京 Привет мир 🙂🚀 emoji, \"quotes\" and  two  spaces.\n\tdone 🙂"


@pytest.fixture(scope="module")
def tiny_tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def sp_tok():
    """A Llama-2-style SentencePiece BPE: Metaspace "▁" spaces, <0xNN> byte fallback, stripped first space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["Hello world, the quick brown fox jumps over the lazy dog. done"] * 8, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    sp = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    sp.add_special_tokens(["<unk>", "<s>", "</s>"])
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def stream(tok, prompt, output, chunks=None, skip_special_tokens=True):
    """Feed `output` in chunks of the given sizes (default: one token at a time); return the pieces."""
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    pieces, i = [], 0
    for n in chunks or [1] * len(output):
        pieces.append(d.append(output[i:i + n]))
        i += n
    assert i == len(output)
    pieces.append(d.flush())
    return pieces


def random_chunks(rng, n):
    out = []
    while n:
        out.append(min(n, rng.choice([1, 1, 1, 2, 3, 7])))
        n -= out[-1]
    return out


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_sequences_tiny(tiny_tok, skip_special_tokens):
    """Random ids (lone UTF-8 continuation bytes, special tokens, partial characters): concat == decode."""
    rng = random.Random(0)
    for _ in range(200):
        prompt = [rng.randrange(len(tiny_tok)) for _ in range(rng.randrange(0, 8))]
        out = [rng.randrange(len(tiny_tok)) for _ in range(rng.randrange(1, 40))]
        pieces = stream(tiny_tok, prompt, out, random_chunks(rng, len(out)), skip_special_tokens)
        assert "".join(pieces) == tiny_tok.decode(out, skip_special_tokens=skip_special_tokens)


@pytest.mark.slow
def test_random_token_sequences_smollm2(smol_tok):
    rng = random.Random(1)
    special = smol_tok.all_special_ids
    for _ in range(200):
        prompt = smol_tok.encode("Some prompt text:")
        out = [rng.choice(special) if rng.random() < 0.05 else rng.randrange(len(smol_tok))
               for _ in range(rng.randrange(1, 40))]
        pieces = stream(smol_tok, prompt, out, random_chunks(rng, len(out)))
        assert "".join(pieces) == smol_tok.decode(out, skip_special_tokens=True)


def _check_multibyte_text(tok, prompt_text):
    prompt = tok.encode(prompt_text)
    out = tok.encode(TEXT)
    assert tok.decode(out) == TEXT
    pieces = stream(tok, prompt, out)
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)  # partial characters are held back, never shown as U+FFFD
    # The text really splits characters across tokens, so the hold-back path ran.
    assert any(t.endswith("\ufffd") for t in token_texts(tok, out))
    assert "" in pieces[:-1]


def test_multibyte_emoji_cjk_tiny(tiny_tok):
    _check_multibyte_text(tiny_tok, "Say something:")


@pytest.mark.slow
def test_multibyte_emoji_cjk_smollm2(smol_tok):
    _check_multibyte_text(smol_tok, "Say something:")
    prompt = smol_tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                          return_dict=False)
    out = smol_tok.encode(" The capital of France is Paris. 🙂") + [smol_tok.eos_token_id]
    assert "".join(stream(smol_tok, prompt, out)) == " The capital of France is Paris. 🙂"


def test_sentencepiece_leading_space_and_byte_fallback(sp_tok):
    prompt = sp_tok.encode("Hello world,")
    out = sp_tok.encode("the quick 東京 🙂 fox")
    ids = prompt + out
    assert any(t.startswith("<0x") for t in sp_tok.convert_ids_to_tokens(out))  # byte fallback in use
    pieces = stream(sp_tok, prompt, out)
    # In context the first output token keeps its "▁" space, which a decode of the output alone strips.
    assert "".join(pieces) == sp_tok.decode(ids)[len(sp_tok.decode(prompt)):] == " the quick 東京 🙂 fox"
    assert sp_tok.decode(out) == "the quick 東京 🙂 fox"
    assert not any("\ufffd" in p for p in pieces)


def test_emission_does_not_depend_on_chunking(tiny_tok):
    """Same tokens, any grouping: the text emitted after the last token of each call is the same, so a
    resumed request replays to exactly the state the first replica had."""
    out = tiny_tok.encode(TEXT)
    rng = random.Random(2)
    one_by_one = stream(tiny_tok, [], out)
    emitted_after = [sum(len(p) for p in one_by_one[:i + 1]) for i in range(len(out))]
    for _ in range(20):
        chunks = random_chunks(rng, len(out))
        pieces = stream(tiny_tok, [], out, chunks)
        ends = [sum(chunks[:i + 1]) for i in range(len(chunks))]
        assert [sum(len(p) for p in pieces[:i + 1]) for i in range(len(chunks))] == \
            [emitted_after[e - 1] for e in ends]


def test_work_per_token_is_bounded(tiny_tok):
    """O(new tokens): each decode covers a short window, not the sequence so far."""
    d = IncrementalDetokenizer(tiny_tok, tiny_tok.encode("prompt " * 50))
    lengths = []
    real = d._backend

    class Spy:
        def decode(self, ids, **kw):
            lengths.append(len(ids))
            return real.decode(ids, **kw)
    d._backend = Spy()
    out = tiny_tok.encode(TEXT * 20)
    text = "".join(d.append([t]) for t in out) + d.flush()
    assert text == TEXT * 20
    assert len(lengths) <= 2 * len(out) and max(lengths) <= 8


def test_token_texts(tiny_tok):
    ids = tiny_tok.encode(" capital of France")
    assert "".join(token_texts(tiny_tok, ids)) == " capital of France"
    assert token_texts(tiny_tok, [tiny_tok.eos_token_id]) == ["<|im_end|>"]


# --- stop strings ---------------------------------------------------------------------------------

def run_stop(chunks, stop, include):
    sc = StopChecker(stop, include)
    out, sent = [], ""
    for c in chunks:
        piece = sc.push(c)
        sent += piece
        out.append(piece)
        if sc.stopped:
            break
    else:
        sent += sc.flush()
    return sent, sc.stopped, out


@pytest.mark.parametrize("include,expected", [(False, "Hello world. "), (True, "Hello world. STOP")])
def test_stop_string_spanning_chunks(include, expected):
    sent, stopped, out = run_stop(["Hello wo", "rld. ST", "OP more", "text"], ["STOP"], include)
    assert stopped and sent == expected
    assert out[1] == "rld. "  # "ST" held back: it may be the start of STOP


def test_stop_string_false_start_is_released():
    sent, stopped, out = run_stop(["a ST", "ONE b S", "T"], ["STOP"], False)
    assert not stopped and sent == "a STONE b ST"
    assert out == ["a ", "STONE b ", ""]  # the last "ST" only comes out at flush


def test_first_completed_stop_wins_whatever_the_chunking():
    for chunks in (["xabcd"], ["x", "a", "b", "c", "d"], ["xa", "bcd"]):
        assert run_stop(chunks, ["abcd", "bc"], False)[0] == "xa"
        assert run_stop(chunks, ["abcd", "bc"], True)[0] == "xabc"
        # Same end: the longer stop string starts earlier and wins.
        assert run_stop(chunks, ["bc", "xabc"], False)[0] == ""


def test_stop_strings_random_against_reference():
    rng = random.Random(3)
    alphabet = "ab cé🙂"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 3))]
        include = rng.random() < 0.5
        chunks, i = [], 0
        while i < len(text):
            n = rng.randrange(1, 6)
            chunks.append(text[i:i + n])
            i += n
        # Reference: the stop that completes first (then the longest) over the whole text.
        best = None
        for s in stops:
            j = text.find(s)
            if j != -1:
                key = (j + len(s), -len(s))
                if best is None or key < best[0]:
                    best = (key, j, s)
        expected = text if best is None else text[:best[1] + (len(best[2]) if include else 0)]
        sc = StopChecker(stops, include)
        sent, seen = "", ""
        for c in chunks:
            sent += sc.push(c)
            seen += c
            assert expected.startswith(sent)  # nothing sent is ever cut later
            if sc.stopped:
                break
            assert len(seen) - len(sent) <= max(len(s) for s in stops) - 1
        sent += sc.flush()
        assert sent == expected and sc.stopped == (best is not None)


def test_no_stop_strings_passes_through():
    sc = StopChecker([], False)
    assert sc.push("abc") == "abc" and sc.flush() == "" and not sc.stopped
