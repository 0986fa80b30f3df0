"""`prefkit judge`: turn samples into numbers.

judge.task=
- score:   score every sampled policy (oracle, reward model or classifier) and estimate its KL to
           the reference from the per-sample log-probs the sample stage stored: k1 (log-ratio),
           k3, and the exact token-level KL; means with bootstrap CIs over prompts. -> summary.json
- label:   N >= 2 samples per prompt -> preference pairs (best vs worst, or Bradley–Terry sampled on
           the scores), with optional label noise -> pairs.jsonl, which `dataset=labeled` reads
           (the IMDB protocol of the DPO, EXO and TDPO papers).
- winrate: candidates' samples against a baseline (the SFT model, another policy, or the
           dataset's reference responses) with the scorer, or an LLM judge asked in both orders;
           ties count ½; bootstrap CI over prompts. -> winrates.json
- density: every aligned policy's log-probability of the reference's samples for a few prompts,
           with their rewards (EXO's density-ratio figure). -> density/<policy>.jsonl
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from prefkit import datasource, estimators
from prefkit.console import console
from prefkit.errors import UserError
from prefkit.rundir import (
    Job,
    job_input,
    require_job,
    run_dir,
    start_job,
    write_json,
    write_jsonl,
    write_lineage,
)
from prefkit.samplestore import read_samples
from prefkit.scoring import make_scorer


def sample_job(cfg: DictConfig, run: Path) -> Job:
    return require_job(run, "sample", cfg.judge.get("samples"), key="judge.samples",
                       how=f"prefkit sample run.name={cfg.run.name}")


def policy_index(job: Job) -> dict[str, dict]:
    return json.loads((job.path / "policies.json").read_text())


def samples_of(job: Job, entry: dict) -> list[dict]:
    """One policy's samples, checked complete; a damaged file names the command that redoes it."""
    try:
        return read_samples(Path(entry["samples"]).parent)
    except UserError as err:
        raise UserError(f"{err}; rerun `prefkit sample run.name={job.path.parent.parent.name} job={job.name}` "
                        "to sample it again") from None


def policy_samples(job: Job) -> dict[str, list[dict]]:
    return {key: samples_of(job, entry) for key, entry in policy_index(job).items()}


def run(cfg: DictConfig) -> None:
    run_path = run_dir(cfg)
    samples_job = sample_job(cfg, run_path)
    datasource.inherit(cfg, samples_job)  # the samples' data, unless told otherwise
    out = start_job(cfg)
    if out is None:
        return
    task = str(cfg.judge.task)
    if task not in TASKS:
        raise UserError(f"unknown judge.task '{task}'; valid: {', '.join(TASKS)}")
    inputs = {"samples": job_input(samples_job)}
    TASKS[task](cfg, out, run_path, samples_job, inputs)
    write_lineage(out, cfg, inputs)


def _file_key(policy: str) -> str:
    return policy.replace("/", "~")


# --- score --------------------------------------------------------------------------------------

def score(cfg: DictConfig, out: Path, run_path: Path, samples_job: Job, inputs: dict) -> None:
    fn, scorer_name = make_scorer(cfg, run_path, inputs)
    j = cfg.judge
    summary: dict = {"scorer": scorer_name, "samples_job": str(samples_job), "policies": {}}
    for key, entry in policy_index(samples_job).items():
        rows = samples_of(samples_job, entry)
        scores = fn([(r["prompt"], r["completion"]) for r in rows])
        scores_path = out / "scores" / f"{_file_key(key)}.jsonl"
        # per sample: what the frontier needs (reward, KL, and the log-ratio that weights samples toward π*)
        write_jsonl(scores_path, [{"prompt_id": r["prompt_id"], "sample": r["sample"], "score": s,
                                   **{k: r[k] for k in ("logp_policy", "logp_ref", "kl_exact") if k in r}}
                                  for r, s in zip(rows, scores, strict=True)])
        summary["policies"][key] = {**{k: v for k, v in entry.items() if k != "samples"},
                                    "scores": str(scores_path), **_policy_numbers(rows, scores, j)}
        reward, kls = summary["policies"][key]["reward"], summary["policies"][key]["kl"]
        kl_text = f", KL {kls['exact']['mean']:.3f}" if "exact" in kls else ""
        console.print(f"  {key}: reward {reward['mean']:.3f} [{reward['low']:.3f}, {reward['high']:.3f}]{kl_text}")
    summary["sampling"] = samples_job.lineage().get("sampling", {})
    write_json(out / "summary.json", summary)


