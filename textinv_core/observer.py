"""Progress hooks between the trainer and whoever shows progress (CLI bar, ComfyUI node).

Kept free of torch so front ends can import it cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TrainingObserver:
    """Progress hooks; override what you need. `should_stop` is polled between steps."""

    def on_step(self, step: int, total: int, loss: float) -> None: ...

    def on_eval(self, step: int, eval_loss: float) -> None: ...

    def on_snapshot(self, step: int, path: Path) -> None: ...

    def on_preview(self, step: int, image: Any) -> None:
        """`image` is whatever the host's `preview` returns (a PIL image for the built-in hosts)."""

    def should_stop(self) -> bool:
        return False
