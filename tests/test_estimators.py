"""prefkit.estimators against closed forms, brute force and hand computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from prefkit.estimators import (
    Estimate,
    all_pairs_outcomes,
    best_of_n_curve,
    best_of_n_kl,
    best_of_n_reward,
    bootstrap_ci,
    combine_two_orders,
    estimate,
    frontier_gap,
    kl_estimates,
    kl_k1,
    kl_k3,
    label_pairs,
    position_consistency,
    reward_judge_outcomes,
    upper_envelope,
    win_rate,
)
from prefkit.optimal import optimal_frontier, optimal_point


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p‖q) of two categorical distributions, by definition."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


# --- bootstrap ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("level", "lo", "hi"), [(0.95, 0.89, 0.99), (0.5, 0.36, 0.62)])
def test_bootstrap_covers_true_mean_at_nominal_rate(level, lo, hi):
    rng = np.random.default_rng(123)
    reps, covered = 300, 0
    for rep in range(reps):
        x = rng.normal(2.0, 1.0, size=40)
        low, high = bootstrap_ci(x, n_boot=400, level=level, seed=rep)
        covered += low <= 2.0 <= high
    assert lo <= covered / reps <= hi


def test_bootstrap_width_matches_normal_theory_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = {}
    for n in (100, 1600):
        x = rng.normal(0.0, 3.0, size=n)
        low, high = bootstrap_ci(x, n_boot=2000, seed=1)
        widths[n] = high - low
        assert widths[n] == pytest.approx(2 * 1.96 * 3.0 / math.sqrt(n), rel=0.25)
    assert 0.18 < widths[1600] / widths[100] < 0.33  # ≈ 1/4 = sqrt(100/1600)


def test_bootstrap_is_deterministic_for_a_seed():
    x = np.random.default_rng(5).exponential(size=200)
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(x, seed=7)
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(x, seed=np.random.default_rng(7))
    assert bootstrap_ci(x, seed=7) != bootstrap_ci(x, seed=8)
    groups = np.repeat(np.arange(20), 10)
    assert bootstrap_ci(x, seed=3, groups=groups) == bootstrap_ci(x, seed=3, groups=groups)


def test_cluster_bootstrap_is_wider_for_clustered_data():
    rng = np.random.default_rng(2)
    n_groups, size = 40, 25
    effects = rng.normal(0.0, 1.0, size=n_groups)
    x = np.repeat(effects, size) + rng.normal(0.0, 0.1, size=n_groups * size)
    groups = np.repeat(np.arange(n_groups), size)
    item = bootstrap_ci(x, n_boot=2000, seed=0)
    cluster = bootstrap_ci(x, n_boot=2000, seed=0, groups=groups)
    item_w, cluster_w = item[1] - item[0], cluster[1] - cluster[0]
    assert cluster_w > 3 * item_w  # design effect ≈ 1 + (size − 1)·ICC ≈ 25 → width ratio ≈ 5
    group_means = x.reshape(n_groups, size).mean(axis=1)
    assert cluster_w == pytest.approx(2 * 1.96 * group_means.std(ddof=1) / math.sqrt(n_groups), rel=0.2)


def test_estimate_group_means_and_pooled_mean():
    values = [1.0, 1.0, 1.0, 4.0]
    groups = ["a", "a", "a", "b"]
    est = estimate(values, groups=groups, n_boot=200)
    assert isinstance(est, Estimate)
    assert est.mean == pytest.approx(2.5)  # (1 + 4)/2, not 7/4
    assert (est.n, est.n_groups) == (4, 2)
    assert est.low <= est.mean <= est.high
    assert estimate(values, groups=groups, equal_groups=False, n_boot=200).mean == pytest.approx(7 / 4)
    plain = estimate(values, n_boot=200)
    assert plain.mean == pytest.approx(7 / 4) and plain.n_groups is None


def test_cluster_bootstrap_statistic_by_hand():
    # groups a = (1, 1, 1), b = (0,): resampling 2 groups gives {a,a}, {b,b} w.p. ¼ each and {a,b} w.p. ½,
    # whose statistic is the pooled 3/4 or the group-mean ½; the 30% and 70% quantiles both fall on {a,b}
    values, groups = [1.0, 1.0, 1.0, 0.0], ["a", "a", "a", "b"]
    pooled = bootstrap_ci(values, n_boot=4000, level=0.4, groups=groups, equal_groups=False)
    assert pooled == pytest.approx((0.75, 0.75))
    assert bootstrap_ci(values, n_boot=4000, level=0.4, groups=groups) == pytest.approx((0.5, 0.5))


def test_bootstrap_edge_cases():
    assert bootstrap_ci([3.0]) == (3.0, 3.0)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0, 2.0], level=1.0)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci([1.0, 2.0], groups=[0])


# --- KL -----------------------------------------------------------------------------------------


def test_k1_k3_hand_values():
    lp = np.log([0.5, 0.25, 0.3])
    lr = np.log([0.25, 0.5, 0.3])  # d = log 2, −log 2, 0
    np.testing.assert_allclose(kl_k1(lp, lr), [math.log(2), -math.log(2), 0.0], atol=1e-15)
    # r = π_ref/π = 1/2, 2, 1 → (r − 1) − log r
    np.testing.assert_allclose(kl_k3(lp, lr), [-0.5 + math.log(2), 1 - math.log(2), 0.0], atol=1e-15)
    assert kl_k3([1e-12], [0.0])[0] >= 0.0  # tiny d: no negative rounding
    with pytest.raises(ValueError, match="differ in length"):
        kl_k1([0.0, 1.0], [0.0])


P = np.array([0.4, 0.3, 0.2, 0.1])
Q = np.array([0.1, 0.2, 0.3, 0.4])


def test_k1_k3_exact_in_expectation():
    lp, lq = np.log(P), np.log(Q)
    assert P @ kl_k1(lp, lq) == pytest.approx(kl(P, Q), abs=1e-14)
    assert P @ kl_k3(lp, lq) == pytest.approx(kl(P, Q), abs=1e-14)


def test_k1_k3_converge_to_exact_kl_on_samples():
    rng = np.random.default_rng(0)
    y = rng.choice(4, size=10000, p=P)
    lp, lq = np.log(P)[y], np.log(Q)[y]
    assert np.all(kl_k3(lp, lq) >= 0)
    assert np.any(kl_k1(lp, lq) < 0)
    est = kl_estimates(lp, lq, seed=1, n_boot=2000, level=0.999)  # two CIs checked: a wide level
    assert set(est) == {"k1", "k3"}
    truth = kl(P, Q)
    for name in ("k1", "k3"):
        assert est[name].low <= truth <= est[name].high, (name, est[name], truth)
        assert est[name].high - est[name].low < 0.08
        assert est[name].n == 10000


def test_kl_exact_is_used_as_is_and_prompts_weigh_equally():
    lp = [0.0, 0.0, 0.0, 0.0]
    lr = [-1.0, -1.0, -1.0, -4.0]  # k1 = 1, 1, 1, 4
    kl_exact = [0.5, 0.7, 0.9, 3.0]
    est = kl_estimates(lp, lr, kl_exact=kl_exact, prompt_ids=[7, 7, 7, 9], n_boot=200)
    assert est["k1"].mean == pytest.approx(2.5)  # prompt means 1 and 4, not the pooled 7/4
    assert est["exact"].mean == pytest.approx((0.7 + 3.0) / 2)
    assert est["k3"].mean == pytest.approx(((math.exp(-1) - 1 + 1) + (math.exp(-4) - 1 + 4)) / 2)
    assert est["k1"].n_groups == 2
    pooled = kl_estimates(lp, lr, kl_exact=kl_exact, n_boot=200)
    assert pooled["k1"].mean == pytest.approx(7 / 4)
    assert pooled["exact"].mean == pytest.approx(np.mean(kl_exact))


def test_token_exact_kl_and_k1_target_the_sequence_kl():
    """Two-token sequences from a tiny autoregressive policy (untruncated sampling): the mean of the
    per-sample token-level KL sums and the mean log-ratio both estimate KL(π‖π_ref) (chain rule), the
    former with a narrower CI."""
    p1, q1 = np.array([0.6, 0.3, 0.1]), np.array([0.3, 0.3, 0.4])
    p2 = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    q2 = np.array([[0.2, 0.5, 0.3], [0.3, 0.4, 0.3], [0.3, 0.3, 0.4]])
    truth = kl(p1, q1) + sum(p1[a] * kl(p2[a], q2[a]) for a in range(3))
    joint_p = (p1[:, None] * p2).ravel()
    assert truth == pytest.approx(kl(joint_p, (q1[:, None] * q2).ravel()), abs=1e-12)  # the chain rule itself
    rng = np.random.default_rng(4)
    n = 4000
    y1 = rng.choice(3, size=n, p=p1)
    y2 = np.array([rng.choice(3, p=p2[a]) for a in y1])
    lp = np.log(p1[y1]) + np.log(p2[y1, y2])
    lr = np.log(q1[y1]) + np.log(q2[y1, y2])
    exact = kl(p1, q1) + np.array([kl(p2[a], q2[a]) for a in range(3)])[y1]
    prompts = np.arange(n) // 4  # 1000 "prompts" with 4 samples each
    est = kl_estimates(lp, lr, kl_exact=exact, prompt_ids=prompts, seed=0, n_boot=4000, level=0.999)
    for name in ("k1", "k3", "exact"):
        assert est[name].low <= truth <= est[name].high, (name, est[name], truth)
    assert est["exact"].high - est["exact"].low < 0.5 * (est["k1"].high - est["k1"].low)


# --- win rates ----------------------------------------------------------------------------------


def test_win_rate_counts_ties_as_half():
    wr = win_rate([1, 0.5, 0, 1], n_boot=200)
    assert wr.rate == pytest.approx(0.625)
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (2, 1, 1, 4)
    assert wr.low <= wr.rate <= wr.high and wr.ci == (wr.low, wr.high)
    assert wr.low >= 0.0 and wr.high <= 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        win_rate([1, 2])


def test_win_rate_clusters_by_prompt():
    # 50 prompts, all 4 comparisons of a prompt agree: the effective sample size is 50, not 200
    rng = np.random.default_rng(0)
    per_prompt = rng.integers(0, 2, size=50).astype(float)
    outcomes = np.repeat(per_prompt, 4)
    prompts = np.repeat(np.arange(50), 4)
    flat = win_rate(outcomes, seed=0)
    clustered = win_rate(outcomes, seed=0, prompt_ids=prompts)
    assert clustered.rate == flat.rate == pytest.approx(per_prompt.mean())
    assert clustered.n_groups == 50 and flat.n_groups is None
    ratio = (clustered.high - clustered.low) / (flat.high - flat.low)
    assert 1.6 < ratio < 2.5  # ≈ sqrt(4)


def test_combine_two_orders_and_position_consistency():
    first = [1, 1, 0, 0.5, 1, 0.5]
    second = [1, 0, 0, 1, 0.5, 0.5]
    np.testing.assert_array_equal(combine_two_orders(first, second), [1, 0.5, 0, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(combine_two_orders(first, second, rule="average"), [1, 0.5, 0, 0.75, 0.75, 0.5])
    assert position_consistency(first, second) == pytest.approx(3 / 6)  # win-win, loss-loss, tie-tie
    # [win, loss] is a tie under fastchat: a judge that always prefers position A gives 0.5 everywhere
    np.testing.assert_array_equal(combine_two_orders([1, 1], [0, 0]), [0.5, 0.5])
    assert position_consistency([1, 1], [0, 0]) == 0.0
    wr = win_rate(combine_two_orders(first, second, rule="average"), n_boot=100)
    assert wr.rate == pytest.approx(3.5 / 6)
    assert (wr.wins, wr.ties, wr.losses) == (3, 2, 1)
    with pytest.raises(ValueError, match="only 1"):
        combine_two_orders([0.75], [1])
    with pytest.raises(ValueError, match="rule"):
        combine_two_orders([1], [1], rule="median")


def test_reward_judge_outcomes_with_tolerance():
    np.testing.assert_array_equal(reward_judge_outcomes([1.0, 2.0, 3.0, 2.05], [2.0, 2.0, 2.0, 2.0]),
                                  [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(reward_judge_outcomes([1.0, 2.0, 3.0, 2.05], [2.0, 2.0, 2.0, 2.0], tie_tol=0.1),
                                  [0.0, 0.5, 1.0, 0.5])


def test_all_pairs_outcomes_hand_example():
    outcomes, prompts = all_pairs_outcomes([[1.0, 3.0], [0.0]], [[2.0, 2.0, 3.0], [-1.0, 1.0]])
    # prompt 0: 1 vs (2, 2, 3) → 0 0 0; 3 vs (2, 2, 3) → 1 1 ½;  prompt 1: 0 vs (−1, 1) → 1 0
    np.testing.assert_array_equal(outcomes, [0, 0, 0, 1, 1, 0.5, 1, 0])
    np.testing.assert_array_equal(prompts, [0, 0, 0, 0, 0, 0, 1, 1])
    assert win_rate(outcomes, prompt_ids=prompts, n_boot=100).rate == pytest.approx(3.5 / 8)


# --- preference labelling -----------------------------------------------------------------------


def test_best_worst_picks_argmax_argmin_and_ties_give_none():
    rewards = [[0.3, 1.2, -0.4], [2.0, 2.0, 2.0], [5.0, 1.0], [1.0, 1.0, 0.0]]
    assert label_pairs(rewards) == [(1, 2), None, (0, 1), (0, 2)]
    assert label_pairs(rewards, noise=1.0, rng=0) == [(2, 1), None, (1, 0), (2, 0)]
    assert label_pairs([[1.0, 1.0]], mode="bradley_terry", rng=0) == [None]
    with pytest.raises(ValueError, match="rng"):
        label_pairs(rewards, mode="bradley_terry")
    with pytest.raises(ValueError, match="fewer than 2"):
        label_pairs([[1.0]])


def test_label_noise_rate_matches_swap_fraction():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(20000, 3)).tolist()
    clean = label_pairs(rewards)
    noisy = label_pairs(rewards, noise=0.3, rng=np.random.default_rng(1))
    assert noisy == label_pairs(rewards, noise=0.3, rng=np.random.default_rng(1))  # deterministic given rng
    swapped = np.mean([n == (c[1], c[0]) for n, c in zip(noisy, clean, strict=True)])
    assert all(n in (c, (c[1], c[0])) for n, c in zip(noisy, clean, strict=True))
    assert swapped == pytest.approx(0.3, abs=4 * math.sqrt(0.3 * 0.7 / 20000))


def test_bradley_terry_chooses_with_sigmoid_probability():
    rewards = [[0.0, 1.0, 3.0]] * 30000
    beta = 2.0
    labels = label_pairs(rewards, mode="bradley_terry", beta=beta, rng=np.random.default_rng(3))
    counts = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    r = rewards[0]
    n = len(labels)
    for i, j in itertools.permutations(range(3), 2):
        expected = (1 / 3) / (1 + math.exp(-(r[i] - r[j]) / beta))  # uniform pair, then σ(Δ/β)
        assert counts.get((i, j), 0) / n == pytest.approx(expected, abs=4 * math.sqrt(expected / n))
    # with label noise ε, the higher reward wins with (1 − ε)σ + ε(1 − σ)
    two = [[0.0, 1.0]] * 30000
    noisy = label_pairs(two, mode="bradley_terry", beta=1.0, noise=0.2, rng=np.random.default_rng(4))
    sig = 1 / (1 + math.exp(-1.0))
    expected = 0.8 * sig + 0.2 * (1 - sig)
    assert np.mean([lab == (1, 0) for lab in noisy]) == pytest.approx(expected, abs=4 * math.sqrt(0.25 / 30000))


# --- best-of-n ----------------------------------------------------------------------------------


def test_best_of_n_kl_closed_form():
    assert best_of_n_kl(1) == 0.0
    for n in (2, 3, 4, 10, 100):
        assert best_of_n_kl(n) == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-15)
    assert best_of_n_kl(2) == pytest.approx(0.19314718055994530)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def exact_bon_kl(p_ref_sorted: np.ndarray, n: int) -> float:
    """KL(π_bon ‖ π_ref) on a discrete support with distinct rewards, outcomes sorted by reward:
    π_bon(y_i) = F(y_i)^n − F(y_{i−1})^n."""
    cdf = np.concatenate([[0.0], np.cumsum(p_ref_sorted)])
    cdf[-1] = 1.0
    p_bon = cdf[1:] ** n - cdf[:-1] ** n
    return kl(p_bon, p_ref_sorted)


@pytest.mark.parametrize("n", [2, 4, 16])
def test_best_of_n_kl_is_tight_for_large_support(n):
    k = 20000
    uniform = np.full(k, 1 / k)
    assert exact_bon_kl(uniform, n) == pytest.approx(best_of_n_kl(n), abs=1e-6)
    p = np.random.default_rng(n).uniform(0.5, 1.5, size=k)  # non-uniform, no heavy atom
    p /= p.sum()
    assert exact_bon_kl(p, n) == pytest.approx(best_of_n_kl(n), abs=1e-4)
    small = np.array([0.5, 0.3, 0.2])  # few heavy atoms: a strict upper bound
    assert exact_bon_kl(small, n) < best_of_n_kl(n) - 1e-3


def test_best_of_n_reward_matches_brute_force_over_subsets():
    rng = np.random.default_rng(0)
    prompts = [rng.normal(size=7).round(1).tolist(), [3.0, 1.0, 1.0, 2.0, 2.0, 0.0], rng.normal(size=9).tolist()]
    for n in range(1, 7):
        brute = np.mean([np.mean([max(s) for s in itertools.combinations(r, n)]) for r in prompts])
        assert best_of_n_reward(prompts, n) == pytest.approx(brute, abs=1e-12)
    assert best_of_n_reward(prompts[:1], 7) == pytest.approx(max(prompts[0]))  # n = M: the max
    assert best_of_n_reward(prompts, 1) == pytest.approx(np.mean([np.mean(r) for r in prompts]))  # n = 1: mean
    with pytest.raises(ValueError, match="M ≥ n"):
        best_of_n_reward(prompts, 8)


def test_best_of_n_reward_is_unbiased_for_uniform_draws():
    # E[max of n U(0,1)] = n/(n+1); 400 prompts × 64 samples
    rewards = np.random.default_rng(1).uniform(size=(400, 64))
    for n in (1, 4, 16):
        assert best_of_n_reward(rewards, n) == pytest.approx(n / (n + 1), abs=0.01)
    curve = best_of_n_curve(rewards, [1, 4])
    assert [c[0] for c in curve] == [1, 4]
    assert curve[1][1] == pytest.approx(math.log(4) - 0.75)
    assert curve[1][2] == pytest.approx(best_of_n_reward(rewards, 4))
    # large M and n (C(3000, 1500) ≈ 1e901 overflows floats): still finite and unbiased
    big = np.random.default_rng(2).uniform(size=(2, 3000))
    assert best_of_n_reward(big, 1500) == pytest.approx(1500 / 1501, abs=1.2e-3)


# --- optimal KL-regularised policy --------------------------------------------------------------


def exact_optimal(p_ref: np.ndarray, r: np.ndarray, beta: float) -> tuple[float, float]:
    """(E_π*[r], KL(π*‖π_ref)) of π* ∝ π_ref exp(r/β), by definition."""
    unnorm = p_ref * np.exp(r / beta)
    p_star = unnorm / unnorm.sum()
    return float(p_star @ r), kl(p_star, p_ref)


@pytest.mark.parametrize("beta", [0.3, 1.0, 5.0])
def test_optimal_point_exact_when_samples_are_the_support(beta):
    # uniform π_ref over 4 outcomes, the samples are the support
    r = np.array([0.0, 1.0, 2.5, -1.0])
    pt = optimal_point([r.tolist()], beta)
    reward, kl_star = exact_optimal(np.full(4, 0.25), r, beta)
    assert pt.reward == pytest.approx(reward, abs=1e-12)
    assert pt.kl == pytest.approx(kl_star, abs=1e-12)
    # non-uniform π_ref = (1/2, 1/4, 1/8, 1/8): the 8 samples repeat outcomes in proportion
    p_ref = np.array([0.5, 0.25, 0.125, 0.125])
    samples = np.repeat(r, [4, 2, 1, 1])
    pt = optimal_point([samples.tolist()], beta)
    reward, kl_star = exact_optimal(p_ref, r, beta)
    assert pt.reward == pytest.approx(reward, abs=1e-12)
    assert pt.kl == pytest.approx(kl_star, abs=1e-12)
    assert pt.m == 8 and pt.n_prompts == 1


def test_optimal_point_converges_on_iid_reference_samples():
    rng = np.random.default_rng(0)
    p_ref = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    r = np.array([-1.0, 0.0, 0.5, 1.0, 2.0])
    beta = 0.7
    samples = [r[rng.choice(5, size=20000, p=p_ref)].tolist() for _ in range(4)]
    pt = optimal_point(samples, beta)
    reward, kl_star = exact_optimal(p_ref, r, beta)
    assert pt.reward == pytest.approx(reward, abs=0.02)
    assert pt.kl == pytest.approx(kl_star, abs=0.02)
    assert pt.n_prompts == 4


@pytest.mark.filterwarnings("error")
def test_optimal_point_limits_are_stable():
    r = [0.3, -2.0, 1.7, 0.9, 5.0]
    for beta in (1e6, 1e300, math.inf):
        pt = optimal_point([r], beta)
        assert pt.kl == pytest.approx(0.0, abs=1e-6)
        assert pt.reward == pytest.approx(np.mean(r), abs=1e-5)
        assert pt.ess == pytest.approx(5.0, abs=1e-4)
    for beta in (1e-3, 1e-12, 1e-300, 5e-324):
        pt = optimal_point([r], beta)
        assert pt.reward == pytest.approx(5.0)
        assert pt.kl == pytest.approx(math.log(5), abs=1e-12)
        assert pt.ess == pytest.approx(1.0)
    tied = optimal_point([[1.0, 3.0, 3.0, 0.0]], 1e-9)  # two maxima share the weight
    assert tied.kl == pytest.approx(math.log(4 / 2)) and tied.ess == pytest.approx(2.0)
    big = optimal_point([[1e4, -1e4, 0.0]], 1e-3)
    assert big.reward == 1e4 and np.isfinite(big.kl)


def test_optimal_point_ess_and_low_ess_flag():
    equal = optimal_point([[0.7] * 20, [1.0] * 20], beta=0.01)
    assert equal.ess == pytest.approx(20.0) and equal.ess_min == pytest.approx(20.0)
    assert equal.kl == pytest.approx(0.0, abs=1e-12) and not equal.low_ess
    spread = np.linspace(0, 10, 20).tolist()
    sharp = optimal_point([spread], beta=0.01)
    assert sharp.ess == pytest.approx(1.0) and sharp.low_ess and sharp.ess_threshold == pytest.approx(2.0)
    assert not optimal_point([spread], beta=0.01, ess_threshold=0.5).low_ess
    # ragged prompts: each prompt's KL is capped by its own log M, then averaged
    ragged = optimal_point([[0.0, 1.0], [0.0, 1.0, 2.0, 3.0]], beta=1e-9)
    assert ragged.kl == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert ragged.reward == pytest.approx(2.0) and ragged.m == 3.0
    assert ragged.ess_min == pytest.approx(1.0)
    # ESS by hand: two samples, w = softmax([0, β·log 3]/β) = (1/4, 3/4) → 1/(1/16 + 9/16) = 1.6
    assert optimal_point([[0.0, math.log(3)]], 1.0).ess == pytest.approx(1.6)


def test_optimal_frontier_sorted_and_monotone():
    rewards = np.random.default_rng(0).normal(size=(10, 50))
    front = optimal_frontier(rewards, [0.1, math.inf, 1.0, 0.03, 10.0, 0.3])
    kls = [p.kl for p in front]
    assert kls == sorted(kls)
    assert [p.beta for p in front] == [math.inf, 10.0, 1.0, 0.3, 0.1, 0.03]
    assert all(a.reward < b.reward for a, b in itertools.pairwise(front))
    assert front[0].kl == 0.0 and front[-1].kl <= math.log(50)


# --- frontier geometry --------------------------------------------------------------------------


def test_upper_envelope_hand_example():
    points = [(1.0, 1.0), (0.0, 0.0), (1.0, 0.5), (2.0, 0.8), (3.0, 2.0), (0.5, -1.0), (3.0, 2.0), (4.0, 2.0)]
    assert upper_envelope(points) == [(0.0, 0.0), (1.0, 1.0), (3.0, 2.0)]
    assert upper_envelope([]) == []
    assert upper_envelope([(0.5, 0.1)]) == [(0.5, 0.1)]
    # a decreasing curve: only the lowest-KL point survives
    assert upper_envelope([(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)]) == [(1.0, 3.0)]


def test_frontier_gap_interpolates_and_clamps():
    frontier = [(3.0, 2.0), (0.0, 0.0), (1.0, 1.0), (1.0, 0.2)]  # unsorted, repeated KL: the higher reward counts
    assert frontier_gap(2.0, 1.2, frontier) == pytest.approx(0.3)  # f(2) = 1.5
    assert frontier_gap(0.5, 0.0, frontier) == pytest.approx(0.5)
    assert frontier_gap(1.0, 1.0, frontier) == pytest.approx(0.0)
    assert frontier_gap(10.0, 1.0, frontier) == pytest.approx(1.0)  # clamped to f(3) = 2
    assert frontier_gap(-0.2, -0.5, frontier) == pytest.approx(0.5)  # clamped to f(0) = 0
    assert frontier_gap(2.0, 3.0, frontier) == pytest.approx(-1.5)  # above the frontier: negative
    with pytest.raises(ValueError, match="empty"):
        frontier_gap(1.0, 1.0, [])
