"""`prefkit report`: one self-contained document per run, to read and to share.

    outputs/<run>/report/<job>/report.html   every image embedded: no server, no network
    outputs/<run>/report/<job>/report.md     the same content, images beside it (for a paper draft)

Sections: the claims of the run's experiment (if one ran); the reward-vs-KL frontier with its
table (seed-aggregated points, CIs, gaps to the optimal frontier); reward at matched KL; win
rates where judged; training curves per series (each in its frontier colour); a few samples of
each series side by side for the same prompts; the lineage of every job. It reads what the other
stages wrote: run `prefkit frontier` (and before it `sample` and `judge`) first.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig

import prefkit
from prefkit import plots
from prefkit.console import console
from prefkit.errors import UserError
from prefkit.rundir import Job, jobs, read_jsonl, run_dir, start_job, write_lineage, write_text


def run(cfg: DictConfig) -> None:
    out = start_job(cfg)
    if out is None:
        return
    run_path = run_dir(cfg)
    frontier = _frontier_job(run_path, cfg.report.get("frontier"), str(cfg.run.name))
    summary = json.loads((frontier.path / "summary.json").read_text())
    colour = plots.colours(sorted({p["series"] for p in summary["points"] if p["objective"] != "sft-reference"}))
    hexes = {k: _hex(v) for k, v in colour.items()}
    (out / "frontier.png").write_bytes((frontier.path / "frontier.png").read_bytes())
    doc = {"run": str(cfg.run.name), "generated": time.strftime("%Y-%m-%d %H:%M"), "version": prefkit.__version__,
           "scorer_line": f"reward: {summary['scorer']}; KL: {summary['kl_estimator']} estimate",
           "optimal_line": _optimal_line(summary["optimal"]),
           "points": _points(summary["points"], hexes), "matched": _matched(summary["matched_kl"], out),
           "winrates": _winrates(run_path), "curves": _curves(run_path, summary["points"], colour, out),
           "claims": _claims(run_path), "lineage": _lineage(run_path)}
    doc["samples"], doc["sample_seed_note"] = _samples(run_path, summary, int(cfg.report.samples))
    doc["toc"] = [(a, t) for a, t, key in (("claims", "Claims", "claims"), ("frontier", "Reward vs KL", "points"),
                                           ("matched", "Matched KL", "points"), ("winrates", "Win rates", "winrates"),
                                           ("training", "Training", "points"), ("samples", "Samples", "samples"),
                                           ("lineage", "Lineage", "lineage")) if doc[key]]
    write_text(out / "report.html", _html(doc, out))
    write_text(out / "report.md", _markdown(doc))
    write_lineage(out, cfg, {"frontier": str(frontier)})
    console.print(f"report: {out / 'report.html'} (open it in a browser; {out / 'report.md'} for a draft)")


def _frontier_job(run: Path, name: str | None, run_name: str) -> Job:
    done = [j for j in jobs(run, "frontier") if (j.path / "summary.json").exists()]
    if name:
        done = [j for j in done if j.name == name]
    if not done:
        raise UserError(f"no frontier in {run} to report on: judge the run's samples and draw it first "
                        f"(`prefkit judge run.name={run_name}`, then `prefkit frontier run.name={run_name}`)")
    return max(done, key=lambda j: (j.path / "lineage.json").stat().st_mtime)


def _hex(rgba) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgba[:3])


def _ci(mean, low, high, signed: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


def _optimal_line(optimal: list[dict]) -> str:
    trusted = [o for o in optimal if not o["low_ess"]]
    if not trusted:
        return " (not estimated: no reference samples)"
    proposals = sorted({o["proposal"] for o in trusted})
    return (f" (trusted up to KL {max(o['kl'] for o in trusted):.2f}; proposals used: {len(proposals)}, "
            f"effective sample size at least {min(o['ess'] for o in trusted):.1f} per prompt)")


def _points(points: list[dict], hexes: dict) -> list[dict]:
    rows = sorted(points, key=lambda p: (p["objective"] != "sft-reference", p["series"], p["kl"]))
    return [{"series": p["series"], "point": p["point"], "seeds": p["seeds"], "colour": hexes.get(p["series"], "#000"),
             "reward": _ci(p["reward"], p["reward_low"], p["reward_high"]),
             "kl": _ci(p["kl"], p["kl_low"], p["kl_high"]),
             "gap": _ci(p["gap_to_optimal"], p["gap_low"], p["gap_high"], signed=True)} for p in rows]


def _matched(matched: list[dict], out: Path) -> list[dict]:
    if matched:
        plots.matched_kl(matched, out, "matched_kl")
    return [{"a": m["a"], "b": m["b"], "range": f"[{m['grid'][0]:.2f}, {m['grid'][-1]:.2f}]",
             "mean": _ci(*m["mean"], signed=True), "verdict": m["verdict"]} for m in matched]


def _winrates(run: Path) -> list[dict]:
    out = []
    for job in jobs(run, "judge"):
        path = job.path / "winrates.json"
        if not path.exists():
            continue
        w = json.loads(path.read_text())
        judge = ", ".join(w.get("answered_by") or [w["judge"]])
        out.append({"job": job.name, "baseline": w["baseline"], "judge": judge,
                    "rows": [{"candidate": k, "rate": _ci(r["rate"], r["low"], r["high"]),
                              "wtl": f"{r['wins']} / {r['ties']} / {r['losses']}", "invalid": r["invalid"]}
                             for k, r in w["results"].items()]})
    return out


def _curves(run: Path, points: list[dict], colour: dict, out: Path) -> list[dict]:
    """Per series: the metrics.jsonl of each of its align jobs, by point and seed."""
    by_series: dict[str, dict[str, list[list[dict]]]] = defaultdict(lambda: defaultdict(list))
    objectives = {}
    for p in points:
        for key in p["policies"].split():
            parts = key.split("/")
            if parts[0] != "align" or len(parts) != 2:
                continue
            metrics = run / "align" / parts[1] / "metrics.jsonl"
            if metrics.exists():
                by_series[p["series"]][p["point"]].append(read_jsonl(metrics))
                objectives[p["series"]] = p["objective"]
    out_list = []
    for i, (series, pts) in enumerate(sorted(by_series.items())):
        name = f"curves-{i}"
        if plots.training_curves(series, objectives[series], pts, colour.get(series, "black"), out, name):
            out_list.append({"series": series, "file": f"{name}.png", "colour": _hex(colour.get(series, (0, 0, 0)))})
    return out_list


def _claims(run: Path) -> list[dict]:
    # The experiment job is still running when its report step runs; claims.json is written
    # atomically, so its presence means the claims are complete.
    done = [j for j in jobs(run, "experiment", done_only=False) if (j.path / "claims.json").exists()]
    if not done:
        return []
    claims = json.loads((max(done, key=lambda j: (j.path / "claims.json").stat().st_mtime).path / "claims.json")
                        .read_text())["claims"]
    css = {"holds": "holds", "does not hold": "fails"}
    return [{**c, "ci": _ci(c.get("estimate"), c.get("low"), c.get("high"), signed=True),
             "css": css.get(c["verdict"], "unsure")} for c in claims]


def _samples(run: Path, summary: dict, n_prompts: int) -> tuple[list[dict], str]:
    """The same few prompts, the first sample of the SFT model and of each series' best point."""
    best: dict[str, dict] = {}
    for p in summary["points"]:
        if p["series"] not in best or p["reward"] > best[p["series"]]["reward"]:
            best[p["series"]] = p
    picks = [(p["series"] + (f" {p['point']}" if p["point"] else ""), p["policies"].split()[0]) for p in
             sorted(best.values(), key=lambda p: (p["objective"] != "sft-reference", p["series"]))]
    index = _sample_index(run)
    if not index or n_prompts <= 0:
        return [], ""
    rows_by_policy = {}
    for who, key in picks:
        entry = index.get(key)
        if entry is None:
            continue
        rows = [r for r in read_jsonl(Path(entry["samples"])) if r["sample"] == 0]
        scores = _scores_of(run, key)
        rows_by_policy[who] = {r["prompt_id"]: (r, scores.get((r["prompt_id"], 0))) for r in rows}
    if not rows_by_policy:
        return [], ""
    common = sorted(set.intersection(*[set(v) for v in rows_by_policy.values()]))[:n_prompts]
    out = []
    for pid in common:
        first = next(iter(rows_by_policy.values()))[pid][0]
        out.append({"prompt": first["prompt"], "rows": [
            {"who": who, "text": rows[pid][0]["completion"],
             "reward": "–" if rows[pid][1] is None else f"{rows[pid][1]:.2f}"}
            for who, rows in rows_by_policy.items()]})
    return out, "0"


