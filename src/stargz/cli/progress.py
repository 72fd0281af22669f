"""Progress of ``stargz convert`` on stderr: bars on a terminal, log lines otherwise.

On a terminal, one ``tqdm`` bar per layer (the step, bytes, rate and ETA of what it is
doing now: download, convert or upload). Elsewhere (a pipe, a CI log), one plain line per
layer step when it ends, e.g.
``layer sha256:0a437a1c586c download 5.2 MB in 0.31s (16.8 MB/s)``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO


def _short(digest: str) -> str:
    return digest[:19]


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


@dataclass
class _Step:
    name: str
    total: int | None
    started: float = field(default_factory=time.monotonic)
    done: int = 0


class LogLines:
    """One line per layer step, written when the step ends."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self._steps: dict[str, _Step] = {}

    def begin(self, layer: str, step: str, total: int | None) -> None:
        self._steps[layer] = _Step(step, total)

    def advance(self, layer: str, done: int, total: int | None = None) -> None:
        s = self._steps.get(layer)
        if s is not None:
            s.done = done
            if total is not None:
                s.total = total

    def end(self, layer: str, step: str) -> None:
        s = self._steps.pop(layer, None)
        if s is None:
            return
        secs = time.monotonic() - s.started
        rate = f" ({s.done / 1e6 / secs:.1f} MB/s)" if secs > 0 else ""
        self._line(layer, step, f"{_mb(s.done)} in {secs:.2f}s{rate}")

    def note(self, layer: str, step: str, text: str) -> None:
        self._line(layer, step, text)

    def _line(self, layer: str, step: str, text: str) -> None:
        print(f"layer {_short(layer)} {step} {text}", file=self.out, flush=True)


class Bars:
    """One tqdm bar per layer, showing its current step."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self._bars: dict[str, Any] = {}

    def _bar(self, layer: str) -> Any:
        bar = self._bars.get(layer)
        if bar is None:
            from tqdm import tqdm

            try:
                sized = os.get_terminal_size(self.out.fileno()).columns > 0
            except (OSError, ValueError):
                sized = False
            bar = tqdm(
                total=None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                position=len(self._bars),
                file=self.out,
                leave=True,
                dynamic_ncols=sized,
                ncols=None if sized else 100,  # a terminal that reports no size
                desc=_short(layer),
            )
            self._bars[layer] = bar
        return bar

    def begin(self, layer: str, step: str, total: int | None) -> None:
        bar = self._bar(layer)
        bar.set_postfix_str("", refresh=False)
        bar.set_description_str(f"{_short(layer)} {step:8}", refresh=False)
        bar.reset(total=total)

    def advance(self, layer: str, done: int, total: int | None = None) -> None:
        bar = self._bar(layer)
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def end(self, layer: str, step: str) -> None:
        bar = self._bar(layer)
        if bar.total is not None:
            bar.update(bar.total - bar.n)
        bar.set_postfix_str("done")
        bar.refresh()

    def note(self, layer: str, step: str, text: str) -> None:
        bar = self._bar(layer)
        bar.set_description_str(f"{_short(layer)} {step:8}")
        bar.set_postfix_str(text)
        bar.refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
