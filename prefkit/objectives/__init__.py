"""The objective registry. Importing this package registers every built-in objective; `build`
turns an objective config into an instance. See objectives/base.py for the public API."""

from prefkit.objectives import adaptive, dpo, drdo, edpo, exo, reference_free, tdpo  # noqa: F401  (registration)
from prefkit.objectives.base import (
    REGISTRY,
    Groups,
    LossOutput,
    Needs,
    Objective,
    build,
    objective,
    register,
    sft_nll,
    trl_metrics,
)

__all__ = ["REGISTRY", "Groups", "LossOutput", "Needs", "Objective", "build", "objective", "register", "sft_nll",
           "trl_metrics"]
