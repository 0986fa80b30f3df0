"""The optimal KL-regularised policy π*_β ∝ π_ref·exp(r/β) estimated from any sampled policy's
samples (prefkit.optimal), against the exact answer in a categorical "sequence space" where π_ref,
π_θ and r are explicit vectors, at KLs far beyond log m (the most the reference's own m samples
can reach)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prefkit.optimal import Proposal, best_proposal_frontier, optimal_point


def tilt(log_p: np.ndarray, r: np.ndarray, beta: float) -> np.ndarray:
    """log π*_β = log π + r/β − log Z."""
    z = log_p + r / beta
    return z - np.logaddexp.reduce(z)


def exact(log_ref: np.ndarray, r: np.ndarray, beta: float) -> tuple[float, float]:
    log_star = tilt(log_ref, r, beta)
    p = np.exp(log_star)
    return float(p @ r), float(p @ (log_star - log_ref))


def space(rng, n_prompts: int, size: int = 3000):
    """Per prompt: a reference over `size` sequences and their rewards."""
    log_ref = np.log(rng.dirichlet(np.full(size, 0.5), n_prompts))
    rewards = rng.normal(0.0, 2.0, (n_prompts, size))
    return log_ref, rewards


def draw(rng, log_p: np.ndarray, m: int) -> np.ndarray:
    return rng.choice(len(log_p), size=m, p=np.exp(log_p))


@pytest.mark.parametrize("beta", [0.12, 0.2])
def test_snis_from_a_nearby_policy_reaches_kl_far_beyond_log_m(beta):
    rng = np.random.default_rng(0)
    m, n_prompts = 8, 150
    log_ref, r = space(rng, n_prompts)
    want = np.array([exact(log_ref[i], r[i], beta) for i in range(n_prompts)]).mean(0)
    assert want[1] >= 3 * math.log(m)  # the test's point: far beyond what m reference samples can reach
    rewards, ratios, ref_rewards = [], [], []
    for i in range(n_prompts):
        log_pol = tilt(log_ref[i], r[i], 1.3 * beta)  # a trained policy near, not at, the optimum
        y = draw(rng, log_pol, m)
        rewards.append(r[i, y].tolist())
        ratios.append((log_pol[y] - log_ref[i, y]).tolist())
        ref_rewards.append(r[i, draw(rng, log_ref[i], m)].tolist())
    got = optimal_point(rewards, beta, log_ratios_by_prompt=ratios, proposal="policy")
    assert got.reward == pytest.approx(want[0], rel=0.03)
    assert got.kl == pytest.approx(want[1], rel=0.05)
    assert not got.low_ess
    from_ref = optimal_point(ref_rewards, beta)
    assert from_ref.kl <= math.log(m) and from_ref.low_ess  # the reference's samples cannot get there
    points, _ = best_proposal_frontier([Proposal("reference", ref_rewards, None),
                                        Proposal("policy", rewards, ratios)], [beta, math.inf])
    assert [p.proposal for p in points] == ["reference", "policy"]  # β = inf: the reference itself (KL 0)
    assert points[1].kl == pytest.approx(got.kl)


def test_with_the_reference_as_proposal_the_estimate_is_unchanged():
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(30, 8)).tolist()
    a = optimal_point(rewards, 0.7)
    b = optimal_point(rewards, 0.7, log_ratios_by_prompt=np.zeros((30, 8)).tolist())
    assert a.reward == pytest.approx(b.reward) and a.kl == pytest.approx(b.kl) and a.ess == pytest.approx(b.ess)


def test_a_policy_sampling_itself_at_beta_inf_recovers_the_reference():
    """β = inf: π* = π_ref, whose reward the policy's samples estimate by weights π_ref/π."""
    rng = np.random.default_rng(2)
    log_ref, r = space(rng, 200, size=50)
    rewards, ratios = [], []
    for i in range(200):
        log_pol = tilt(log_ref[i], r[i], 2.0)
        y = draw(rng, log_pol, 200)
        rewards.append(r[i, y].tolist())
        ratios.append((log_pol[y] - log_ref[i, y]).tolist())
    got = optimal_point(rewards, math.inf, log_ratios_by_prompt=ratios)
    want = float(np.mean([np.exp(log_ref[i]) @ r[i] for i in range(200)]))
    assert got.reward == pytest.approx(want, abs=0.05) and got.kl == pytest.approx(0.0, abs=0.05)  # SNIS bias O(1/ESS)


def test_a_trusted_proposal_with_few_samples_beats_an_untrusted_one_with_many():
    """Per β the estimate comes from the largest-ESS proposal among those that clear their own ESS
    threshold: 4 samples near π*_β (ESS 2.9 of 4) over 64 reference samples far from it (ESS 3.6 of
    64, under a tenth), though the latter's absolute ESS is larger."""
    rng = np.random.default_rng(3)
    beta, n_prompts = 0.6, 200
    log_ref, r = space(rng, n_prompts, size=2000)
    near, ratios, far = [], [], []
    for i in range(n_prompts):
        log_pol = tilt(log_ref[i], r[i], 1.5 * beta)
        y = draw(rng, log_pol, 4)
        near.append(r[i, y].tolist())
        ratios.append((log_pol[y] - log_ref[i, y]).tolist())
        far.append(r[i, draw(rng, log_ref[i], 64)].tolist())
    from_policy = optimal_point(near, beta, log_ratios_by_prompt=ratios)
    from_ref = optimal_point(far, beta)
    assert not from_policy.low_ess and from_ref.low_ess and from_ref.ess > from_policy.ess
    (point,), _ = best_proposal_frontier([Proposal("reference", far, None), Proposal("policy", near, ratios)], [beta])
    assert point.proposal == "policy"
    want = np.array([exact(log_ref[i], r[i], beta) for i in range(n_prompts)]).mean(0)
    assert abs(point.reward - want[0]) < abs(from_ref.reward - want[0])  # and it is the better estimate
