"""Token ids -> the answer's text, as the tokens come, and how much of it may be sent.

:class:`Detokenizer` keeps one sequence's text equal to ``tokenizer.decode(all
ids so far, skip_special_tokens=True)``. :func:`stable_prefix` says how much of
that text can go to the client now: never a trailing partial UTF-8 character
nor a suffix that could still grow into a stop string.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Detokenizer", "stable_prefix"]


class Detokenizer:
    """One sequence's answer text, updated token by token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def add(self, token: int) -> str:
        """Append one token; the whole text so far."""
        self.ids.append(int(token))
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self.text


def stable_prefix(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be sent now: never a trailing partial UTF-8
    character (decoded as U+FFFD until its last byte arrives) nor a suffix
    that could still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), hold, -1):
            if text[:end].endswith(s[:k]):
                hold = k
                break
    return end - hold
