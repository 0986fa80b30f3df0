"""Grouping judged policies into points and series, and the comparisons built on them
(prefkit.comparison), on synthetic runs whose answers are known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prefkit import comparison
from prefkit.comparison import Run
from prefkit.errors import UserError

P = 20


def run(objective="dpo", beta=0.1, seed=0, reward=1.0, kl=1.0, step=None, judge="eval", **setting) -> Run:
    base = {"objective.name": objective, "objective.beta": beta, "train.max_steps": None, "peft.method": "none",
            **setting}
    return Run(key=f"align/{objective}_{beta}_{seed}_{setting}", objective=objective,
               params={"beta": beta}, seed=seed, step=step, setting=base, judge_job=judge,
               prompt_ids=np.arange(P), reward=np.full(P, reward), kl=np.full(P, kl),
               sample_rewards=[[reward]] * P, sample_log_ratios=[[kl]] * P)


def test_seeds_make_one_point_and_other_settings_another_series():
    runs = [run(beta=b, seed=s, reward=1 + s * 0.1) for b in (0.1, 0.5) for s in (0, 1, 2)]
    runs += [run(beta=0.1, seed=0, **{"peft.method": "lora"}), run(beta=0.1, seed=0, **{"train.max_steps": 30})]
    series = comparison.group(runs)
    by_label = {s.label: s for s in series}
    assert set(by_label) == {"dpo (method=none, max_steps=None)", "dpo (method=lora, max_steps=None)",
                             "dpo (method=none, max_steps=30)"}
    main = by_label["dpo (method=none, max_steps=None)"]
    assert sorted(p.label for p in main.points) == ["beta=0.1", "beta=0.5"]
    assert all(sorted(p.seeds) == [0, 1, 2] for p in main.points)
    comparison.aggregate(series)
    point = next(p for p in main.points if p.label == "beta=0.1")
    assert point.reward.mean == pytest.approx(1.1) and point.reward.n_seeds == 3
    assert point.reward.low < 1.1 < point.reward.high  # the seeds differ: the CI says so


def test_single_point_series_name_only_what_differs():
    """Series of one point each (one setting per label-noise level, say): no label repeats the
    hyperparameters they all share, and series keys that end alike are told apart."""
    runs = [run(beta=0.1, seed=s, **{"dataset.job": d, "rewards.job": r})
            for d, r in (("n0", "o0"), ("n4", "o4")) for s in (0, 1)]
    series = comparison.group(runs)
    assert sorted(s.label for s in series) == ["dpo (dataset.job=n0, rewards.job=o0)",
                                               "dpo (dataset.job=n4, rewards.job=o4)"]
    assert [p.label for s in series for p in s.points] == ["", ""]
    # one point per series, but the objective's points differ in β: β names them
    other = comparison.group([run(beta=0.1, **{"dataset.job": "n0"}), run(beta=0.3, **{"dataset.job": "n4"})])
    assert sorted(p.label for s in other for p in s.points) == ["beta=0.1", "beta=0.3"]


def test_one_setting_and_seed_judged_twice_cannot_be_grouped():
    with pytest.raises(UserError, match=r"judge/eval\) and .*judge/again\) are one setting and seed \(0\)"):
        comparison.group([run(judge="again"), run(judge="eval")])


def test_policies_sampled_on_other_prompts_cannot_be_compared():
    other = run(seed=1)
    other.prompt_ids = other.prompt_ids + 100
    series = comparison.group([run(), other])
    with pytest.raises(UserError, match="sampled on other prompts"):
        comparison.aggregate(series)


def test_matched_kl_is_exact_on_linear_envelopes():
    """A: R = 1 + 0.5·k at k ∈ {0.5, 1.5, 2.5}; B: R = 0.8 + 0.5·k at k ∈ {1, 2, 3}: on their common
    range [1, 2.5] the difference is 0.2 at every grid point (the envelopes are linear between
    their points), with no noise a zero-width CI, and A is above B everywhere."""
    a_kls, b_kls = {1: 0.5, 2: 1.5, 3: 2.5}, {1: 1.0, 2: 2.0, 3: 3.0}
    runs = [run("a", beta=b, seed=s, reward=1 + 0.5 * k, kl=k) for s in (0, 1) for b, k in a_kls.items()]
    runs += [run("b", beta=b, seed=s, reward=0.8 + 0.5 * k, kl=k) for s in (0, 1) for b, k in b_kls.items()]
    series = comparison.group(runs)
    comparison.aggregate(series)
    (m,) = comparison.all_matched(series, n_grid=7, n_boot=60, seed=0)
    assert m.grid[0] == pytest.approx(1.0) and m.grid[-1] == pytest.approx(2.5)
    np.testing.assert_allclose(m.diff, 0.2, atol=1e-12)
    np.testing.assert_allclose(m.low, 0.2, atol=1e-9)
    assert m.mean[0] == pytest.approx(0.2)
    assert m.verdict() == "a above for KL in [1.00, 2.50]"


def test_no_matched_kl_without_a_common_range():
    runs = [run("a", beta=b, reward=1 + k, kl=k) for b, k in ((1, 0.5), (2, 1.0))]
    runs += [run("b", beta=b, reward=1 + k, kl=k) for b, k in ((1, 2.0), (2, 3.0))]
    series = comparison.group(runs)
    comparison.aggregate(series)
    assert comparison.all_matched(series, 5, 20, 0) == []


def test_judge_jobs_with_different_scorers_clash(tmp_path):
    from prefkit.stages.frontier import gather

    for name, scorer in (("eval", "oracle"), ("rm", "reward_model:reward/bt")):
        (tmp_path / "judge" / name).mkdir(parents=True)
        (tmp_path / "judge" / name / "lineage.json").write_text("{}")
        (tmp_path / "judge" / name / "summary.json").write_text(json.dumps({"scorer": scorer, "policies": {}}))
    with pytest.raises(UserError, match=r"judge/eval: scorer oracle; judge/rm: scorer reward_model:reward/bt; choose"):
        gather(tmp_path, None)
    assert gather(tmp_path, "rm")[1]["scorer"] == "reward_model:reward/bt"
