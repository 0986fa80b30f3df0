"""The reader behind every source adapter (hh, imdb, tldr, ultrafeedback, local): datasets from
the Hugging Face Hub or local copies, as prefkit rows (see prefkit.data).

One path reads every source: `datasets.load_dataset(path, config_name, data_dir=, revision=)`
for a Hub id, or the json/parquet builder over `data_files` for local copies (JSON, JSONL,
JSON.GZ, Parquet) in the Hub's schema. An adapter, chosen by the dataset config's `name`, turns
each source row into one prefkit row, leaves it out by a documented option (a filter), or finds it
malformed: a malformed row stops the load with its index, or with `on_bad_row: skip` is skipped
and counted. Row indices in messages are 0-based positions in the source split.

When a dataset has no eval split (`splits.eval: null`), a seeded held-out set is carved from the
train split by prompt: a prompt goes to eval when a hash of (seed, prompt) falls under
`eval_fraction`, so the same prompt never lands on both sides and the carve does not depend on the
model or the row order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from prefkit.console import console, log
from prefkit.data import row_problem
from prefkit.errors import UserError

SPLITS = ("train", "eval")
SOURCE_KEYS = ("path", "config_name", "data_dir", "data_files", "revision", "splits")
# Keys every source dataset config may carry: the source, the row selection, and what encode reads.
COMMON_KEYS = frozenset({
    "name", "on_bad_row", "max_length", "max_prompt_length", "prompt_truncation", "min_response_tokens",
    "add_eos", "prompt_special_tokens", *SOURCE_KEYS, "max_rows", "seed", "eval_fraction", "unique_prompts",
    "cache_dir", "max_unk_share"})
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zstd")


class Malformed(Exception):
    """A source row that cannot become a prefkit row (error or skip, per on_bad_row)."""


class SourceAdapter:
    """Maps the rows of one source schema (a Hub dataset or local files) to prefkit rows."""

    keys: frozenset = frozenset()  # config keys of this adapter, beyond COMMON_KEYS

    def __init__(self, ds: DictConfig, kind: str, tokenizer=None, run=None) -> None:
        _check_keys(ds, str(ds.name), self.keys)
        self.ds, self.kind, self.tokenizer = ds, kind, tokenizer

    def rows(self, split: str) -> list[dict]:
        return read(self, split)

    def source(self) -> Mapping:
        return self.ds

    def required_columns(self) -> tuple[str, ...]:
        return ()

    def missing_columns(self, found: list[str]) -> list[str]:
        return [c for c in self.required_columns() if c not in found]

    def order(self, table) -> list[int] | None:
        """The order to read the source rows in (None: as stored)."""
        return None

    def carve_key(self, raw: dict, index: int) -> str:
        """What identifies a row's prompt for the train/eval carve."""
        raise NotImplementedError

    def convert(self, raw: dict, index: int) -> dict | None:
        """One prefkit row, or None when a filter leaves the row out; Malformed if it is broken."""
        raise NotImplementedError


def read(adapter: SourceAdapter, split: str) -> list[dict]:
    """Rows of the adapter's kind for `split` ("train" or "eval"), each converted and validated once."""
    ds, name = adapter.ds, str(adapter.ds.name)
    if split not in SPLITS:
        raise UserError(f"dataset {name}: unknown split '{split}'; valid: {', '.join(SPLITS)}")
    where = f"dataset {name} ({adapter.kind}, {split})"
    on_bad = str(ds.get("on_bad_row", "error"))
    if on_bad not in ("error", "skip"):
        raise UserError(f"dataset.on_bad_row={on_bad}; valid: error, skip")
    table, desc, carve = _open(adapter.source(), split, ds, where)
    _check_columns(table.column_names, adapter.missing_columns(table.column_names), desc, where)
    seed, fraction = int(ds.get("seed") or 0), None
    if carve is not None:
        fraction = ds.get("eval_fraction")
        if fraction is None or not 0 < float(fraction) < 1:
            raise UserError(f"{where}: splits.eval is null, so eval is carved from the train split; "
                            f"set dataset.eval_fraction between 0 and 1 (it is {fraction})")
        fraction = float(fraction)
        forced = _smallest_if_none_held_out(adapter, table, seed, fraction)
        keep = lambda raw, i: (_held_out(adapter.carve_key(raw, i), seed, fraction)
                               or adapter.carve_key(raw, i) == forced) == (carve == "eval")
    else:
        keep = None
    limit = (ds.get("max_rows") or {}).get(split)
    tally = _Tally(where, desc, on_bad == "skip")
    rows = _convert_all(adapter, table, keep, None if limit is None else int(limit), tally)
    if carve is not None:
        tally.notes.append(f"{carve} side of a seeded carve (eval_fraction={fraction}, seed={seed})"
                           + ("; no prompt's hash fell under eval_fraction, so the one with the smallest is held out"
                              if forced is not None else ""))
    tally.report(rows)
    return rows


