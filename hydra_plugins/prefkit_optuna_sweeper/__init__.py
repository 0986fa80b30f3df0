"""prefkit's Optuna sweeper for Hydra (`hydra/sweeper=optuna`); Hydra finds plugins only under the
`hydra_plugins` namespace package."""
