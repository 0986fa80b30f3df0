"""One module per pipeline stage; each exposes `run(cfg)`, called by the CLI under Hydra."""
