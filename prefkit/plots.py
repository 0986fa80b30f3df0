"""The figures a run's comparison is read from (matplotlib, Agg): the reward-vs-KL frontier and
the training curves. One colour per series everywhere (`colours`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from prefkit import estimators
from prefkit.comparison import REFERENCE, Optimal, Series


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colours(labels: list[str]) -> dict[str, tuple]:
    """A fixed colour per series label (sorted), tab10 or tab20."""
    plt = _pyplot()
    names = sorted(labels)
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def kl_scale(setting: str, all_series: list[Series]) -> str:
    """linear or log; auto: log when the aligned points' KLs span more than a decade."""
    if setting in ("linear", "log"):
        return setting
    kls = [p.kl.mean for s in all_series if s.objective != REFERENCE for p in s.points if p.kl.mean > 0]
    return "log" if kls and max(kls) / min(kls) > 10 else "linear"


def frontier(all_series: list[Series], opt: Optimal | None, bon: list, out: Path, title: str, kl_label: str,
             scale: str) -> None:
    """frontier.png and frontier.svg: per series its seed-aggregated points (CIs on both axes,
    labelled with their swept values), each seed's point faint behind them, its upper envelope;
    the SFT model; best-of-N; the optimal frontier (hollow where its estimate is unreliable)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11.5, 6.5))
    aligned = [s for s in all_series if s.objective != REFERENCE]
    colour = colours([s.label for s in aligned])
    for s in aligned:
        _series(ax, s, colour[s.label])
    for s in all_series:
        if s.objective == REFERENCE:
            r = s.points[0].reward
            ax.errorbar([s.points[0].kl.mean], [r.mean], yerr=[[r.mean - r.low], [r.high - r.mean]], fmt="*",
                        color="black", ms=14, label="SFT (reference)", zorder=5)
    if bon:
        ax.plot([b[1] for b in bon], [b[2] for b in bon], "s--", color="gray", ms=4, lw=1,
                label="best-of-N (reference)")
        for n, k, r in bon:
            ax.annotate(f"N={n}", (k, r), textcoords="offset points", xytext=(3, -10), fontsize=7, color="gray")
    if opt is not None:
        _optimal(ax, opt)
    seeds = sorted({len(p.runs) for s in aligned for p in s.points})
    note = f"{seeds[0]} seed{'s' if seeds[0] > 1 else ''} per point" if len(seeds) == 1 else \
        f"{min(seeds)}–{max(seeds)} seeds per point"
    ax.set_title(f"{title}\n{note}; CIs resample seeds and prompts", fontsize=10)
    if scale == "log":
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlim(left=-0.02)
    else:
        ax.set_xlim(left=-0.02 * max(1e-3, ax.get_xlim()[1]))
    ax.set_xlabel(f"KL(π ‖ π_ref) per sequence ({kl_label} estimate, nats){', symlog' if scale == 'log' else ''}")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    _save(fig, out, "frontier")


def _series(ax, s: Series, colour) -> None:
    for p in s.points:
        if len(p.runs) > 1:  # each seed, faint, behind its mean
            ax.plot([float(r.kl.mean()) for r in p.runs], [float(r.reward.mean()) for r in p.runs], "o", color=colour,
                    ms=3, alpha=0.3, zorder=2)
    kl = np.array([p.kl.mean for p in s.points])
    rw = np.array([p.reward.mean for p in s.points])
    ax.errorbar(kl, rw, xerr=[kl - [p.kl.low for p in s.points], [p.kl.high for p in s.points] - kl],
                yerr=[rw - [p.reward.low for p in s.points], [p.reward.high for p in s.points] - rw],
                fmt="o", color=colour, ms=5, capsize=2, alpha=0.9, label=s.label, zorder=3)
    for p in s.points:
        if p.label:
            ax.annotate(p.label, (p.kl.mean, p.reward.mean), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=colour)
    env = estimators.upper_envelope(list(zip(kl.tolist(), rw.tolist(), strict=True)))
    if len(env) > 1:
        ax.plot([e[0] for e in env], [e[1] for e in env], "-", color=colour, lw=1.5, alpha=0.8)


def _optimal(ax, opt: Optimal) -> None:
    good = [o for o in opt.points if not o.low_ess and math.isfinite(o.kl)]
    low = [o for o in opt.points if o.low_ess]
    curve = opt.curve()
    if len(curve):
        ax.plot(curve[:, 0], curve[:, 1], "-", color="black", lw=2, label="optimal π* ∝ π_ref·exp(r/β) (SNIS)")
    if good:
        ax.plot([o.kl for o in good], [o.reward for o in good], ".", color="black", ms=3)
    if low:
        ax.plot([o.kl for o in low], [o.reward for o in low], "o", mfc="none", color="black", ms=5,
                label="optimal, low ESS (not trusted)")


def _save(fig, out: Path, name: str) -> None:
    plt = _pyplot()
    for suffix in ("png", "svg"):
        tmp = out / f".{name}.tmp.{suffix}"
        fig.savefig(tmp, dpi=150 if suffix == "png" else None, format=suffix)
        tmp.replace(out / f"{name}.{suffix}")
    plt.close(fig)


# Which training metrics each objective's panels show (beyond loss and TRL's reward metrics).
CURVES = {
    "default": ["loss", "rewards/margins", "rewards/accuracies", "eval_loss"],
    "tdpo1": ["loss", "rewards/margins", "kl/chosen", "kl/rejected"],
    "tdpo2": ["loss", "rewards/margins", "kl/chosen", "kl/rejected"],
    "edpo": ["loss", "rewards/margins", "beta", "kl/p_epsilon_steps", "kl/n_epsilon_steps"],
    "drdo": ["loss", "drdo/kd", "drdo/pref", "drdo/rhat_acc"],
}


def training_curves(label: str, objective: str, points: dict[str, list[list[dict]]], colour, out: Path,
                    name: str) -> list[str]:
    """One figure for a series: a panel per metric, a line per point (the mean over its seeds, the
    seeds' range shaded), in the series' colour, line styles telling the points apart. Returns the
    metrics drawn."""
    plt = _pyplot()
    metrics = [m for m in CURVES.get(objective, CURVES["default"])
               if any(m in row for seeds in points.values() for rows in seeds for row in rows)]
    if not metrics:
        return []
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.0), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for j, (point, seeds) in enumerate(sorted(points.items())):
        for ax, metric in zip(axes[0], metrics, strict=True):
            series = [{r["step"]: r[metric] for r in rows if metric in r} for rows in seeds]
            steps = sorted(set.intersection(*[set(s) for s in series])) if series else []
            if not steps:
                continue
            values = np.array([[s[t] for t in steps] for s in series])
            ax.plot(steps, values.mean(0), styles[j % len(styles)], marker="o" if len(steps) < 3 else None, ms=3,
                    color=colour, lw=1.4, label=point or label)
            if len(series) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.15, lw=0)
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if len(points) > 1:  # one line per panel needs no legend: the title names it
        axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{label}: mean over seeds (shaded: their range)", fontsize=10)
    fig.tight_layout()
    _save(fig, out, name)
    return metrics


def matched_kl(matched: list[dict], out: Path, name: str) -> None:
    """A panel per pair of series: reward of A − B against KL, with its CI band."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(matched), figsize=(3.8 * len(matched), 3.0), squeeze=False)
    for ax, m in zip(axes[0], matched, strict=True):
        grid = np.array(m["grid"])
        ax.fill_between(grid, m["low"], m["high"], color="tab:blue", alpha=0.2, lw=0)
        ax.plot(grid, m["diff"], color="tab:blue", lw=1.5)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(f"{m['a']} − {m['b']}", fontsize=9)
        ax.set_xlabel("KL", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("reward difference", fontsize=8)
    fig.tight_layout()
    _save(fig, out, name)
