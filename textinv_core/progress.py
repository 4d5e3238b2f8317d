"""Progress in a terminal: a tqdm bar with the latest training and evaluation loss, and previews
written as PNG files. Used by the `textinv` command and the demo."""

from __future__ import annotations

import logging
from pathlib import Path

from .observer import TrainingObserver

log = logging.getLogger("textinv")


class ProgressBar(TrainingObserver):
    """tqdm progress with the latest training and evaluation loss."""

    def __init__(self, preview_dir: Path | None = None) -> None:
        self.bar = None
        self.eval_loss = float("nan")
        self.preview_dir = preview_dir

    def on_step(self, step: int, total: int, loss: float) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, initial=step - 1, desc="training", unit="step")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", eval=f"{self.eval_loss:.4f}")
        if step == total:
            self.close()

    def on_eval(self, step: int, eval_loss: float) -> None:
        self.eval_loss = eval_loss

    def on_snapshot(self, step: int, path: Path) -> None:
        log.debug("snapshot %s", path)

    def on_preview(self, step: int, image) -> None:
        if self.preview_dir is not None:
            self.preview_dir.mkdir(parents=True, exist_ok=True)
            image.save(self.preview_dir / f"preview-step{step:06d}.png")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
