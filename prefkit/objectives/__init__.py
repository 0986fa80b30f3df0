"""The objective registry. Importing this package registers every built-in objective; `build`
turns an objective config into an instance. See objectives/base.py for the public API."""

from prefkit.objectives import (  # noqa: F401  (registration)
    adaptive,
    dpo,
    drdo,
    edpo,
    exo,
    kto,
    mix,
    reference_free,
    tdpo,
    trl_losses,
)
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