def _sample_index(run: Path) -> dict:
    """The policies of the newest complete sample job that the scoring judge read."""
    index = {}
    for job in jobs(run, "sample"):
        path = job.path / "policies.json"
        if path.exists():
            index.update(json.loads(path.read_text()))
    return index


def _scores_of(run: Path, key: str) -> dict[tuple[int, int], float]:
    for job in jobs(run, "judge"):
        path = job.path / "scores" / f"{key.replace('/', '~')}.jsonl"
        if path.exists():
            return {(r["prompt_id"], r["sample"]): r["score"] for r in read_jsonl(path)}
    return {}


def _lineage(run: Path) -> list[dict]:
    out = []
    for stage in ("sft", "sample", "judge", "reward", "align", "frontier", "experiment"):
        for job in jobs(run, stage):
            lin = job.lineage()
            command = " ".join(["prefkit", lin.get("stage", stage), *lin.get("overrides", [])])
            out.append({"job": str(job), "finished": lin.get("finished", "")[:16].replace("T", " "),
                        "hash": lin.get("config_hash", ""), "code": lin.get("code_version", ""), "command": command})
    return out


# --- rendering ----------------------------------------------------------------------------------

def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _html(doc: dict, out: Path) -> str:
    import jinja2

    template = (Path(prefkit.__file__).parent / "templates" / "report.html").read_text()
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    curves = [{**c, "image": _data_uri(out / c["file"])} for c in doc["curves"]]
    images = {"frontier": _data_uri(out / "frontier.png")}
    if doc["matched"]:
        images["matched"] = _data_uri(out / "matched_kl.png")
    return env.from_string(template).render(**{**doc, "curves": curves, "images": images})


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]) + "\n"


