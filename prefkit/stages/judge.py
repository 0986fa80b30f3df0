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
           ties count ½; bootstrap CI. -> winrates.json
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from prefkit import estimators
from prefkit.console import console
from prefkit.errors import UserError
from prefkit.rundir import (
    Job,
    job_input,
    read_jsonl,
    require_job,
    run_dir,
    start_job,
    write_json,
    write_jsonl,
    write_lineage,
)
from prefkit.scoring import make_scorer


def sample_job(cfg: DictConfig, run: Path) -> Job:
    return require_job(run, "sample", cfg.judge.get("samples"), key="judge.samples",
                       how=f"prefkit sample run.name={cfg.run.name}")


def policy_samples(job: Job) -> dict[str, list[dict]]:
    index = json.loads((job.path / "policies.json").read_text())
    return {key: read_jsonl(Path(entry["samples"])) for key, entry in index.items()}


def run(cfg: DictConfig) -> None:
    out = start_job(cfg)
    if out is None:
        return
    run_path = run_dir(cfg)
    task = str(cfg.judge.task)
    samples_job = sample_job(cfg, run_path)
    inputs = {"samples": job_input(samples_job)}
    if task == "score":
        score(cfg, out, run_path, samples_job, inputs)
    elif task == "label":
        label(cfg, out, run_path, samples_job, inputs)
    elif task == "winrate":
        winrate(cfg, out, run_path, samples_job, inputs)
    else:
        raise UserError(f"unknown judge.task '{task}'; valid: score, label, winrate")
    write_lineage(out, cfg, inputs)


def score(cfg: DictConfig, out: Path, run_path: Path, samples_job: Job, inputs: dict) -> None:
    fn, scorer_name = make_scorer(cfg, run_path, inputs)
    index = json.loads((samples_job.path / "policies.json").read_text())
    j = cfg.judge
    summary: dict = {"scorer": scorer_name, "samples_job": str(samples_job), "policies": {}}
    sampling = samples_job.lineage().get("sampling", {})
    for key, entry in index.items():
        rows = read_jsonl(Path(entry["samples"]))
        scores = fn([(r["prompt"], r["completion"]) for r in rows])
        write_jsonl(out / "scores" / f"{key.replace('/', '~')}.jsonl",
                    [{"prompt_id": r["prompt_id"], "sample": r["sample"], "score": s} for r, s in zip(rows, scores,
                                                                                                    strict=True)])
        prompt_ids = np.array([r["prompt_id"] for r in rows])
        reward = estimators.estimate(np.array(scores), groups=prompt_ids, n_boot=int(j.bootstrap), seed=int(j.seed))
        kls = {}
        if rows and "logp_policy" in rows[0]:
            kls = estimators.kl_estimates(np.array([r["logp_policy"] for r in rows]),
                                          np.array([r["logp_ref"] for r in rows]),
                                          np.array([r["kl_exact"] for r in rows]), prompt_ids=prompt_ids,
                                          seed=int(j.seed))
        summary["policies"][key] = {
            **{k: v for k, v in entry.items() if k != "samples"},
            "scores": str(out / "scores" / f"{key.replace('/', '~')}.jsonl"),
            "reward": reward.__dict__, "kl": {k: v.__dict__ for k, v in kls.items()},
            "n_samples": len(rows), "n_prompts": len(set(prompt_ids.tolist())),
            "mean_tokens": float(np.mean([r["n_tokens"] for r in rows])) if rows else 0.0,
            "finished": float(np.mean([r["finished"] for r in rows])) if rows else 0.0,
            "forward_kl": float(np.mean([r.get("kl_forward", 0.0) for r in rows])) if rows else 0.0,
            "entropy_per_token": float(sum(r.get("entropy", 0.0) for r in rows) / max(1, sum(
                r["n_tokens"] for r in rows))),
        }
        kl_text = f", KL {kls['exact'].mean:.3f}" if "exact" in kls else ""
        console.print(f"  {key}: reward {reward.mean:.3f} [{reward.low:.3f}, {reward.high:.3f}]{kl_text}")
    summary["sampling"] = sampling
    write_json(out / "summary.json", summary)


