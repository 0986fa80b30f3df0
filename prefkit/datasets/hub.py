"""Real datasets, from the Hugging Face Hub or local copies, as prefkit rows (see prefkit.data).

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
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from prefkit.console import console, log
from prefkit.data import row_problem
from prefkit.errors import UserError

KINDS = ("sft", "preference", "prompts")
SPLITS = ("train", "eval")
SOURCE_KEYS = ("path", "config_name", "data_dir", "data_files", "revision", "splits")
# Keys every hub dataset config may carry: the source, the row selection, and what encode reads.
COMMON_KEYS = frozenset({
    "name", "on_bad_row", "max_length", "max_prompt_length", "prompt_truncation", "min_response_tokens",
    "add_eos", "prompt_special_tokens", *SOURCE_KEYS, "max_rows", "seed", "eval_fraction", "unique_prompts",
    "cache_dir"})
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zstd")


class Malformed(Exception):
    """A source row that cannot become a prefkit row (error or skip, per on_bad_row)."""


def load(ds: DictConfig, kind: str, split: str, tokenizer=None) -> list[dict]:
    """Rows of `kind` for `split` ("train" or "eval") from the dataset config `ds`."""
    name = str(ds.name)
    adapter_cls = ADAPTERS.get(name)
    if adapter_cls is None:
        raise UserError(f"unknown dataset '{name}'; valid: synthetic, labeled, {', '.join(ADAPTERS)}")
    if kind not in KINDS:
        raise ValueError(kind)
    if split not in SPLITS:
        raise UserError(f"dataset {name}: unknown split '{split}'; valid: {', '.join(SPLITS)}")
    _check_keys(ds, name, adapter_cls.keys)
    where = f"dataset {name} ({kind}, {split})"
    on_bad = str(ds.get("on_bad_row", "error"))
    if on_bad not in ("error", "skip"):
        raise UserError(f"dataset.on_bad_row={on_bad}; valid: error, skip")
    adapter = adapter_cls(ds, kind, tokenizer)
    table, desc, carve = _open(adapter.source(), split, ds, where)
    _check_columns(table.column_names, adapter.missing_columns(table.column_names), desc, where)

    seed, fraction = int(ds.get("seed") or 0), None
    if carve is not None:
        fraction = ds.get("eval_fraction")
        if fraction is None or not 0 < float(fraction) < 1:
            raise UserError(f"{where}: splits.eval is null, so eval is carved from the train split; "
                            f"set dataset.eval_fraction between 0 and 1 (it is {fraction})")
        fraction = float(fraction)
    limit = (ds.get("max_rows") or {}).get(split)
    limit = None if limit is None else int(limit)
    unique = kind == "prompts" and bool(ds.get("unique_prompts", False))

    order = adapter.order(table)
    indices: Iterable[int] = order if order is not None else range(len(table))
    view = table.select(order) if order is not None else table
    rows: list[dict] = []
    bad: list[tuple[int, str]] = []
    left_out = duplicates = 0
    seen: set[str] = set()
    for i, raw in zip(indices, view, strict=True):
        if carve is not None and _held_out(adapter.carve_key(raw, i), seed, fraction) != (carve == "eval"):
            continue
        try:
            row = adapter.convert(raw, i)
            problem = None if row is None else row_problem(row, kind)
            if problem is not None:
                raise Malformed(problem)
        except Malformed as err:
            if on_bad == "skip":
                bad.append((i, (str(err).strip().splitlines() or ["?"])[0]))
                continue
            reason = (str(err).strip().splitlines() or ["?"])[0]
            raise UserError(f"{where}: row {i} of {desc} is malformed: {reason} "
                            "(set dataset.on_bad_row=skip to skip such rows)") from None
        if row is None:
            left_out += 1
            continue
        if unique:
            if row["prompt"] in seen:
                duplicates += 1
                continue
            seen.add(row["prompt"])
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break

    notes = []
    if bad:
        notes.append(f"skipped {len(bad)} malformed row(s), first row {bad[0][0]}: {bad[0][1]}")
    if left_out:
        notes.append(f"left out {left_out} row(s) by the config's filters")
    if duplicates:
        notes.append(f"dropped {duplicates} repeated prompt(s)")
    if carve is not None:
        notes.append(f"{carve} side of a seeded carve (eval_fraction={fraction}, seed={seed})")
    if not rows:
        raise UserError(f"{where}: no usable rows in {desc}" + (f" ({'; '.join(notes)})" if notes else ""))
    message = f"{where}: {len(rows)} rows from {desc}" + (f"; {'; '.join(notes)}" if notes else "")
    if bad:
        log.warning("%s", message)
    else:
        console.print(message, markup=False, highlight=False)
    return rows


# --- reading ------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
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

    splits = _plain(src.get("splits")) or {}
    hub_split, carve = splits.get(split), None
    if hub_split is None:
        if split == "train" or splits.get("train") is None:
            raise UserError(f"{where}: set splits.train (the source split to train on)")
        hub_split, carve = splits["train"], "eval"
    elif split == "train" and splits.get("eval") is None:
        carve = "train"
    hub_split = str(hub_split)
    data_files = _plain(src.get("data_files"))
    kwargs: dict[str, Any] = {"split": hub_split, "cache_dir": ds.get("cache_dir")}
    if data_files:
        if not isinstance(data_files, Mapping):
            data_files = {"train": data_files}
        if hub_split not in data_files:
            raise UserError(f"{where}: data_files has no '{hub_split}' entry (the source split for {split}); "
                            f"it has: {', '.join(map(str, data_files))}")
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


def _held_out(key: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise Malformed(f"{what} is missing or not a string")
    return value


def _pair_row(kind: str, prompt: str, chosen: str, rejected: str, reference: str | None = None,
              **extra: Any) -> dict:
    """The row of `kind` from one pair: SFT on the chosen response; prompt rows keep it as the
    reference (for win rates against the dataset's preferred response)."""
    if kind == "sft":
        return {"prompt": prompt, "completion": chosen, **extra}
    if kind == "preference":
        return {"prompt": prompt, "completions": [chosen, rejected], **extra}
    return {"prompt": prompt, "reference": chosen if reference is None else reference, **extra}


# --- adapters -----------------------------------------------------------------------------------

class Adapter:
    """Maps the rows of one source schema to prefkit rows."""

    keys: frozenset = frozenset()  # config keys of this adapter, beyond COMMON_KEYS

    def __init__(self, ds: DictConfig, kind: str, tokenizer) -> None:
        self.ds, self.kind, self.tokenizer = ds, kind, tokenizer

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


ASSISTANT, HUMAN = "\n\nAssistant:", "\n\nHuman:"


def split_hh(transcript: Any, what: str) -> tuple[str, str]:
    """An HH transcript -> (prompt up to and including its last "\\n\\nAssistant:", response)."""
    text = _text(transcript, what)
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise Malformed(f"{what} has no '\\n\\nAssistant:' turn")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


class HH(Adapter):
    """Anthropic/hh-rlhf: {"chosen", "rejected"} full transcripts that share every turn but the
    last Assistant reply. The same rule holds for every kind, so sft, preference and prompt rows
    come from the same pairs: a pair whose transcripts do not share their prompt, or with an empty
    response, is malformed."""

    keys = frozenset({"single_turn"})

    def required_columns(self):
        return ("chosen", "rejected")

    def carve_key(self, raw, index):
        try:
            return split_hh(raw["chosen"], "chosen")[0]
        except Malformed:
            return str(index)

    def convert(self, raw, index):
        prompt, chosen = split_hh(raw["chosen"], "chosen")
        other, rejected = split_hh(raw["rejected"], "rejected")
        if other != prompt:
            at = next(j for j, (a, b) in enumerate(zip(prompt + "\0", other + "\1", strict=False)) if a != b)
            raise Malformed("chosen and rejected do not share the prompt up to their last '\\n\\nAssistant:' "
                            f"(they differ from character {at})")
        for what, response in (("chosen", chosen), ("rejected", rejected)):
            if not response.strip():
                raise Malformed(f"the {what} response is empty")
        if self.ds.get("single_turn") and prompt.count(HUMAN) != 1:
            return None
        return _pair_row(self.kind, prompt, chosen, rejected)


class IMDB(Adapter):
    """stanfordnlp/imdb: {"text", "label"} reviews. `<br />` becomes a newline; the prompt is the
    review's first `prefix.length` tokens (of the model's tokenizer) or words, the rest its
    continuation. No preference pairs: those come from sampling and judging."""

    keys = frozenset({"prefix", "interleave_labels"})

    def __init__(self, ds, kind, tokenizer):
        super().__init__(ds, kind, tokenizer)
        if kind == "preference":
            raise UserError("dataset imdb has reviews, not preference pairs: IMDB preferences come from the "
                            "synthetic-pairs loop (sample completions for the imdb prompts, label each pair with a "
                            "judge such as the sentiment reward, then align on the labelled pairs, dataset=labeled)")
        prefix = _plain(ds.get("prefix")) or {}
        self.unit = str(prefix.get("unit", "tokens"))
        if self.unit not in ("tokens", "words"):
            raise UserError(f"dataset imdb: prefix.unit={self.unit}; valid: tokens, words")
        length = prefix.get("length", 10)
        lo, hi = (length, length) if isinstance(length, int) else tuple(length)
        if not 1 <= int(lo) <= int(hi):
            raise UserError(f"dataset imdb: prefix.length={length}; give a positive int or [min, max]")
        self.lo, self.hi, self.seed = int(lo), int(hi), int(ds.get("seed") or 0)
        if self.unit == "tokens":
            if tokenizer is None:
                raise UserError("dataset imdb: prefix.unit=tokens cuts prefixes with the model's tokenizer, and none "
                                "was given; set dataset.prefix.unit=words to cut by words")
            if not getattr(tokenizer, "is_fast", False):
                raise UserError("dataset imdb: prefix.unit=tokens needs a fast tokenizer (for character offsets); "
                                "set dataset.prefix.unit=words")

    def required_columns(self):
        return ("text", "label") if self.ds.get("interleave_labels") else ("text",)

    def order(self, table):
        """Seeded shuffle within each label, then alternate labels: the first N rows are balanced
        (the stored splits are sorted by label)."""
        if not self.ds.get("interleave_labels"):
            return None
        groups: dict[Any, list[int]] = {}
        for i, label in enumerate(table["label"]):
            groups.setdefault(label, []).append(i)
        rng = random.Random(self.seed)
        queues = []
        for label in sorted(groups, key=str):
            rng.shuffle(groups[label])
            queues.append(groups[label])
        order = []
        for j in range(max(map(len, queues), default=0)):
            order += [q[j] for q in queues if j < len(q)]
        return order

    def carve_key(self, raw, index):
        return str(raw.get("text"))

    def _cut(self, text: str, n: int) -> int | None:
        """Character offset where the first n units end, or None if the text has no more than n."""
        if self.unit == "words":
            ends = [m.end() for m in re.finditer(r"\S+", text)]
        else:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            ends = [end for _, end in enc["offset_mapping"]]
        return ends[n - 1] if len(ends) > n else None

    def convert(self, raw, index):
        text = _text(raw.get("text"), "text").replace("<br />", "\n")
        n = self.lo if self.lo == self.hi else random.Random(f"{self.seed}/{index}").randint(self.lo, self.hi)
        cut = self._cut(text, n)
        if cut is None or not text[cut:].strip():
            raise Malformed(f"the review has nothing after its {n}-{self.unit[:-1]} prefix")
        prompt, rest = text[:cut], text[cut:]
        if self.kind == "sft":
            return {"prompt": prompt, "completion": rest}
        row = {"prompt": prompt, "reference": rest}
        if raw.get("label") is not None:
            row["label"] = raw["label"]
        return row


TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


class TLDR(Adapter):
    """Reddit TL;DR. Preference and prompt rows: openai/summarize_from_feedback "comparisons"
    ({"info": {"post", "title", "subreddit", "article", ...}, "summaries": [{"text"}, {"text"}],
    "choice", "extra": {"confidence"}}) with the prompt `template` and completions
    " " + summary.strip(). SFT rows: `sft_source`, CarperAI/openai_summarize_tldr ({"prompt",
    "label"}) or a {"subreddit", "title", "post", "summary"} dataset; with sft_source null, the
    comparisons' chosen summaries."""

    keys = frozenset({"sft_source", "template", "article_template", "site", "min_confidence", "null_confidence"})

    def __init__(self, ds, kind, tokenizer):
        super().__init__(ds, kind, tokenizer)
        self.template = str(ds.get("template") or TLDR_TEMPLATE)
        self.article_template = ds.get("article_template")
        _check_template(self.template, ("subreddit", "title", "post"), "template")
        if self.article_template is not None:
            _check_template(str(self.article_template), ("title", "article", "site"), "article_template")
        self.site = str(ds.get("site", "reddit"))
        if self.site not in ("reddit", "news", "all"):
            raise UserError(f"dataset tldr: site={self.site}; valid: reddit, news, all")
        if self.site != "reddit" and self.article_template is None:
            raise UserError(f"dataset tldr: site={self.site} needs an article_template for the news articles")
        self.null_confidence = str(ds.get("null_confidence", "keep"))
        if self.null_confidence not in ("keep", "drop"):
            raise UserError(f"dataset tldr: null_confidence={self.null_confidence}; valid: keep, drop")
        self.min_confidence = ds.get("min_confidence")
        sft_source = _plain(ds.get("sft_source"))
        self.sft_source = sft_source if kind == "sft" and sft_source else None
        if self.sft_source is not None:
            unknown = sorted(set(self.sft_source) - set(SOURCE_KEYS))
            if unknown:
                raise UserError(f"dataset tldr: unknown key(s) {', '.join(unknown)} in sft_source; "
                                f"valid: {', '.join(SOURCE_KEYS)}")
        self.sft_schema = None

    def source(self):
        return self.sft_source if self.sft_source is not None else self.ds

    def missing_columns(self, found):
        if self.sft_source is None:
            return [c for c in ("info", "summaries", "choice") if c not in found]
        for schema in (("prompt", "label"), ("subreddit", "title", "post", "summary")):
            if all(c in found for c in schema):
                self.sft_schema = schema
                return []
        return ["prompt and label (CarperAI/openai_summarize_tldr), or subreddit, title, post and summary"]

    def carve_key(self, raw, index):
        if self.sft_source is not None:
            return str(raw.get("prompt") or raw.get("post"))
        info = raw.get("info") or {}
        return str(info.get("post") or info.get("article") or index)

    def convert(self, raw, index):
        if self.sft_source is not None:
            return self._sft(raw)
        info = raw.get("info")
        if not isinstance(info, Mapping):
            raise Malformed("'info' is missing")
        confidence = (raw.get("extra") or {}).get("confidence")
        if confidence is None:
            if self.null_confidence == "drop":
                return None
        elif self.min_confidence is not None and confidence < self.min_confidence:
            return None
        news = info.get("post") is None and info.get("article") is not None
        if (self.site == "reddit" and news) or (self.site == "news" and not news):
            return None
        fields = {k: info.get(k) or "" for k in ("subreddit", "title", "site")}
        if news:
            prompt = str(self.article_template).format(article=_text(info.get("article"), "info.article"), **fields)
        else:
            prompt = self.template.format(post=_text(info.get("post"), "info.post"), **fields)
        summaries, choice = raw.get("summaries"), raw.get("choice")
        if not isinstance(summaries, list) or len(summaries) != 2:
            raise Malformed("'summaries' must hold exactly two summaries")
        if choice not in (0, 1):
            raise Malformed(f"'choice' must be 0 or 1, not {choice!r}")
        texts = [_text((s or {}).get("text"), f"summary {j}") for j, s in enumerate(summaries)]
        if any(not t.strip() for t in texts):
            raise Malformed("a summary is empty")
        chosen, rejected = " " + texts[choice].strip(), " " + texts[1 - choice].strip()
        return _pair_row(self.kind, prompt, chosen, rejected, confidence=confidence)

    def _sft(self, raw):
        if self.sft_schema == ("prompt", "label"):
            prompt, summary = _text(raw.get("prompt"), "prompt").rstrip(), _text(raw.get("label"), "label")
        else:
            fields = {k: _text(raw.get(k), k) for k in ("subreddit", "title", "post")}
            prompt, summary = self.template.format(**fields), _text(raw.get("summary"), "summary")
        if not summary.strip():
            raise Malformed("the summary is empty")
        return {"prompt": prompt, "completion": " " + summary.strip()}


def _check_template(template: str, fields: tuple[str, ...], key: str) -> None:
    try:
        template.format(**dict.fromkeys(fields, ""))
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"dataset tldr: {key} may use only {', '.join('{' + f + '}' for f in fields)} "
                        f"({type(err).__name__}: {err})") from None


