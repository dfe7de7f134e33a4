"""The incremental detokenizer gives exactly ``tokenizer.decode`` of all ids so far, at every token.

Random id sequences for SmolLM2's byte-level BPE (special tokens, single-byte
tokens that split multi-byte UTF-8 characters, emoji/CJK text cut anywhere) and
for the multimodal byte tokenizer (arbitrary bytes, invalid UTF-8 included);
a tokenizer that cleans up spaces is decoded whole; stop strings found by the
narrowed search are the ones a search of the whole text finds.
"""

from __future__ import annotations

import copy
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fmplex.generative.detokenizer import Detokenizer, first_stop, stable_prefix  # noqa: E402
from fmplex.multimodal.lm_engine import ByteText  # noqa: E402

TEXTS = ["Emoji time: 😀 means joy, 👍🏽 ok", "日本語のテキストと中文", "naïve café — “quotes” ½ ß", "def f(x):\n    return x ** 2  # ∑"]


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    from fmplex.generative.smollm import load_smollm2, set_threads  # noqa: PLC0415

    set_threads(1)
    return load_smollm2().tokenizer


def _check(tokenizer, ids: list[int]) -> Detokenizer:  # noqa: ANN001
    detok = Detokenizer(tokenizer)
    for k, token in enumerate(ids):
        got = detok.add(token)
        want = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        assert got == want, (ids[: k + 1], got, want)
        assert want.startswith(detok.committed)
    return detok


def _byte_tokens(tokenizer) -> list[int]:  # noqa: ANN001
    """Ids of tokens that are one raw byte >= 0x80 (pieces of multi-byte characters)."""
    out = []
    for tid in range(len(tokenizer)):
        piece = tokenizer.convert_ids_to_tokens(tid)
        if isinstance(piece, str) and len(piece) == 1 and ord(piece) >= 0xA1:
            out.append(tid)
    return out


def test_random_ids_decode_as_a_whole_bpe(tok) -> None:  # noqa: ANN001
    rng = random.Random(7)
    singles = _byte_tokens(tok)
    assert len(singles) > 60
    specials = list(tok.all_special_ids)
    texts = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    vocab = len(tok)
    for n in range(300):
        kind = n % 4
        length = rng.randint(1, 40)
        if kind == 0:  # anything, special tokens included
            ids = [rng.randrange(vocab) if rng.random() > 0.1 else rng.choice(specials) for _ in range(length)]
        elif kind == 1:  # lone bytes: partial and invalid UTF-8
            ids = [rng.choice(singles) if rng.random() < 0.7 else rng.randrange(vocab) for _ in range(length)]
        elif kind == 2:  # real multi-byte text, from any token on
            base = rng.choice(texts)
            start = rng.randrange(len(base))
            ids = base[start:] + [rng.choice(specials)] + base[: rng.randrange(len(base))]
        else:  # text interleaved with random pieces
            base = rng.choice(texts)
            ids = [t if rng.random() < 0.8 else rng.choice(singles) for t in base]
        detok = _check(tok, ids)
        assert detok.stable_length == len(detok.committed)  # incremental all along (never fell back to whole decodes)


def test_random_bytes_decode_as_a_whole_byte_tokenizer() -> None:
    rng = random.Random(11)
    utf8 = "".join(TEXTS).encode("utf-8")
    for n in range(500):
        if n % 2:
            ids = [rng.randrange(260) for _ in range(rng.randint(1, 48))]  # PAD/BOS/EOS/<image> are skipped
        else:
            start = rng.randrange(len(utf8))
            ids = [b if rng.random() < 0.9 else rng.randrange(128, 260) for b in utf8[start : start + rng.randint(1, 48)]]
        detok = _check(ByteText(), ids)
        assert detok.stable_length == len(detok.committed)


def test_a_tokenizer_that_rewrites_across_tokens_is_decoded_whole(tok) -> None:  # noqa: ANN001
    cleaning = copy.copy(tok)
    cleaning.clean_up_tokenization_spaces = True
    ids = tok("Hello , world . It 's fine !", add_special_tokens=False)["input_ids"]
    detok = _check(cleaning, ids)
    assert detok.stable_length == 0  # nothing is taken as final: every token decodes the whole answer


def test_narrowed_stop_search_finds_what_a_whole_search_finds() -> None:
    rng = random.Random(3)
    stops = ("ab", "é!", "xyz", "\n\n")
    alphabet = [ord(c) for c in "abxyz!\n "] + list("é".encode()) + list("😀".encode())
    for _ in range(400):
        detok = Detokenizer(ByteText())
        for _ in range(60):
            searched = detok.stable_length
            text = detok.add(rng.choice(alphabet))
            want = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            assert first_stop(text, stops, searched) == want, text
            if want >= 0:
                break


def test_stable_prefix_holds_back_partial_characters_and_stop_prefixes() -> None:
    assert stable_prefix("abc\ufffd", ()) == 3
    assert stable_prefix("hello wor", ("world",)) == len("hello ")
    assert stable_prefix("hello", ("xyz",)) == 5
