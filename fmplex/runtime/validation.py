"""Checking one request's inputs before it is queued (numpy only, no Triton).

Everything a client can get wrong is caught here, in ``execute()``, so the
client gets a precise error at once and nothing malformed reaches a shared
batch — where it could fail other tasks' rows. Triton itself already refuses
wrong datatypes and ranks against the host's config; this checks the rest.
"""

from __future__ import annotations

import dataclasses

import numpy as np


class RequestError(ValueError):
    """The client's request is invalid; the message is sent back verbatim."""


@dataclasses.dataclass(frozen=True)
class Limits:
    max_rows: int = 256  # rows in one request
    max_text_bytes: int = 16384  # UTF-8 bytes in one text row
    max_tokens: int = 256  # tokens in one row, special tokens included
    vocab_size: int = 30522


@dataclasses.dataclass
class Rows:
    """A request's rows: texts (tokenized later, batched) or token ids."""

    texts: list[str] | None = None
    ids: list[np.ndarray] | None = None

    @property
    def count(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.ids or [])

    def token_estimate(self) -> int:
        """Longest row in tokens: exact for ids, an upper-bound guess for text.

        WordPiece splits punctuation and contractions into their own tokens,
        so short chatty English runs up to one token per 2 bytes; the guess
        (bytes/2 + 2 special tokens) only feeds the scheduler's cost model and
        batch budget — the real length is checked after batched tokenization.
        """
        if self.ids is not None:
            return max(len(r) for r in self.ids)
        return max(len(t.encode("utf-8")) // 2 + 3 for t in self.texts or [""])


def decode_utf8(item: object, max_bytes: int, name: str = "TEXT") -> str:
    """One BYTES element as text: within ``max_bytes`` and valid UTF-8 (every host's TEXT)."""
    raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
    if len(raw) > max_bytes:
        raise RequestError(f"{name} is {len(raw)} bytes, more than the limit of {max_bytes}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def decode_text(arr: np.ndarray, limits: Limits) -> list[str]:
    flat = arr.reshape(-1) if arr.ndim == 2 and arr.shape[-1] == 1 else arr
    if flat.ndim != 1:
        raise RequestError(f"TEXT must have shape [rows] (or [rows, 1]), got {list(arr.shape)}")
    _check_rows(flat.shape[0], "TEXT", limits)
    texts = []
    for i, item in enumerate(flat):
        text = decode_utf8(item, limits.max_text_bytes, f"TEXT row {i}")
        if not text.strip():
            raise RequestError(f"TEXT row {i} is empty")
        texts.append(text)
    return texts


def decode_ids(ids: np.ndarray, mask: np.ndarray | None, limits: Limits) -> list[np.ndarray]:
    if ids.ndim != 2:
        raise RequestError(f"INPUT_IDS must have shape [rows, tokens], got {list(ids.shape)}")
    _check_rows(ids.shape[0], "INPUT_IDS", limits)
    if ids.shape[1] == 0:
        raise RequestError("INPUT_IDS has no tokens")
    if mask is not None and mask.shape != ids.shape:
        raise RequestError(f"ATTENTION_MASK shape {list(mask.shape)} differs from INPUT_IDS shape {list(ids.shape)}")
    if mask is not None and not np.isin(mask, (0, 1)).all():
        raise RequestError("ATTENTION_MASK may hold only 0 and 1")
    if ids.min() < 0 or ids.max() >= limits.vocab_size:
        raise RequestError(f"INPUT_IDS must lie in [0, {limits.vocab_size})")
    rows = []
    for i in range(ids.shape[0]):
        row = ids[i] if mask is None else ids[i][mask[i].astype(bool)]
        if row.size == 0:
            raise RequestError(f"INPUT_IDS row {i} has no unmasked token")
        if row.size > limits.max_tokens:
            raise RequestError(f"INPUT_IDS row {i} has {row.size} tokens, more than the limit of {limits.max_tokens}")
        rows.append(row.astype(np.int64, copy=False))
    return rows


def decode_rows(text: np.ndarray | None, ids: np.ndarray | None, mask: np.ndarray | None, limits: Limits) -> Rows:
    if text is not None and ids is not None:
        raise RequestError("send either TEXT or INPUT_IDS, not both")
    if text is not None:
        if mask is not None:
            raise RequestError("ATTENTION_MASK goes with INPUT_IDS, not with TEXT")
        return Rows(texts=decode_text(text, limits))
    if ids is not None:
        return Rows(ids=decode_ids(ids, mask, limits))
    raise RequestError("missing input: send TEXT (BYTES, shape [rows]) or INPUT_IDS (INT64, shape [rows, tokens])")


def _check_rows(n: int, name: str, limits: Limits) -> None:
    if n == 0:
        raise RequestError(f"{name} is empty (0 rows)")
    if n > limits.max_rows:
        raise RequestError(f"{name} has {n} rows, more than the limit of {limits.max_rows} per request")