class UltraFeedback(Adapter):
    """Conversations as {"role", "content"} message lists in "chosen" and "rejected" (identical but
    for the last, assistant, message), rendered with the tokenizer's chat template: the prompt is
    the conversation before the last assistant turn with the generation prompt; a completion is
    what rendering the whole conversation adds after it (with the template's end-of-turn).
    HuggingFaceH4/ultrafeedback_binarized, argilla/ultrafeedback-binarized-preferences-cleaned,
    princeton-nlp/*-ultrafeedback."""

    keys = frozenset({"chat_template", "score_columns", "scores_as_rewards"})

    def __init__(self, ds, kind, tokenizer):
        super().__init__(ds, kind, tokenizer)
        name = str(ds.name)
        if tokenizer is None:
            raise UserError(f"dataset {name} renders conversations with the model's chat template; "
                            "load it with the model's tokenizer")
        self.template = ds.get("chat_template") or getattr(tokenizer, "chat_template", None)
        if not self.template:
            raise UserError(f"dataset {name}: the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat "
                            "template; use a chat (instruct) model or set dataset.chat_template to a Jinja template")
        scores = _plain(ds.get("score_columns"))
        if scores is not None and (not isinstance(scores, list) or len(scores) != 2):
            raise UserError(f"dataset {name}: score_columns must name two columns (chosen, rejected) or be null")
        self.score_columns = scores
        self.scores_as_rewards = bool(ds.get("scores_as_rewards", False))
        if self.scores_as_rewards and scores is None:
            raise UserError(f"dataset {name}: scores_as_rewards needs score_columns")

    def required_columns(self):
        return ("chosen", "rejected", *(self.score_columns or ()))

    def carve_key(self, raw, index):
        chosen = raw.get("chosen")
        if isinstance(chosen, list) and len(chosen) > 1:
            return json.dumps(chosen[:-1], sort_keys=True)
        return str(raw.get("prompt") or index)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateError as err:
            raise Malformed(f"the chat template rejects this conversation: {err}") from None

    def convert(self, raw, index):
        chosen, rejected = _messages(raw.get("chosen"), "chosen"), _messages(raw.get("rejected"), "rejected")
        conversation = chosen[:-1]
        if conversation != rejected[:-1]:
            raise Malformed("chosen and rejected differ before their last assistant message")
        if not conversation:  # only the replies are stored: the prompt column is the user turn
            conversation = [{"role": "user", "content": _text(raw.get("prompt"), "prompt")}]
        for what, message in (("chosen", chosen[-1]), ("rejected", rejected[-1])):
            if not message["content"].strip():
                raise Malformed(f"the {what} response is empty")
        prompt = self._render(conversation, True)
        completions = []
        for message in (chosen[-1], rejected[-1]):
            full = self._render([*conversation, message], False)
            if not full.startswith(prompt):
                raise UserError(f"dataset {self.ds.name}: row {index}: the chat template does not render the prompt "
                                "(with its generation prompt) as a prefix of the whole conversation, so prompt and "
                                "completion cannot be split; use another template (dataset.chat_template)")
            completions.append(full[len(prompt):])
        extra: dict[str, Any] = {}
        if self.kind == "preference" and self.score_columns:
            scores = [raw.get(c) for c in self.score_columns]
            if self.scores_as_rewards:
                if any(not isinstance(s, (int, float)) for s in scores):
                    raise Malformed(f"a score ({', '.join(self.score_columns)}) is missing")
                extra["rewards"] = [float(s) for s in scores]
            else:
                extra["scores"] = scores
        if self.kind == "prompts":
            extra["messages"] = conversation
        return _pair_row(self.kind, prompt, *completions, reference=chosen[-1]["content"], **extra)


