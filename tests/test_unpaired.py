"""Unpaired data ({prompt, completion, label}) and the objectives that take it (KTO, APO-zero unpaired).

(a) rows: split from any preference dataset, or read from local files that have them; (b) the
losses on small hand-made tensors, computed here with `math` from the papers' formulas; (c) a
finite-difference check of the gradient; (d) TRL 1.16's KTOTrainer._compute_loss on the same
log-probs, agreeing in value, gradient and logged metrics; (e) groups with a mismatched completion.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FakeAccelerator
from omegaconf import OmegaConf
from torch.autograd import gradcheck

from prefkit.datasets import load_rows, unpair, with_mismatched
from prefkit.errors import UserError
from prefkit.objectives import Groups, build

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

# five prompts: [labelled completion, mismatched completion]; labels true = desirable
LOGPS = [[-5.0, -7.0], [-4.0, -3.5], [-10.0, -9.0], [-2.0, -3.0], [-6.0, -4.0]]
REF = [[-5.5, -6.0], [-4.2, -3.0], [-9.0, -11.0], [-2.4, -2.2], [-5.0, -4.5]]
LABELS = [True, False, True, False, False]
TOL = 1e-12


def t64(x, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64).requires_grad_(grad)


def groups(logps=LOGPS, grad: bool = False, labels=LABELS) -> Groups:
    return Groups(logps=t64(logps, grad), lengths=torch.ones(len(logps), 2, dtype=torch.long), ref_logps=t64(REF),
                  labels=torch.tensor(labels))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def close(actual, expected, tol=TOL):
    actual = float(actual.detach() if isinstance(actual, torch.Tensor) else actual)
    assert actual == pytest.approx(expected, rel=tol, abs=tol), (actual, expected)


# --- (a) rows -------------------------------------------------------------------------------------

def local(tmp_path: Path, rows: list[dict], **over):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = OmegaConf.load(ROOT / "conf" / "dataset" / "local.yaml")
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.data_files = {"train": str(path), "eval": str(path)}
    cfg.splits = {"train": "train", "eval": "eval"}
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def test_pairs_split_into_a_desirable_and_an_undesirable_row(tmp_path):
    cfg = local(tmp_path, [{"prompt": "a", "chosen": " good", "rejected": " bad"},
                           {"prompt": "b", "completions": [" best", " mid", " worst"], "rewards": [3, 2, 1]}])
    assert load_rows(cfg, "unpaired", "train") == [
        {"prompt": "a", "completion": " good", "label": True}, {"prompt": "a", "completion": " bad", "label": False},
        {"prompt": "b", "completion": " best", "label": True}, {"prompt": "b", "completion": " worst", "label": False}]
    synthetic = OmegaConf.load(ROOT / "conf" / "dataset" / "synthetic.yaml")
    rows = load_rows(synthetic, "unpaired", "eval")
    assert rows[0]["label"] is True and rows[1]["label"] is False and rows[0]["prompt"] == rows[1]["prompt"]
    assert sum(r["label"] for r in rows) * 2 == len(rows)
    assert unpair([{"prompt": "x", "completion": " y", "label": False}]) == [
        {"prompt": "x", "completion": " y", "label": False}]


def test_local_unpaired_files(tmp_path):
    rows = [{"prompt": "a", "completion": " good", "label": True},
            {"prompt": "b", "completion": " bad", "label": False},
            {"prompt": "c", "completion": " fine", "label": True}]
    cfg = local(tmp_path, rows)
    assert load_rows(cfg, "unpaired", "train") == rows
    # SFT on an unpaired file learns the desirable completions only
    assert [r["completion"] for r in load_rows(cfg, "sft", "train")] == [" good", " fine"]
    with pytest.raises(UserError, match=r"this file has unpaired rows.*such as kto"):
        load_rows(cfg, "preference", "train")
    bad = local(tmp_path, [*rows, {"prompt": "d", "completion": " x", "label": "yes"}])
    with pytest.raises(UserError, match=r"row 3 .*'label' must be true \(desirable\) or false"):
        load_rows(bad, "unpaired", "train")


# --- (b) values by hand ---------------------------------------------------------------------------

def expected_kto(beta, wd=1.0, wu=1.0, logps=LOGPS, labels=LABELS):
    h = [lp[0] - rf[0] for lp, rf in zip(logps, REF, strict=True)]
    z0 = max(0.0, sum(lp[1] - rf[1] for lp, rf in zip(logps, REF, strict=True)) / len(logps))
    losses = [wd * (1 - sigmoid(beta * (x - z0))) if d else wu * (1 - sigmoid(beta * (z0 - x)))
              for x, d in zip(h, labels, strict=True)]
    return sum(losses) / len(losses), z0, h


def test_kto_by_hand():
    out = build({"name": "kto", "beta": 0.3, "desirable_weight": 1.2, "undesirable_weight": 0.8})[0].loss(groups())
    loss, z0, h = expected_kto(0.3, 1.2, 0.8)
    assert z0 > 0  # the mismatched completions' mean log-ratio is positive here: the clamp is not hit
    close(out.loss, loss)
    close(out.metrics["kl"], z0)
    close(out.metrics["rewards/chosen"], 0.3 * (h[0] + h[2]) / 2)
    close(out.metrics["rewards/rejected"], 0.3 * (h[1] + h[3] + h[4]) / 3)
    right = [(x - z0 > 0) == d for x, d in zip(h, LABELS, strict=True)]
    close(out.metrics["rewards/accuracies"], sum(right) / len(right))
    # a negative mean log-ratio of the mismatched completions clamps the reference point at 0
    low = [[lp[0], lp[1] - 5.0] for lp in LOGPS]
    loss0, z00, _ = expected_kto(0.3, logps=low)
    assert z00 == 0.0
    close(build({"name": "kto", "beta": 0.3})[0].loss(groups(low)).loss, loss0)


def test_apo_zero_unpaired_by_hand():
    out = build({"name": "apo_zero_unpaired", "beta": 0.5})[0].loss(groups())
    h = [lp[0] - rf[0] for lp, rf in zip(LOGPS, REF, strict=True)]
    losses = [1 - sigmoid(0.5 * x) if d else sigmoid(0.5 * x) for x, d in zip(h, LABELS, strict=True)]
    close(out.loss, sum(losses) / len(losses))
    # the mismatched completion plays no part
    other = [[lp[0], lp[1] + 3.0] for lp in LOGPS]
    close(build({"name": "apo_zero_unpaired", "beta": 0.5})[0].loss(groups(other)).loss, sum(losses) / len(losses))


def test_unpaired_objectives_refuse_bad_options_and_pairs():
    with pytest.raises(UserError, match="desirable_weight and undesirable_weight must be positive"):
        build({"name": "kto", "undesirable_weight": 0.0})[0].loss(groups())
    pairs = Groups(logps=t64(LOGPS), lengths=torch.ones(5, 2, dtype=torch.long), ref_logps=t64(REF))
    with pytest.raises(UserError, match="needs unpaired rows with labels"):
        build({"name": "kto"})[0].loss(pairs)
    assert build({"name": "kto"})[0].needs.rows == "unpaired"


# --- (c) gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [{"name": "kto", "beta": 0.7, "desirable_weight": 1.3},
                                 {"name": "apo_zero_unpaired", "beta": 0.4}])
def test_gradients_by_finite_differences(cfg):
    """With respect to the labelled completions' log-probs: the reference point z0 is a constant
    (KTO stops its gradient), so the mismatched ones are held fixed."""
    obj = build(cfg)[0]
    fixed = t64(LOGPS)[:, 1:]
    assert gradcheck(lambda x: obj.loss(groups_of(torch.cat([x, fixed], dim=1))).loss,
                     (t64(LOGPS, True)[:, :1].detach().requires_grad_(),), eps=1e-6, atol=1e-8, rtol=1e-6)


def groups_of(lp: torch.Tensor) -> Groups:
    return Groups(logps=lp, lengths=torch.ones(5, 2, dtype=torch.long), ref_logps=t64(REF), labels=torch.tensor(LABELS))


# --- (d) TRL 1.16's KTOTrainer --------------------------------------------------------------------

class FakeLM:
    """Stands in for the policy inside KTOTrainer._compute_loss: per-token log-probs whose row sums
    are the given sequence log-probs (all on the first completion token); the KL forward is told
    apart by its input ids (2 instead of 1)."""

    training = True

    def __init__(self, logps: torch.Tensor, kl_logps: torch.Tensor, width: int):
        self.logps, self.kl_logps, self.width = logps, kl_logps, width

    def __call__(self, input_ids, **_):
        values = self.kl_logps if bool((input_ids == 2).all()) else self.logps
        onehot = torch.zeros(values.shape[0], self.width - 1, dtype=values.dtype)
        onehot[:, 0] = 1.0
        zeros = torch.zeros_like(onehot)
        return SimpleNamespace(log_probs=onehot * values[:, None], entropy=zeros, mean_logits=zeros)


def trl_kto_loss(loss_type: str, logps: torch.Tensor, beta: float, wd: float = 1.0, wu: float = 1.0):
    from trl import KTOTrainer

    b, width = logps.shape[0], 3
    ref = t64(REF)
    mask = torch.tensor([[0, 1, 1]] * b)
    inputs = {"input_ids": torch.ones(b, width, dtype=torch.long),
              "attention_mask": torch.ones(b, width, dtype=torch.long),
              "completion_mask": mask, "label": torch.tensor(LABELS),
              "KL_input_ids": torch.full((b, width), 2, dtype=torch.long),
              "KL_attention_mask": torch.ones(b, width, dtype=torch.long), "KL_completion_mask": mask,
              "ref_logps": ref[:, 0], "ref_KL_logps": ref[:, 1]}
    model = FakeLM(logps[:, 0], logps[:, 1].detach(), width)
    trainer = object.__new__(KTOTrainer)
    trainer.__dict__.update(
        model=model, accelerator=FakeAccelerator(), aux_loss_enabled=False, precompute_ref_logps=True,
        loss_type=loss_type, beta=beta, desirable_weight=wd, undesirable_weight=wu,
        calculate_KL=loss_type == "kto", _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
        _tp_size=1)
    loss = trainer._compute_loss(model, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type, cfg", [
    ("kto", {"name": "kto", "beta": 0.3, "desirable_weight": 1.2, "undesirable_weight": 0.8}),
    ("apo_zero_unpaired", {"name": "apo_zero_unpaired", "beta": 0.3, "desirable_weight": 1.0,
                           "undesirable_weight": 1.0})])
def test_trl_parity(loss_type, cfg):
    pytest.importorskip("trl")
    ours_in, theirs_in = t64(LOGPS, True), t64(LOGPS, True)
    ours = build(cfg)[0].loss(groups_of(ours_in))
    theirs, logged = trl_kto_loss(loss_type, theirs_in, cfg["beta"], cfg["desirable_weight"],
                                  cfg["undesirable_weight"])
    close(ours.loss, float(theirs.detach()))
    ours.loss.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-12, atol=1e-14)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
        close(ours.metrics[key], logged[key])
    close(ours.metrics["kl"], logged["kl"])


# --- (e) groups with a mismatched completion ------------------------------------------------------

def test_each_row_gets_a_completion_of_another_prompt():
    rows = unpair([{"prompt": f"p{i}", "completions": [f" good {i}", f" bad {i}"]} for i in range(6)])
    groups = with_mismatched(rows, seed=3)
    assert sorted((g["prompt"], g["completions"][0], g["label"]) for g in groups) == \
        sorted((r["prompt"], r["completion"], r["label"]) for r in rows)
    owner = {r["completion"]: r["prompt"] for r in rows}
    assert all(owner[g["completions"][1]] != g["prompt"] for g in groups)  # never the prompt's own completion
    assert with_mismatched(rows, seed=3) == groups and with_mismatched(rows, seed=4) != groups
    with pytest.raises(UserError, match="at least two distinct prompts"):
        with_mismatched(rows[:2], seed=0)


# --- end to end -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_kto_trains_from_pairs_split_on_the_fly(sft_run):
    """`prefkit align objective=kto` on a preference dataset: pairs are split, each row gets a
    mismatched completion, and the held-out metrics are KTO's."""
    from conftest import TINY_ALIGN, prefkit

    prefkit("align", "run.name=shared", "job=kto", *TINY_ALIGN, "objective=kto", cwd=sft_run)
    job = sft_run / "outputs/shared/align/kto"
    summary = json.loads((job / "summary.json").read_text())
    assert summary["objective"] == "kto" and math.isfinite(summary["eval_loss"])
    assert 0.0 <= summary["eval_rewards/accuracies"] <= 1.0 and summary["eval_kl"] >= 0.0
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    assert any("kl" in r and "rewards/chosen" in r for r in rows)
    # twice as many groups as the dataset has pairs: each pair gave a desirable and an undesirable row
    dataset = OmegaConf.load(job / "config.yaml").dataset
    assert summary["train_groups"] == 2 * len(load_rows(dataset, "preference", "train"))
