"""A run remembers its data. A stage that reads an earlier job (align and reward read the SFT model,
sample reads the policies, judge reads the samples) uses that job's dataset unless the command
names one; a command that names another dataset than the one the earlier job used stops with one
line, unless it says so (`inherit_dataset=false`). Pairs labelled in the run (`dataset=labeled`)
are the run's own data and always fit.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from prefkit.console import console
from prefkit.errors import UserError
from prefkit.rundir import Job, command_keys

# What makes two dataset configs the same data (sizes, lengths and seeds may differ).
SOURCE_KEYS = ("name", "path", "config_name", "data_dir", "data_files")


def source(ds: DictConfig) -> dict:
    return {k: OmegaConf.to_container(ds[k], resolve=True) if OmegaConf.is_config(ds.get(k)) else ds.get(k)
            for k in SOURCE_KEYS if k in ds}


def named_dataset() -> bool:
    """Whether the command line sets the dataset (dataset=..., dataset.x=...)."""
    return any(key.split(".", 1)[0] == "dataset" for key in command_keys())


def inherit(cfg: DictConfig, earlier: Job | None) -> None:
    """Give `cfg` the dataset of the `earlier` job it reads, or refuse a silent mismatch."""
    if earlier is None or not cfg.get("inherit_dataset", True) or not (earlier.path / "config.yaml").exists():
        return
    theirs = earlier.config.get("dataset")
    if theirs is None or source(theirs) == source(cfg.dataset) or str(cfg.dataset.name) == "labeled":
        return
    if named_dataset():
        raise UserError(f"this command reads dataset {_describe(cfg.dataset)}, but {earlier} (which it reads) used "
                        f"{_describe(theirs)}; drop the dataset override to use the same data, or pass "
                        "inherit_dataset=false to mix them on purpose")
    with open_dict(cfg):
        cfg.dataset = theirs
    console.print(f"dataset: {_describe(theirs)}, as {earlier} used (a dataset= override chooses another)")


def _describe(ds: DictConfig) -> str:
    files = ds.get("data_files")
    files = OmegaConf.to_container(files) if OmegaConf.is_config(files) else files
    return str(ds.name) + (f" ({files})" if files else f" ({ds.path})" if ds.get("path") else "")