def _policy_numbers(rows: list[dict], scores: list[float], j: DictConfig) -> dict:
    """Reward and KL estimates (CIs over prompts) and the samples' shape, for one policy."""
    prompt_ids = np.array([r["prompt_id"] for r in rows])
    reward = estimators.estimate(np.array(scores), groups=prompt_ids, n_boot=int(j.bootstrap), seed=int(j.seed))
    kls = {}
    if rows and "logp_policy" in rows[0]:
        kls = estimators.kl_estimates(np.array([r["logp_policy"] for r in rows]),
                                      np.array([r["logp_ref"] for r in rows]),
                                      np.array([r["kl_exact"] for r in rows]), prompt_ids=prompt_ids,
                                      seed=int(j.seed), n_boot=int(j.bootstrap))
    tokens = sum(r["n_tokens"] for r in rows)
    return {"reward": reward.__dict__, "kl": {k: v.__dict__ for k, v in kls.items()},
            "n_samples": len(rows), "n_prompts": len(set(prompt_ids.tolist())),
            "mean_tokens": tokens / len(rows), "finished": float(np.mean([r["finished"] for r in rows])),
            "forward_kl": float(np.mean([r.get("kl_forward", 0.0) for r in rows])),
            "entropy_per_token": sum(r.get("entropy", 0.0) for r in rows) / max(1, tokens)}


# --- label --------------------------------------------------------------------------------------

def label(cfg: DictConfig, out: Path, run_path: Path, samples_job: Job, inputs: dict) -> None:
    """Preference pairs from N >= 2 samples per prompt of one policy."""
    lab = cfg.judge.label
    index = policy_index(samples_job)
    key = lab.get("policy") or (next(iter(index)) if len(index) == 1 else None)
    if key is None or key not in index:
        raise UserError(f"{samples_job} holds samples of {', '.join(index)}; choose one with judge.label.policy=")
    if str(lab.mode) == "all" and float(lab.noise) > 0:
        raise UserError("judge.label.noise applies to pairs; mode=all keeps every sample with its score")
    rows = samples_of(samples_job, index[key])
    fn, scorer_name = make_scorer(cfg, run_path, inputs)
    scores = fn([(r["prompt"], r["completion"]) for r in rows])
    groups: dict[int, list[tuple[dict, float]]] = defaultdict(list)
    for r, s in zip(rows, scores, strict=True):
        groups[r["prompt_id"]].append((r, s))
    prompt_ids = sorted(groups)
    if any(len(groups[p]) < 2 for p in prompt_ids):
        raise UserError("labelling needs at least 2 samples per prompt; sample with sample.n=2 or more")
    rng = np.random.default_rng(int(cfg.judge.seed))
    picks = _picks(groups, prompt_ids, lab, rng)
    eval_ids = set(rng.permutation(prompt_ids)[: round(float(lab.eval_fraction) * len(prompt_ids))].tolist())
    pairs, skipped = [], 0
    for pid, pick in zip(prompt_ids, picks, strict=True):
        chosen = [groups[pid][i] for i in pick] if pick is not None else []
        if not chosen or any(not r["completion"].strip() for r, _ in chosen):
            skipped += 1
            continue
        pairs.append({"prompt_id": pid, "prompt": chosen[0][0]["prompt"],
                      "completions": [r["completion"] for r, _ in chosen], "rewards": [s for _, s in chosen],
                      "split": "eval" if pid in eval_ids else "train"})
    write_jsonl(out / "pairs.jsonl", pairs)
    n_eval = sum(p["split"] == "eval" for p in pairs)
    write_json(out / "summary.json", {"policy": key, "scorer": scorer_name, "mode": str(lab.mode),
                                      "noise": float(lab.noise), "pairs": len(pairs), "train": len(pairs) - n_eval,
                                      "eval": n_eval, "skipped_ties_or_empty": skipped})
    console.print(f"label: {len(pairs)} pairs ({n_eval} held out) from {key}; {skipped} prompts without a preference")


