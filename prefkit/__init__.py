"""prefkit: offline preference alignment (DPO, EXO, TDPO, ε-DPO, DRDO and baselines) from one CLI."""

__version__ = "0.1.0"
