"""What the converter tells about each layer as it goes, for a progress display.

A layer (named by its source digest) goes through steps: ``download`` (registry
sources), ``convert``, ``upload``; or a step is settled at once with a note (``upload``:
"the destination has it", "mounted from ..."; ``reuse``: already eStargz). All calls
come from the event loop's thread, in order for a given layer.
"""

from __future__ import annotations

from typing import Protocol


class Events(Protocol):
    def begin(self, layer: str, step: str, total: int | None) -> None:
        """A step starts; ``total`` bytes when known."""

    def advance(self, layer: str, done: int, total: int | None = None) -> None:
        """Bytes of the current step done so far (and its total, once known)."""

    def end(self, layer: str, step: str) -> None:
        """The current step is done."""

    def note(self, layer: str, step: str, text: str) -> None:
        """A step settled without work (``text`` says how)."""


class _NoEvents:
    def begin(self, layer: str, step: str, total: int | None) -> None:
        pass

    def advance(self, layer: str, done: int, total: int | None = None) -> None:
        pass

    def end(self, layer: str, step: str) -> None:
        pass

    def note(self, layer: str, step: str, text: str) -> None:
        pass


NO_EVENTS: Events = _NoEvents()
