"""State that must survive a resume, for anything the training loop steps besides the model
(an objective's β, β-DPO's running statistics, TR-DPO's moving reference)."""

from __future__ import annotations

from typing import Any


class Stateful:
    """Anything whose state must survive a resume (an objective's β, a moving reference...)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def on_optimizer_step(self, accelerator) -> dict[str, float]:
        """Called after each successful optimizer step; may return metrics to log."""
        return {}

    def on_skipped_step(self) -> None:
        """Called when a step is skipped for a non-finite loss (drop accumulated statistics)."""