def _picks(groups: dict, prompt_ids: list[int], lab: DictConfig, rng) -> list[list[int] | None]:
    """Per prompt, the indices of the samples that make its row (best first), or None."""
    if str(lab.mode) == "all":  # the reward-labelled setting (EXO-rw, DPO-rw): every sample, best first
        orders = [sorted(range(len(groups[p])), key=lambda i, p=p: -groups[p][i][1]) for p in prompt_ids]
        return [order if groups[p][order[0]][1] > groups[p][order[-1]][1] else None
                for p, order in zip(prompt_ids, orders, strict=True)]
    pairs = estimators.label_pairs([[s for _, s in groups[p]] for p in prompt_ids], mode=str(lab.mode),
                                   noise=float(lab.noise), beta=float(lab.bt_beta), rng=rng)
    return [None if p is None else list(p) for p in pairs]


# --- winrate ------------------------------------------------------------------------------------

def winrate(cfg: DictConfig, out: Path, run_path: Path, samples_job: Job, inputs: dict) -> None:
    w = cfg.judge.winrate
    by_policy = policy_samples(samples_job)
    baseline, base_rows = _baseline(cfg, run_path, samples_job, by_policy)
    candidates = _candidates(w.candidates, by_policy, baseline, samples_job)
    base = defaultdict(list)
    for r in base_rows:
        base[r["prompt_id"]].append(r)
    judge = make_judge(cfg, run_path, inputs)
    results = {}
    for key in candidates:
        comparisons = _comparisons(by_policy[key], base, w)
        records = judge.compare(comparisons, out / "winrate" / f"{_file_key(key)}.jsonl")
        valid = [r for r in records if r["outcome"] is not None]
        if not valid:
            raise UserError(f"no valid comparisons for {key}: every verdict of the judge was unreadable "
                            f"(see {out / 'winrate'})")
        # comparisons of one prompt are correlated: the CI resamples prompts
        wr = estimators.win_rate(np.array([r["outcome"] for r in valid]), seed=int(cfg.judge.seed),
                                 prompt_ids=np.array([r["prompt_id"] for r in valid]),
                                 n_boot=int(cfg.judge.bootstrap))
        invalid = len(records) - len(valid)
        results[key] = {**wr.__dict__, "invalid": invalid, "position_consistency": judge.consistency(valid),
                        "baseline": baseline, "judge": judge.name, "comparisons": len(comparisons)}
        console.print(f"  {key} vs {baseline}: win rate {wr.rate:.3f} [{wr.low:.3f}, {wr.high:.3f}] ({wr.wins} W / "
                      f"{wr.ties} T / {wr.losses} L" + (f", {invalid} invalid" if invalid else "") + ")")
    write_json(out / "winrates.json", {"baseline": baseline, "judge": judge.name, "answered_by": judge.answered_by(),
                                       "settings": OmegaConf.to_container(w, resolve=True), "results": results})


def _as_list(value) -> list[str] | str:
    """A list option given as a list, or a single string (one item, or 'all')."""
    if isinstance(value, str):
        return value if value == "all" else [value]
    return [str(v) for v in value]


def _candidates(wanted, by_policy: dict, baseline: str, samples_job: Job) -> list[str]:
    wanted = _as_list(wanted)
    candidates = [k for k in by_policy if k != baseline] if wanted == "all" else wanted
    for key in candidates:
        if key not in by_policy:
            raise UserError(f"no samples of '{key}' in {samples_job}; it has: {', '.join(by_policy)}")
    return candidates