class _Tally:
    """What reading left out, and the one line that reports it."""

    def __init__(self, where: str, desc: str, skip_bad: bool):
        self.where, self.desc, self.skip_bad = where, desc, skip_bad
        self.bad: list[tuple[int, str]] = []
        self.left_out = self.duplicates = 0
        self.notes: list[str] = []

    def malformed(self, index: int, err: Malformed) -> None:
        reason = (str(err).strip().splitlines() or ["?"])[0]
        if not self.skip_bad:
            raise UserError(f"{self.where}: row {index} of {self.desc} is malformed: {reason} "
                            "(set dataset.on_bad_row=skip to skip such rows)") from None
        self.bad.append((index, reason))

    def report(self, rows: list[dict]) -> None:
        notes = []
        if self.bad:
            notes.append(f"skipped {len(self.bad)} malformed row(s), first row {self.bad[0][0]}: {self.bad[0][1]}")
        if self.left_out:
            notes.append(f"left out {self.left_out} row(s) by the config's filters")
        if self.duplicates:
            notes.append(f"dropped {self.duplicates} repeated prompt(s)")
        notes += self.notes
        why = "; ".join(notes)
        if not rows:
            raise UserError(f"{self.where}: no usable rows in {self.desc}" + (f" ({why})" if why else ""))
        message = f"{self.where}: {len(rows)} rows from {self.desc}" + (f"; {why}" if why else "")
        if self.bad:
            log.warning("%s", message)
        else:
            console.print(message, markup=False, highlight=False)


def _convert_all(adapter: SourceAdapter, table, keep, limit: int | None, tally: _Tally) -> list[dict]:
    """Every source row (in the adapter's order) that `keep` keeps, converted and validated."""
    order = adapter.order(table)
    indices: Iterable[int] = order if order is not None else range(len(table))
    view = table.select(order) if order is not None else table
    unique = adapter.kind == "prompts" and bool(adapter.ds.get("unique_prompts", False))
    rows: list[dict] = []
    seen: set[str] = set()
    for i, raw in zip(indices, view, strict=True):
        if keep is not None and not keep(raw, i):
            continue
        try:
            row = adapter.convert(raw, i)
            problem = None if row is None else row_problem(row, adapter.kind)
            if problem is not None:
                raise Malformed(problem)
        except Malformed as err:
            tally.malformed(i, err)
            continue
        if row is None:
            tally.left_out += 1
            continue
        if unique:
            if row["prompt"] in seen:
                tally.duplicates += 1
                continue
            seen.add(row["prompt"])
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


# --- reading ------------------------------------------------------------------------------------

def plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _check_keys(ds: Mapping, name: str, adapter_keys: frozenset) -> None:
    unknown = sorted(set(ds.keys()) - COMMON_KEYS - adapter_keys)
    if unknown:
        raise UserError(f"dataset {name}: unknown key(s) {', '.join(unknown)}; it reads "
                        f"{', '.join(sorted(COMMON_KEYS | adapter_keys))}")


def _builder(files: Any, where: str) -> str:
    names = [files] if isinstance(files, str) else list(files)
    kinds = set()
    for f in names:
        stem = str(f).lower()
        for suffix in COMPRESSION:
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
        kinds.add(next((b for ext, b in BUILDERS.items() if stem.endswith(ext)), None))
    if None in kinds or len(kinds) != 1:
        raise UserError(f"{where}: cannot tell the format of data_files {', '.join(map(str, names))}; "
                        "use .json, .jsonl (optionally .gz) or .parquet files, all of one format")
    return kinds.pop()


