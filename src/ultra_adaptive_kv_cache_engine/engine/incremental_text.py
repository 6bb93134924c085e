"""`IncrementalText`: the text of a growing list of generated token ids, released in pieces never taken back.

Each `add` decodes only a short window of recent tokens (the offsets of vLLM's detokenizer): the text of the
new tokens is ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``, and it is held back while it ends
in an incomplete character (U+FFFD). Stop strings are searched in the text as it grows; the released text is
cut before the first one, and the last ``len(longest stop) - 1`` characters are held back until the end, so
a piece once released never turns out to be the start of a stop string.

Invariant: the concatenation of every piece `add` and `finish` return equals `text` after `finish`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class IncrementalText:
    """Text of generated tokens with stop strings (see the module docstring)."""

    def __init__(self, decode: Decode, stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stops = tuple(stops)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0  # window start: a character boundary before `_read`
        self._read = 0  # ids whose text is already in `_text`
        self._text = ""
        self._searched = 0  # stop strings cannot start before this index of `_text`
        self._released = 0
        self.stopped = False  # a stop string was found; `_text` is cut before it

    @property
    def text(self) -> str:
        """The text so far (cut at a stop string), released or not."""
        return self._text

    def add(self, token_ids: Sequence[int]) -> str:
        """Appends tokens; returns the newly released text (possibly empty). No-op once stopped."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        before = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if len(window) > len(before) and not window.endswith("\ufffd"):
            self._text += window[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
            self._find_stop()
        end = len(self._text) if self.stopped else max(self._released, len(self._text) - self._hold)
        return self._release(end)

    def finish(self) -> str:
        """Flushes what was held back (an incomplete character included); returns the last piece."""
        if not self.stopped and self._read < len(self._ids):
            before = self._decode(self._ids[self._prefix : self._read])
            window = self._decode(self._ids[self._prefix :])
            self._text += window[len(before) :]
            self._read = len(self._ids)
            self._find_stop()
        return self._release(len(self._text))

    def _find_stop(self) -> None:
        if not self._stops:
            return
        cut = min((i for i in (self._text.find(s, self._searched) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._text, self.stopped = self._text[:cut], True
        else:
            self._searched = max(0, len(self._text) - self._hold)

    def _release(self, end: int) -> str:
        piece = self._text[self._released : end]
        self._released = max(self._released, end)
        return piece
