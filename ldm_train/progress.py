"""A progress bar for a training run: step, loss and it/s (tqdm), on the main process only."""

from __future__ import annotations

import sys

from tqdm import tqdm


class TrainingProgress:
    def __init__(self, total_steps: int, start_step: int, stage: str, enabled: bool):
        self.bar = tqdm(total=total_steps, initial=start_step, desc=f"train {stage}", unit="step",
                        disable=not enabled, dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def update(self, **values: float) -> None:
        self.bar.set_postfix({name: f"{value:.4g}" for name, value in values.items()}, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