def _messages(value: Any, what: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise Malformed(f"'{what}' is not a list of messages")
    out = []
    for message in value:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise Malformed(f"'{what}' has a message without a string role and content")
        out.append({"role": message["role"], "content": message["content"]})
    if out[-1]["role"] != "assistant":
        raise Malformed(f"'{what}' does not end with an assistant message")
    return out


class Local(Adapter):
    """Files already in prefkit's row schema: {"prompt", "completion"}, {"prompt", "completions",
    "rewards"?} or {"prompt", "chosen", "rejected"} (-> completions [chosen, rejected]); other
    keys are kept. SFT rows from preference files use the first (best) completion; prompt rows
    keep the first completion as "reference"."""

    def missing_columns(self, found):
        missing = [] if "prompt" in found else ["prompt"]
        pairs = "chosen" in found and "rejected" in found
        if self.kind == "sft" and not ({"completion", "completions"} & set(found) or pairs):
            missing.append("completion (or completions, or chosen and rejected)")
        if self.kind == "preference" and "completions" not in found and not pairs:
            missing.append("completions (or chosen and rejected)")
        return missing

    def carve_key(self, raw, index):
        return str(raw.get("prompt"))

    def convert(self, raw, index):
        row = {k: v for k, v in raw.items() if v is not None}  # datasets fills absent keys with None
        if "chosen" in row or "rejected" in row:
            if "completions" in row:
                raise Malformed("has both 'completions' and 'chosen'/'rejected'")
            row["completions"] = [row.pop("chosen", None), row.pop("rejected", None)]
        completions = row.get("completions")
        first = completions[0] if isinstance(completions, list) and completions else None
        if self.kind == "sft":
            if "completion" not in row and first is not None:
                row["completion"] = first
            row.pop("completions", None)
            row.pop("rewards", None)
        elif self.kind == "prompts":
            reference = row.pop("completion", None) or first
            row.pop("completions", None)
            row.pop("rewards", None)
            if reference is not None:
                row.setdefault("reference", reference)
        else:
            row.pop("completion", None)
        return row


ADAPTERS: dict[str, type[Adapter]] = {
    "hh": HH, "imdb": IMDB, "tldr": TLDR, "ultrafeedback": UltraFeedback, "ultrafeedback_argilla": UltraFeedback,
    "local": Local}
