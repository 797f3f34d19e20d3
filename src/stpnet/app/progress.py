"""A one-line text progress bar for training, drawn on a stream the caller passes in."""

from __future__ import annotations

import sys
import time

__all__ = ["ProgressBar"]


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most every 0.2 s."""

    def __init__(self, total_epochs: int, stream=None):
        self.total_epochs, self.last = total_epochs, 0.0
        self.stream = sys.stderr if stream is None else stream

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        now = time.perf_counter()
        if step != steps and now - self.last < 0.2:
            return
        self.last = now
        width = 24
        filled = int(width * step / steps)
        self.stream.write(f"\repoch {epoch + 1}/{self.total_epochs} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{step}/{steps} loss {loss:.3f}")
        self.stream.flush()

    def epoch(self, record: dict) -> None:
        self.stream.write(f"\repoch {record['epoch']}/{self.total_epochs}: train loss {record['train_loss']:.3f}, "
                          f"test accuracy {record['test_accuracy']:.2%}, {record['epoch_time']:.1f} s"
                          + " " * 20 + "\n")
        self.stream.flush()