def _baseline(cfg: DictConfig, run_path: Path, samples_job: Job, by_policy: dict) -> tuple[str, list[dict]]:
    """The baseline's name and rows: the run's SFT policy, the dataset's reference responses, or a policy."""
    baseline = str(cfg.judge.winrate.baseline)
    if baseline == "sft":
        sft_keys = [k for k in by_policy if k.startswith("sft/")]
        if len(sft_keys) != 1:
            raise UserError(f"baseline=sft needs exactly one sft policy in {samples_job}; name one with "
                            "judge.winrate.baseline=<policy>")
        baseline = sft_keys[0]
    if baseline in by_policy:
        return baseline, by_policy[baseline]
    if baseline != "dataset":
        raise UserError(f"unknown baseline '{baseline}'; valid: sft, dataset, {', '.join(by_policy)}")
    from prefkit.datasets import load_rows
    from prefkit.models import load_tokenizer

    split = str(samples_job.config.sample.split)
    first = next(iter(policy_index(samples_job).values()))
    refs = load_rows(cfg.dataset, "prompts", split, run_path, load_tokenizer(first["path"]))
    if not all("reference" in r for r in refs):
        raise UserError(f"dataset {cfg.dataset.name} has no reference responses for baseline=dataset")
    return baseline, [{"prompt_id": i, "sample": 0, "prompt": r["prompt"], "completion": r["reference"]}
                      for i, r in enumerate(refs)]


def _comparisons(cand: list[dict], base: dict[int, list[dict]], w: DictConfig) -> list[tuple[dict, dict]]:
    """(candidate row, baseline row) pairs: sample 0 against baseline sample 0, or every × every."""
    cand = [r for r in cand if r["prompt_id"] in base]
    if w.get("max_prompts"):
        keep = set(sorted({r["prompt_id"] for r in cand})[: int(w.max_prompts)])
        cand = [r for r in cand if r["prompt_id"] in keep]
    every = str(w.pairs) == "all"
    if not every:
        cand = [r for r in cand if r["sample"] == 0]
    return [(r, b) for r in cand for b in (base[r["prompt_id"]] if every else base[r["prompt_id"]][:1])]


class ScorerJudge:
    """A reward judge: the candidate wins when its score is higher (ties within tie_tol)."""

    def __init__(self, fn, name: str, tie_tol: float):
        self.fn, self.name, self.tie_tol = fn, name, tie_tol

    def compare(self, comparisons: list[tuple[dict, dict]], path: Path) -> list[dict]:
        cs = self.fn([(r["prompt"], r["completion"]) for r, _ in comparisons])
        bs = self.fn([(b["prompt"], b["completion"]) for _, b in comparisons])
        outcomes = estimators.reward_judge_outcomes(np.array(cs), np.array(bs), tie_tol=self.tie_tol)
        records = [{"prompt_id": r["prompt_id"], "sample": r["sample"], "baseline_sample": b["sample"],
                    "outcome": float(o), "candidate_score": c, "baseline_score": s}
                   for (r, b), o, c, s in zip(comparisons, outcomes, cs, bs, strict=True)]
        write_jsonl(path, records)
        return records

    def consistency(self, records: list[dict]) -> None:
        return None

    def answered_by(self) -> list[str]:
        return [self.name]


class LLMJudge:
    """An LLM asked twice per comparison, positions swapped. Each verdict pair is appended to
    <path>.partial as soon as it arrives, so a judge that gives up (or a kill) loses nothing:
    rerunning the command continues where it stopped."""

    def __init__(self, cfg: DictConfig):
        from prefkit.llmjudge import make_backend, template_from

        self.template = template_from(cfg.judge_template)
        self.backend = make_backend(cfg.judge.llm, "cuda" if str(cfg.hardware.device).startswith("cuda") else "cpu")
        self.name = f"llm:{cfg.judge.llm.backend}:{cfg.judge.llm.get('model') or ''}"
        self.rule = str(cfg.judge.winrate.tie_rule)

    def compare(self, comparisons: list[tuple[dict, dict]], path: Path) -> list[dict]:
        from prefkit.llmjudge import judge_both_orders

        partial = path.with_name(path.name + ".partial")
        done = {(r["prompt_id"], r["sample"], r["baseline_sample"]): r for r in _read_whole_lines(partial)}
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "a") as f:
            for r, b in comparisons:
                key = (r["prompt_id"], r["sample"], b["sample"])
                if key in done:
                    continue
                first, second, texts = judge_both_orders(self.backend, self.template, r["prompt"], r["completion"],
                                                         b["completion"], done=len(done))
                done[key] = {"prompt_id": r["prompt_id"], "sample": r["sample"], "baseline_sample": b["sample"],
                             "verdict_a": first, "verdict_b": second, "judge_texts": texts}
                f.write(json.dumps(done[key]) + "\n")
                f.flush()
        records = [done[(r["prompt_id"], r["sample"], b["sample"])] for r, b in comparisons]
        for rec in records:
            pair = (rec["verdict_a"], rec["verdict_b"])
            rec["outcome"] = None if None in pair else float(
                estimators.combine_two_orders([pair[0]], [pair[1]], rule=self.rule)[0])
        write_jsonl(path, records)
        partial.unlink()
        return records

    def consistency(self, records: list[dict]) -> float:
        return float(estimators.position_consistency([r["verdict_a"] for r in records],
                                                     [r["verdict_b"] for r in records]))

    def answered_by(self) -> list[str]:
        return sorted(getattr(self.backend, "models_seen", set())) or [self.name]