def label(cfg: DictConfig, out: Path, run_path: Path, samples_job: Job, inputs: dict) -> None:
    """Preference pairs from N >= 2 samples per prompt of one policy."""
    lab = cfg.judge.label
    by_policy = policy_samples(samples_job)
    key = lab.get("policy") or (next(iter(by_policy)) if len(by_policy) == 1 else None)
    if key is None or key not in by_policy:
        raise UserError(f"{samples_job} holds samples of {', '.join(by_policy)}; choose one with judge.label.policy=")
    rows = by_policy[key]
    fn, scorer_name = make_scorer(cfg, run_path, inputs)
    scores = fn([(r["prompt"], r["completion"]) for r in rows])
    groups: dict[int, list[tuple[dict, float]]] = defaultdict(list)
    for r, s in zip(rows, scores, strict=True):
        groups[r["prompt_id"]].append((r, s))
    prompt_ids = sorted(groups)
    if any(len(groups[p]) < 2 for p in prompt_ids):
        raise UserError("labelling needs at least 2 samples per prompt; sample with sample.n=2 or more")
    rng = np.random.default_rng(int(cfg.judge.seed))
    if str(lab.mode) == "all" and float(lab.noise) > 0:
        raise UserError("judge.label.noise applies to pairs; mode=all keeps every sample with its score")
    if str(lab.mode) == "all":  # the reward-labelled setting (EXO-rw, DPO-rw): every sample, best first
        picks = [sorted(range(len(groups[p])), key=lambda i, p=p: -groups[p][i][1]) for p in prompt_ids]
        picks = [order if groups[p][order[0]][1] > groups[p][order[-1]][1] else None
                 for p, order in zip(prompt_ids, picks, strict=True)]
    else:
        picks = estimators.label_pairs([[s for _, s in groups[p]] for p in prompt_ids], mode=str(lab.mode),
                                       noise=float(lab.noise), beta=float(lab.bt_beta), rng=rng)
    eval_ids = set(rng.permutation(prompt_ids)[: round(float(lab.eval_fraction) * len(prompt_ids))].tolist())
    pairs, skipped = [], 0
    for pid, pick in zip(prompt_ids, picks, strict=True):
        if pick is None:
            skipped += 1
            continue
        chosen = [groups[pid][i] for i in pick]
        if any(not r["completion"].strip() for r, _ in chosen):
            skipped += 1
            continue
        pairs.append({"prompt_id": pid, "prompt": chosen[0][0]["prompt"],
                      "completions": [r["completion"] for r, _ in chosen], "rewards": [s for _, s in chosen],
                      "split": "eval" if pid in eval_ids else "train"})
    write_jsonl(out / "pairs.jsonl", pairs)
    n_eval = sum(p["split"] == "eval" for p in pairs)
    summary = {"policy": key, "scorer": scorer_name, "mode": str(lab.mode), "noise": float(lab.noise),
               "pairs": len(pairs), "train": len(pairs) - n_eval, "eval": n_eval, "skipped_ties_or_empty": skipped}
    write_json(out / "summary.json", summary)
    console.print(f"label: {len(pairs)} pairs ({n_eval} held out) from {key}; {skipped} prompts without a preference")