def _open(src: Mapping, split: str, ds: Mapping, where: str):
    """The source split as a datasets.Dataset, a description for messages, and which side of a
    carve to keep (None when the split exists as such)."""
    import datasets

    splits = dict(plain(src.get("splits")) or {})
    data_files = plain(src.get("data_files"))
    if data_files and not isinstance(data_files, Mapping):
        data_files = {"train": data_files}
    hub_split, carve = _source_split(splits, data_files, split, where)
    kwargs: dict[str, Any] = {"split": hub_split, "cache_dir": ds.get("cache_dir")}
    if data_files:
        if hub_split not in data_files:
            how = (f"add it (dataset.data_files={{{', '.join(data_files)}, {hub_split}: <file>}}) or carve {split} "
                   "from the train split (dataset.splits.eval=null; dataset.eval_fraction sets its share)")
            raise UserError(f"{where}: data_files has no '{hub_split}' entry (the source split for {split}); "
                            f"it has: {', '.join(map(str, data_files))}; {how}")
        files = data_files[hub_split]
        path = _builder(files, where)
        if path == "json":
            for f in [files] if isinstance(files, str) else files:
                check_json_file(Path(str(f)), where)
        kwargs["data_files"] = {hub_split: files}
        desc = f"{files if isinstance(files, str) else ', '.join(map(str, files))} (split {hub_split})"
    else:
        path = src.get("path")
        if not path:
            raise UserError(f"{where}: set dataset.path (a Hub id) or dataset.data_files (local files)")
        path = str(path)
        kwargs.update(name=src.get("config_name"), data_dir=src.get("data_dir"), revision=src.get("revision"))
        desc = f"{path} (split {hub_split})"
    try:
        table = datasets.load_dataset(path, **kwargs)
    except ConnectionError as err:
        offline = "OfflineModeIsEnabled" in str(err) or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
            "1", "ON", "YES", "TRUE")
        why = "HF_HUB_OFFLINE=1 is set" if offline else "the Hugging Face Hub cannot be reached"
        wanted = dict.fromkeys(str(s) for s in splits.values() if s is not None)
        files = ", ".join(f"{s}: <file>" for s in wanted)
        raise UserError(f"{where}: cannot load '{path}': {why} and it is not in the local datasets cache; "
                        f"for local copies in the Hub's schema set dataset.data_files={{{files}}} "
                        "(JSON, JSONL, JSON.GZ or Parquet)") from None
    except (OSError, ValueError, RuntimeError, datasets.exceptions.DatasetsError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        hint = ""
        if "scripts are no longer supported" in first:
            hint = ("; this Hub dataset only has a loading script: read its parquet export with "
                    "revision=refs/convert/parquet")
        elif "Unknown split" in first or "Bad split" in first:
            hint = "; set dataset.splits to existing split names"
        raise UserError(f"{where}: cannot load {desc}: {type(err).__name__}: {first}{hint}") from None
    return table, desc, carve


def _source_split(splits: dict, data_files, split: str, where: str) -> tuple[str, str | None]:
    """The source split that `split` reads, and which side of a carve it keeps (None: no carve)."""
    if splits.get("eval") is None and data_files and "eval" in data_files:
        splits["eval"] = "eval"  # an eval file given beside the train file is used, not carved
    hub_split, carve = splits.get(split), None
    if hub_split is None:
        if split == "train" or splits.get("train") is None:
            raise UserError(f"{where}: set splits.train (the source split to train on)")
        hub_split, carve = splits["train"], "eval"
    elif split == "train" and splits.get("eval") is None:
        carve = "train"
    return str(hub_split), carve


def _opener(path: Path):
    import bz2
    import gzip
    import lzma

    return {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower(), open)


def check_json_file(path: Path, where: str) -> None:
    """A local JSON/JSONL file: present, not empty, UTF-8, and (JSON Lines) one object per line, or
    one JSON document; the first fault is reported with its line number, which the datasets
    library's own error does not give."""
    if not path.exists():
        raise UserError(f"{where}: data file {path} does not exist")
    if path.suffix.lower() in (".zst", ".zstd"):
        return
    first_error: str | None = None
    lines = 0
    with _opener(path)(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{where}: {path} line {number} is not UTF-8 text (byte {err.start}: "
                                f"{raw[err.start:err.start + 1]!r})") from None
            if not text.strip():
                continue
            lines += 1
            if first_error is None:
                try:
                    row = json.loads(text)
                    if not isinstance(row, dict):
                        first_error = f"line {number} is a JSON {type(row).__name__}, not an object"
                except json.JSONDecodeError as err:
                    first_error = f"line {number} is not valid JSON ({err.msg} at column {err.colno})"
    if lines == 0:
        raise UserError(f"{where}: data file {path} is empty")
    if first_error is not None:
        with _opener(path)(path, "rt", encoding="utf-8") as f:
            try:
                json.load(f)  # one JSON document (an array, or an object with a field) is fine too
                return
            except json.JSONDecodeError:
                pass
        raise UserError(f"{where}: {path} {first_error}")


def _check_columns(found: list[str], missing: list[str], desc: str, where: str) -> None:
    if missing:
        raise UserError(f"{where}: {desc} lacks column(s) {', '.join(missing)}; columns found: {', '.join(found)} "
                        "(is this the right dataset for this config?)")


def _carve_hash(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _held_out(key: str, seed: int, fraction: float) -> bool:
    return _carve_hash(key, seed) < fraction


def _smallest_if_none_held_out(adapter: SourceAdapter, table, seed: int, fraction: float) -> str | None:
    """With few distinct prompts no hash may fall under eval_fraction; then the prompt with the
    smallest hash is held out, so a small file still has an eval split (and the same one for the
    train side's read). None when the carve holds out a prompt anyway, or there is only one."""
    best, keys = None, set()
    for i, raw in enumerate(table):
        key = adapter.carve_key(raw, i)
        keys.add(key)
        h = _carve_hash(key, seed)
        if h < fraction:
            return None
        if best is None or h < best[0]:
            best = (h, key)
    return best[1] if best is not None and len(keys) > 1 else None


# --- helpers for adapters -------------------------------------------------------------------------

def as_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise Malformed(f"{what} is missing or not a string")
    return value


def pair_row(kind: str, prompt: str, chosen: str, rejected: str, reference: str | None = None,
              **extra: Any) -> dict:
    """The row of `kind` from one pair: SFT on the chosen response; prompt rows keep it as the
    reference (for win rates against the dataset's preferred response)."""
    if kind == "sft":
        return {"prompt": prompt, "completion": chosen, **extra}
    if kind == "preference":
        return {"prompt": prompt, "completions": [chosen, rejected], **extra}
    return {"prompt": prompt, "reference": chosen if reference is None else reference, **extra}
