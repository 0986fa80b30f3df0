"""A policy's samples on disk: `<sample job>/<policy>/samples.jsonl` with its `meta.json`.

Rows are appended to samples.partial.jsonl one batch at a time (fsynced), so a killed run loses
at most the batch in flight; samples.jsonl (sorted by prompt and sample) and meta.json, which
says how many rows it holds, appear only when the policy is done. Readers check both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefkit.errors import UserError
from prefkit.rundir import write_json, write_jsonl


def _read_partial(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill
                    break
    return rows


class SampleWriter:
    """Append-only rows with fsync per batch; on restart, rows of prompts left incomplete are
    dropped (their batch is regenerated, identically, from its own seed)."""

    def __init__(self, folder: Path, n_per_prompt: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.partial, self.final = folder / "samples.partial.jsonl", folder / "samples.jsonl"
        self.folder = folder
        rows = _read_partial(self.partial)
        counts: dict[int, int] = {}
        for r in rows:
            counts[r["prompt_id"]] = counts.get(r["prompt_id"], 0) + 1
        self.done = {pid for pid, c in counts.items() if c == n_per_prompt}
        kept = [r for r in rows if r["prompt_id"] in self.done]
        with open(self.partial, "w") as f:  # rewrite without any incomplete prompt
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._f = open(self.partial, "a")  # noqa: SIM115  (held open while sampling)

    def write(self, rows: list[dict]) -> None:
        self._f.write("".join(json.dumps(r) + "\n" for r in rows))
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done.update(r["prompt_id"] for r in rows)

    def finish(self, meta: dict) -> None:
        """samples.jsonl, sorted, then meta.json (which says how many rows it must hold)."""
        self._f.close()
        rows = sorted(_read_partial(self.partial), key=lambda r: (r["prompt_id"], r["sample"]))
        write_jsonl(self.final, rows)
        write_json(self.folder / "meta.json", meta)
        self.partial.unlink()


def read_samples(folder: Path) -> list[dict]:
    """The rows of a policy's samples.jsonl, checked against its meta.json (n × prompts rows, each
    a whole JSON line), or a UserError that names the damage."""
    final = folder / "samples.jsonl"
    try:
        meta = json.loads((folder / "meta.json").read_text())
        expected = int(meta["n"]) * int(meta["prompts"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{folder}: meta.json is missing or damaged, so its samples cannot be checked") from None
    rows = []
    with open(final, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{final}: line {number} is not a whole JSON row (cut by a full disk or a kill?)") \
                    from None
    if len(rows) != expected:
        raise UserError(f"{final}: {len(rows)} rows where {meta['n']} samples × {meta['prompts']} prompts = {expected} "
                        "were written")
    return rows