def _markdown(doc: dict) -> str:
    parts = [f"# prefkit report — run `{doc['run']}`\n", f"{doc['generated']} · prefkit {doc['version']} · "
             f"{doc['scorer_line']}\n"]
    if doc["claims"]:
        header = ["claim", "source", "statistic", "direction", "estimate [95% CI]", "verdict"]
        parts += ["## Claims\n", _md_table(header, [[c["description"], c["source"], c["statistic"], c["direction"],
                                                     c["ci"], c["verdict"]] for c in doc["claims"]])]
    parts += ["## Reward vs KL\n", "![reward-vs-KL frontier](frontier.png)\n",
              html.unescape(f"Means over training seeds and prompts; CIs resample both. Optimal frontier: π* ∝ "
                            f"π_ref·exp(r/β){doc['optimal_line']}.\n"),
              _md_table(["series", "swept values", "seeds", "reward [95% CI]", "KL [95% CI]",
                         "gap to optimal [95% CI]"], [[p["series"], p["point"] or "–", p["seeds"], p["reward"], p["kl"],
                                                       p["gap"]] for p in doc["points"]])]
    parts.append("## Reward at matched KL\n")
    if doc["matched"]:
        parts += [_md_table(["A", "B", "KL range", "mean A − B [95% CI]", "where the CI excludes 0"],
                            [[m["a"], m["b"], m["range"], m["mean"], m["verdict"]] for m in doc["matched"]]),
                  "![reward differences at matched KL](matched_kl.png)\n"]
    else:
        parts.append("No two series share a KL range.\n")
    for w in doc["winrates"]:
        parts += [f"## Win rates: {w['job']} (against {w['baseline']}, judged by {w['judge']})\n",
                  _md_table(["candidate", "win rate [95% CI]", "W / T / L", "invalid"],
                            [[r["candidate"], r["rate"], r["wtl"], r["invalid"]] for r in w["rows"]])]
    parts.append("## Training curves\n")
    parts += [f"### {c['series']}\n\n![training curves of {c['series']}]({c['file']})\n" for c in doc["curves"]]
    if doc["samples"]:
        parts.append("## Samples\n")
        for s in doc["samples"]:
            table = _md_table(["policy", "completion", "reward"],
                              [[r["who"], r["text"], r["reward"]] for r in s["rows"]])
            parts += [f"### Prompt: `{s['prompt']}`\n", table]
    parts += ["## Lineage\n", _md_table(["job", "finished", "config hash", "code version", "command"],
                                        [[j["job"], j["finished"], j["hash"], j["code"], f"`{j['command']}`"]
                                         for j in doc["lineage"]])]
    return "\n".join(parts)
