"""Token ids -> the answer's text, as the tokens come, and how much of it may be sent.

:class:`Detokenizer` keeps one sequence's text equal to ``tokenizer.decode(all
ids so far, skip_special_tokens=True)`` without decoding the whole answer at
every token. It decodes a short window (the approach of vLLM's and TGI's
incremental detokenizers): the ids since ``prefix``, of which those before
``read`` were already turned into committed text. The new text is what the
window decodes to beyond what its first part did; it is committed only when it
does not end in U+FFFD (a UTF-8 character whose bytes are split over tokens is
decoded as U+FFFD until its last byte arrives), and until then it is the
*tail*: ``text = committed + tail`` is exact at every token, and the text before
``prefix`` is never decoded again. Decoding the window from an earlier token
keeps a tokenizer's word-boundary rules (a leading space it drops at the start
of a decode) the same as in one whole decode.

Tokenizers that rewrite text across tokens (``clean_up_tokenization_spaces``)
are decoded whole, as is any window whose text does not extend its first
part's (checked at every token): exact first, fast where it is safe.
tests/unit/test_generative_detokenizer.py compares it with ``tokenizer.decode``
over many random id sequences (byte-level BPE and the byte tokenizer).

:func:`first_stop` finds a stop string, looking only where a new one can be;
:func:`stable_prefix` says how much of the text can go to the client now: never
a trailing partial UTF-8 character nor a suffix that could still grow into a
stop string.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Detokenizer", "first_stop", "stable_prefix"]

REPLACEMENT = "\ufffd"


class Detokenizer:
    """One sequence's answer text, updated token by token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # == decode(ids): committed + tail
        self.committed = ""  # text that no later token can change
        self._prefix = 0  # the window starts here
        self._read = 0  # ids before this are in ``committed``
        self._prefix_text = ""  # decode(ids[_prefix:_read])
        self._whole = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append one token; the whole text so far."""
        self.ids.append(int(token))
        if self._whole:
            self.text = self._decode(self.ids)
            return self.text
        window = self._decode(self.ids[self._prefix :])
        if not window.startswith(self._prefix_text):  # this tokenizer's decode is not incremental here
            self._whole = True
            self.text = self._decode(self.ids)
            return self.text
        tail = window[len(self._prefix_text) :]
        self.text = self.committed + tail
        if tail and not tail.endswith(REPLACEMENT):
            self.committed = self.text
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        return self.text

    @property
    def stable_length(self) -> int:
        """Characters of ``text`` that no later token can change (0 when decoding whole: any may)."""
        return 0 if self._whole else len(self.committed)


def first_stop(text: str, stops: tuple[str, ...], searched: int) -> int:
    """The first index of any stop string in ``text`` (-1: none), given that
    none lies wholly inside ``text[:searched]`` (text that cannot change any more)."""
    cut = -1
    for s in stops:
        i = text.find(s, max(0, searched - len(s) + 1))
        if i >= 0 and (cut < 0 or i < cut):
            cut = i
    return cut


def stable_prefix(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be sent now: never a trailing partial UTF-8
    character (decoded as U+FFFD until its last byte arrives) nor a suffix
    that could still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == REPLACEMENT:
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), hold, -1):
            if text[:end].endswith(s[:k]):
                hold = k
                break
    return end - hold
