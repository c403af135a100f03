"""One request's tokens as text: UTF-8 reassembled across tokens, stop strings cut, flips kept.

A token's bytes may end inside a UTF-8 character, and a stop string may span several tokens, so
text is released only once it can no longer be part of a stop string; a released piece keeps
the mark of the token(s) the selector changed (flips), so a client can show them.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """A run of answer text and whether the selector changed the token(s) it came from."""

    text: str
    flipped: bool


class TextStream:
    """Feed token bytes with `push`, then `finish`; each returns the pieces safe to send now.

    After a stop string appears, `stopped` is true and nothing more (the stop string included)
    is released, as OpenAI's API does.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._held: list[Piece] = []
        self._flag = False  # a flipped token whose bytes have not completed a character yet
        self.stopped = False

    def push(self, data: bytes, flipped: bool = False) -> list[Piece]:
        if self.stopped:
            return []
        self._flag |= flipped
        text = self._utf8.decode(data)
        if not text:
            return []
        self._held.append(Piece(text, self._flag))
        self._flag = False
        return self._release(final=False)

    def finish(self) -> list[Piece]:
        """The rest of the text at the end of generation (no stop string can complete now)."""
        if self.stopped:
            return []
        tail = self._utf8.decode(b"", final=True)
        if tail:
            self._held.append(Piece(tail, self._flag))
        return self._release(final=True)

    def _release(self, final: bool) -> list[Piece]:
        buf = "".join(p.text for p in self._held)
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut, self.stopped = min(hits), True
        else:
            cut = len(buf) if final else len(buf) - self._holdback(buf)
        out: list[Piece] = []
        pos = 0
        rest: list[Piece] = []
        for p in self._held:
            end = pos + len(p.text)
            if end <= cut:
                out.append(p)
            elif pos < cut:
                out.append(Piece(p.text[: cut - pos], p.flipped))
                rest.append(Piece(p.text[cut - pos :], p.flipped))
            else:
                rest.append(p)
            pos = end
        self._held = [] if self.stopped else rest
        return out

    def _holdback(self, buf: str) -> int:
        """Length of the longest end of `buf` that starts some stop string."""
        longest = max((len(s) for s in self.stops), default=0)
        for k in range(min(len(buf), longest - 1), 0, -1):
            if any(s.startswith(buf[-k:]) for s in self.stops):
                return k
        return 0
