"""`prefkit frontier`: the reward-vs-KL frontier of everything judged in the run.

One point per judged policy (objectives, β/α values, seeds and checkpoints of every sweep), with
bootstrap CIs on both axes and each objective's upper envelope; the SFT/reference point; the
best-of-N curve (KL = log N − (N−1)/N); and the optimal KL-regularised frontier
π*_β ∝ π_ref · exp(r/β), estimated from the reference's own samples by self-normalised
importance weights (effective sample size reported; low-ESS points drawn hollow). Writes
frontier.csv, optimal.csv, best_of_n.csv, frontier.png and frontier.svg, and prints a table with
each policy's gap to the optimal frontier at its KL (none beyond the largest KL whose estimate has
enough effective samples).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from rich.table import Table

from prefkit import estimators
from prefkit.console import console
from prefkit.errors import UserError
from prefkit.rundir import jobs, read_jsonl, run_dir, start_job, write_json, write_lineage, write_text


def gather(run: Path, wanted: str | None) -> tuple[list[dict], list, dict]:
    """Points of every judged policy, and the scores of the reference policy by prompt."""
    scored = [j for j in jobs(run, "judge") if (j.path / "summary.json").exists()
              and "policies" in json.loads((j.path / "summary.json").read_text())]
    if wanted:
        scored = [j for j in scored if j.name == wanted]
    if not scored:
        raise UserError(f"no scored samples in {run}: run `prefkit sample run.name={run.name}` and "
                        f"`prefkit judge run.name={run.name}` first")
    points, reference_scores, meta = [], [], {}
    for job in scored:
        summary = json.loads((job.path / "summary.json").read_text())
        meta = {"scorer": summary.get("scorer"), "sampling": summary.get("sampling", {})}
        for key, entry in summary["policies"].items():
            points.append({"judge_job": job.name, "key": key, **entry})
            if entry.get("objective") == "sft-reference" and not reference_scores:
                rows = read_jsonl(Path(entry["scores"]))
                by_prompt: dict[int, list[float]] = defaultdict(list)
                for r in rows:
                    by_prompt[r["prompt_id"]].append(r["score"])
                reference_scores = [by_prompt[p] for p in sorted(by_prompt)]
    return points, reference_scores, meta


def _label(point: dict) -> str:
    params = point.get("params") or {}
    text = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    step = f"@{point['step']}" if point.get("step") is not None else ""
    return f"{text}{step}"


def run(cfg: DictConfig) -> None:
    out = start_job(cfg)
    if out is None:
        return
    f = cfg.frontier
    run_path = run_dir(cfg)
    points, ref_scores, meta = gather(run_path, f.get("judge"))
    kl_key = str(f.kl)
    rows = []
    for p in points:
        kl = p["kl"].get(kl_key) if p.get("kl") else None
        if kl is None:
            valid = ", ".join(p.get("kl", {})) or "none"
            raise UserError(f"{p['key']} has no '{kl_key}' KL estimate; valid: {valid}")
        rows.append({"policy": p["key"], "objective": p.get("objective", "?"), "params": _label(p),
                     "seed": p.get("seed"), "step": p.get("step"), "judge_job": p["judge_job"],
                     "reward": p["reward"]["mean"], "reward_low": p["reward"]["low"],
                     "reward_high": p["reward"]["high"],
                     "kl": kl["mean"], "kl_low": kl["low"], "kl_high": kl["high"], "n_samples": p["n_samples"],
                     "mean_tokens": p.get("mean_tokens")})
    optimal, bon = [], []
    if ref_scores and min(len(s) for s in ref_scores) >= 2:
        m = min(len(s) for s in ref_scores)
        betas = [math.inf, *np.geomspace(float(f.beta_min), float(f.beta_max), int(f.n_betas))]  # inf: KL 0
        optimal = estimators.optimal_frontier(ref_scores, betas)
        ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= m]
        bon = estimators.best_of_n_curve(ref_scores, ns)
    else:
        console.print("no reference policy with >= 2 samples per prompt: no optimal frontier or best-of-N curve "
                      "(sample with sample.n_reference=16)")
    trusted = [(o.kl, o.reward) for o in optimal if not o.low_ess]
    # Beyond the largest KL the reference's samples can reweight to (at most log of their number),
    # the optimal frontier is unknown: no gap there rather than one against a clamped end point.
    max_kl = max((k for k, _ in trusted), default=float("nan"))
    for r in rows:
        r["gap_to_optimal"] = estimators.frontier_gap(r["kl"], r["reward"], trusted) \
            if trusted and r["kl"] <= max_kl else float("nan")
    _write_csv(out / "frontier.csv", rows)
    _write_csv(out / "optimal.csv", [o.__dict__ for o in optimal])
    _write_csv(out / "best_of_n.csv", [{"n": n, "kl": k, "reward": r} for n, k, r in bon])
    title = f"reward ({meta.get('scorer')}) vs KL ({kl_key}) — run {cfg.run.name}"
    _plot(rows, optimal, bon, out, title, kl_key)
    _table(rows, {p["key"]: p.get("params") or {} for p in points}, max_kl)
    write_json(out / "summary.json", {"points": len(rows), "kl_estimator": kl_key, "scorer": meta.get("scorer"),
                                      "sampling": meta.get("sampling"), "plot": str(out / "frontier.png")})
    write_lineage(out, cfg, {"judge_jobs": sorted({r["judge_job"] for r in rows})})
    console.print(f"frontier: {len(rows)} policies -> {out / 'frontier.png'}")


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        write_text(path, "")
        return
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def _plot(rows: list[dict], optimal: list, bon: list, out: Path, title: str, kl_key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6))
    by_objective: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_objective[r["objective"]].append(r)
    objectives = sorted(o for o in by_objective if o != "sft-reference")
    colors = plt.get_cmap("tab10" if len(objectives) <= 10 else "tab20")
    for i, objective in enumerate(objectives):
        pts = by_objective[objective]
        color = colors(i % colors.N)
        kl = np.array([p["kl"] for p in pts])
        rw = np.array([p["reward"] for p in pts])
        ax.errorbar(kl, rw, xerr=[kl - [p["kl_low"] for p in pts], [p["kl_high"] for p in pts] - kl],
                    yerr=[rw - [p["reward_low"] for p in pts], [p["reward_high"] for p in pts] - rw],
                    fmt="o", color=color, ms=5, capsize=2, alpha=0.85, label=objective)
        env = estimators.upper_envelope(list(zip(kl.tolist(), rw.tolist(), strict=True)))
        if len(env) > 1:
            ax.plot([e[0] for e in env], [e[1] for e in env], "-", color=color, lw=1.5, alpha=0.8)
    for r in by_objective.get("sft-reference", []):
        ax.errorbar([r["kl"]], [r["reward"]], yerr=[[r["reward"] - r["reward_low"]], [r["reward_high"] - r["reward"]]],
                    fmt="*", color="black", ms=14, label="SFT (reference)", zorder=5)
    if bon:
        ax.plot([b[1] for b in bon], [b[2] for b in bon], "s--", color="gray", ms=4, lw=1,
                label="best-of-N (reference)")
        for n, k, r in bon:
            ax.annotate(f"N={n}", (k, r), textcoords="offset points", xytext=(3, -10), fontsize=7, color="gray")
    if optimal:
        good = [o for o in optimal if not o.low_ess]
        low = [o for o in optimal if o.low_ess]
        ax.plot([o.kl for o in good], [o.reward for o in good], "-", color="black", lw=2,
                label="optimal π* ∝ π_ref·exp(r/β) (SNIS)")
        if low:
            ax.plot([o.kl for o in low], [o.reward for o in low], "o", mfc="none", color="black", ms=5,
                    label="optimal, low ESS")
    xmax = max([r["kl_high"] for r in rows] + [b[1] for b in bon] + [1e-3])
    ax.set_xlim(left=-0.02 * xmax, right=xmax * 1.08)
    ax.set_xlabel(f"KL(π ‖ π_ref) per sequence ({kl_key} estimate, nats)")
    ax.set_ylabel("mean reward")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    for suffix in ("png", "svg"):
        tmp = out / f".frontier.tmp.{suffix}"
        fig.savefig(tmp, dpi=150 if suffix == "png" else None, format=suffix)
        tmp.replace(out / f"frontier.{suffix}")
    plt.close(fig)


def _varying(rows: list[dict], params: dict[str, dict]) -> dict[str, str]:
    """Each row's hyperparameters that differ between the points of its objective (all of them for
    a lone point): the table stays readable; frontier.csv has the full set."""
    by_objective: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_objective[r["objective"]].append(r)
    shown = {}
    for pts in by_objective.values():
        own = [params.get(r["policy"], {}) for r in pts]
        keys = set().union(*own)
        varying = {k for k in keys if len({str(d.get(k)) for d in own}) > 1} if len(pts) > 1 else keys
        for r, d in zip(pts, own, strict=True):
            step = f"@{r['step']}" if r.get("step") is not None else ""
            shown[r["policy"]] = ",".join(f"{k}={d[k]}" for k in sorted(varying) if k in d) + step
    return shown


def _table(rows: list[dict], params: dict[str, dict], max_kl: float) -> None:
    table = Table(title="reward-vs-KL frontier", show_lines=False)
    for col in ("objective", "hyperparameters", "reward [95% CI]", "KL [95% CI]", "gap to optimal"):
        table.add_column(col, justify="right" if col != "objective" else "left")
    shown = _varying(rows, params)
    for r in sorted(rows, key=lambda r: (r["objective"] != "sft-reference", r["objective"], r["kl"])):
        gap = r["gap_to_optimal"]
        table.add_row(r["objective"], shown.get(r["policy"]) or "-",
                      f"{r['reward']:.3f} [{r['reward_low']:.3f}, {r['reward_high']:.3f}]",
                      f"{r['kl']:.3f} [{r['kl_low']:.3f}, {r['kl_high']:.3f}]",
                      f"{gap:+.3f}" if not math.isnan(gap) else
                      f"- (KL > {max_kl:.2f})" if not math.isnan(max_kl) else "-")
    console.print(table)