def _read_whole_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: that comparison is asked again
            break
    return rows


def make_judge(cfg: DictConfig, run_path: Path, inputs: dict) -> ScorerJudge | LLMJudge:
    kind = str(cfg.judge.winrate.judge)
    if kind == "scorer":
        fn, name = make_scorer(cfg, run_path, inputs)
        return ScorerJudge(fn, name, float(cfg.judge.winrate.tie_tol))
    if kind == "llm":
        return LLMJudge(cfg)
    raise UserError(f"unknown judge.winrate.judge '{kind}'; valid: scorer, llm")


# --- density ------------------------------------------------------------------------------------

def density(cfg: DictConfig, out: Path, run_path: Path, samples_job: Job, inputs: dict) -> None:
    """For a few prompts, every aligned policy's log-probability of the reference's own samples, with
    their rewards: the data of EXO's density-ratio figure (Ji et al. 2024, Fig. 3), where π/π_ref is
    compared with the optimal ratio exp(r/β)/Z along the reference's samples."""
    import torch

    from prefkit.data import Encoded, collate, encode_prompts
    from prefkit.models import freeze, load_causal_lm, load_tokenizer
    from prefkit.modules import sequence_stats

    d = cfg.judge.density
    index = policy_index(samples_job)
    ref_key = next((k for k, e in index.items() if e.get("objective") == "sft-reference"), None)
    if ref_key is None:
        raise UserError(f"{samples_job} has no samples of the SFT model (the reference); sample it too")
    ref_rows = samples_of(samples_job, index[ref_key])
    prompts = sorted({r["prompt_id"] for r in ref_rows})[: int(d.prompts)]
    rows = [r for r in ref_rows if r["prompt_id"] in set(prompts)]
    fn, scorer_name = make_scorer(cfg, run_path, inputs)
    rewards = fn([(r["prompt"], r["completion"]) for r in rows])
    tok = load_tokenizer(index[ref_key]["path"])
    by_id = {r["prompt_id"]: {"prompt": r["prompt"]} for r in rows}
    encoded = dict(encode_prompts(tok, [by_id[p] for p in prompts], samples_job.config.dataset))
    seqs = [Encoded(tuple(encoded[prompts.index(r["prompt_id"])]) + tuple(r["completion_ids"]),
                    len(encoded[prompts.index(r["prompt_id"])])) for r in rows]
    policies = [k for k, e in index.items() if e.get("stage") == "align"]
    for key in policies:
        model = freeze(load_causal_lm(index[key]["path"]))
        logps: list[float] = []
        with torch.no_grad():
            for start in range(0, len(seqs), 64):
                batch = collate(seqs[start:start + 64], tok.pad_token_id)
                logps += sequence_stats(model, **batch, recompute=False).logps.tolist()
        write_jsonl(out / "density" / f"{_file_key(key)}.jsonl",
                    [{"prompt_id": r["prompt_id"], "sample": r["sample"], "logp_ref": r["logp_ref"], "logp_policy": lp,
                      "reward": rw} for r, lp, rw in zip(rows, logps, rewards, strict=True)])
    write_json(out / "summary.json", {"task": "density", "scorer": scorer_name, "reference": ref_key,
                                      "prompts": prompts, "samples_per_prompt": len(rows) // max(1, len(prompts)),
                                      "aligned": policies})
    console.print(f"density: {len(policies)} policies on {len(rows)} reference samples of {len(prompts)} prompts")


TASKS = {"score": score, "label": label, "winrate": winrate, "density": density}