def winrate(cfg: DictConfig, out: Path, run_path: Path, samples_job: Job, inputs: dict) -> None:
    w = cfg.judge.winrate
    by_policy = policy_samples(samples_job)
    baseline = str(w.baseline)
    if baseline == "sft":
        sft_keys = [k for k in by_policy if k.startswith("sft/")]
        if len(sft_keys) != 1:
            raise UserError(f"baseline=sft needs exactly one sft policy in {samples_job}; name one with "
                            "judge.winrate.baseline=<policy>")
        baseline = sft_keys[0]
    if baseline == "dataset":
        from prefkit.datasets import load_rows
        from prefkit.models import load_tokenizer

        split = str(samples_job.config().sample.split)
        first = next(iter(json.loads((samples_job.path / "policies.json").read_text()).values()))
        refs = load_rows(cfg.dataset, "prompts", split, run_path, load_tokenizer(first["path"]))
        if not all("reference" in r for r in refs):
            raise UserError(f"dataset {cfg.dataset.name} has no reference responses for baseline=dataset")
        base_rows = [{"prompt_id": i, "sample": 0, "prompt": r["prompt"], "completion": r["reference"]}
                     for i, r in enumerate(refs)]
    elif baseline in by_policy:
        base_rows = by_policy[baseline]
    else:
        raise UserError(f"unknown baseline '{baseline}'; valid: sft, dataset, {', '.join(by_policy)}")
    wanted = w.candidates
    candidates = [k for k in by_policy if k != baseline] if str(wanted) == "all" else [str(k) for k in wanted]
    for key in candidates:
        if key not in by_policy:
            raise UserError(f"no samples of '{key}' in {samples_job}")
    base = defaultdict(list)
    for r in base_rows:
        base[r["prompt_id"]].append(r)
    judge_kind = str(w.judge)
    fn = call = template = None
    if judge_kind == "scorer":
        fn, judge_name = make_scorer(cfg, run_path, inputs)
    elif judge_kind == "llm":
        from prefkit.llmjudge import judge_both_orders, make_backend, template_from

        template = template_from(cfg.judge_template)
        call = make_backend(cfg.judge.llm, "cuda" if str(cfg.hardware.device).startswith("cuda") else "cpu")
        judge_name = f"llm:{cfg.judge.llm.backend}:{cfg.judge.llm.get('model') or ''}"
    else:
        raise UserError(f"unknown judge.winrate.judge '{judge_kind}'; valid: scorer, llm")
    results = {}
    for key in candidates:
        cand = [r for r in by_policy[key] if r["prompt_id"] in base]
        if w.get("max_prompts"):
            keep = sorted({r["prompt_id"] for r in cand})[: int(w.max_prompts)]
            cand = [r for r in cand if r["prompt_id"] in set(keep)]
        if str(w.pairs) == "first":
            cand = [r for r in cand if r["sample"] == 0]
        comparisons = [(r, b) for r in cand for b in (base[r["prompt_id"]] if str(w.pairs) == "all"
                                                      else base[r["prompt_id"]][:1])]
        records, consistency = [], None
        if fn is not None:
            cs = fn([(r["prompt"], r["completion"]) for r, _ in comparisons])
            bs = fn([(b["prompt"], b["completion"]) for _, b in comparisons])
            outcomes = estimators.reward_judge_outcomes(np.array(cs), np.array(bs), tie_tol=float(w.tie_tol))
            for (r, b), o, c, s in zip(comparisons, outcomes, cs, bs, strict=True):
                records.append({"prompt_id": r["prompt_id"], "sample": r["sample"], "baseline_sample": b["sample"],
                                "outcome": float(o), "candidate_score": c, "baseline_score": s})
            valid = list(outcomes)
            valid_prompts = [r["prompt_id"] for r, _ in comparisons]
            invalid = 0
        else:
            firsts, seconds = [], []
            for r, b in comparisons:
                v1, v2, texts = judge_both_orders(call, template, r["prompt"], r["completion"], b["completion"])
                records.append({"prompt_id": r["prompt_id"], "sample": r["sample"], "verdict_a": v1, "verdict_b": v2,
                                "judge_texts": texts})
                firsts.append(v1)
                seconds.append(v2)
            ok = [i for i, (a, b) in enumerate(zip(firsts, seconds, strict=True)) if a is not None and b is not None]
            pairs_ok = [(firsts[i], seconds[i]) for i in ok]
            valid_prompts = [comparisons[i][0]["prompt_id"] for i in ok]
            invalid = len(firsts) - len(pairs_ok)
            valid_first = np.array([a for a, _ in pairs_ok])
            valid_second = np.array([b for _, b in pairs_ok])
            valid = list(estimators.combine_two_orders(valid_first, valid_second, rule=str(w.tie_rule))) \
                if pairs_ok else []
            consistency = float(estimators.position_consistency(valid_first, valid_second)) if pairs_ok else None
        if not valid:
            raise UserError(f"no valid comparisons for {key}")
        # comparisons of one prompt are correlated: the CI resamples prompts
        wr = estimators.win_rate(np.array(valid), seed=int(cfg.judge.seed), prompt_ids=np.array(valid_prompts),
                                 n_boot=int(cfg.judge.bootstrap))
        results[key] = {**wr.__dict__, "invalid": invalid, "position_consistency": consistency,
                        "baseline": baseline, "judge": judge_name, "comparisons": len(comparisons)}
        write_jsonl(out / "winrate" / f"{key.replace('/', '~')}.jsonl", records)
        console.print(f"  {key} vs {baseline}: win rate {wr.rate:.3f} ({wr.wins} W / {wr.ties} T / {wr.losses} L"
                      + (f", {invalid} invalid" if invalid else "") + ")")
    write_json(out / "winrates.json", {"baseline": baseline, "judge": judge_name,
                                       "settings": OmegaConf.to_container(w, resolve=True), "results": results})
