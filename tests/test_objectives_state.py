"""Objectives with state across steps: ε-DPO's β, β-DPO's moving statistics and TR-DPO's
reference weights survive a checkpoint round trip (prefkit.checkpoint's codec: tensors through
safetensors, the rest through JSON); ε-DPO accumulates only training batches and forgets a
skipped step."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FakeAccelerator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from prefkit import checkpoint
from prefkit.objectives import Groups, build

LOGPS = [[-5.0, -7.0], [-4.0, -3.5], [-10.0, -9.0], [-2.0, -3.0]]
REF = [[-5.5, -6.0], [-4.2, -3.0], [-9.0, -11.0], [-2.5, -2.5]]
LENS = [[3, 5], [2, 4], [6, 1], [2, 2]]
# ε = 0.1: s = [+1, −1, 0, 0] (see tests/test_objectives.py)
LO = [[-4.5, -7.0], [-4.3, -3.5], [-9.5, -9.0], [-2.0, -3.0]]
HI = [[-5.5, -7.0], [-3.7, -3.5], [-9.7, -9.0], [-2.4, -3.0]]
# every pair s = +1
LO_UP = [[-4.5, -7.0], [-3.9, -3.5], [-9.5, -9.0], [-1.9, -3.0]]
HI_UP = [[-5.5, -7.0], [-4.1, -3.5], [-10.5, -9.0], [-2.1, -3.0]]


pytestmark = pytest.mark.usefixtures("one_thread")
ACC = FakeAccelerator()


def t64(x) -> Tensor:
    return torch.tensor(x, dtype=torch.float64)


def groups(logps=LOGPS, training=True, lo=None, hi=None, eps=0.1) -> Groups:
    mix = {} if lo is None else {1.0 + eps: t64(lo), 1.0 - eps: t64(hi)}
    return Groups(logps=t64(logps), lengths=torch.tensor(LENS), ref_logps=t64(REF), training=training,
                  mixture_logps=mix)


def round_trip(state: dict, tmp_path) -> dict:
    """What a checkpoint does with an objective's state_dict (prefkit.checkpoint's codec)."""
    tensors: dict[str, Tensor] = {}
    body = json.dumps(checkpoint.encode(state, tensors))
    save_file(tensors, tmp_path / "state.safetensors")
    return checkpoint.decode(json.loads(body), load_file(tmp_path / "state.safetensors"))


# --- ε-DPO ------------------------------------------------------------------------------------------

def test_edpo_beta_survives_a_checkpoint(tmp_path):
    obj = build({"name": "edpo", "beta": 0.1, "epsilon": 0.1})[0]
    obj.loss(groups(lo=LO_UP, hi=HI_UP))
    obj.on_optimizer_step(ACC)
    assert obj.beta == pytest.approx(0.1 / 1.1)
    resumed = build({"name": "edpo", "beta": 0.1, "epsilon": 0.1})[0]
    resumed.load_state_dict(round_trip(obj.state_dict(), tmp_path))
    assert resumed.beta == obj.beta
    a, b = obj.loss(groups(lo=LO, hi=HI)), resumed.loss(groups(lo=LO, hi=HI))
    assert float(a.loss) == float(b.loss)
    fresh = build({"name": "edpo", "beta": 0.1, "epsilon": 0.1})[0].loss(groups(lo=LO, hi=HI))
    assert float(fresh.loss) != float(a.loss)  # the state matters


def test_edpo_accumulates_only_training_batches():
    obj = build({"name": "edpo", "beta": 0.1, "epsilon": 0.1})[0]
    out = obj.loss(groups(training=False, lo=LO_UP, hi=HI_UP))
    assert out.metrics["kl/p_epsilon_steps"] == 1.0  # evaluation still uses the per-pair β̃ ...
    assert obj.on_optimizer_step(ACC) == {} and obj.beta == 0.1  # ... but never moves β
    obj.loss(groups(training=False, lo=LO_UP, hi=HI_UP))
    obj.loss(groups(training=True, lo=LO, hi=HI))  # mean s = 0
    logs = obj.on_optimizer_step(ACC)
    assert logs["kl/avg_steps"] == 0.0 and obj.beta == 0.1


def test_edpo_forgets_a_skipped_step():
    obj = build({"name": "edpo", "beta": 0.1, "epsilon": 0.1})[0]
    obj.loss(groups(lo=LO_UP, hi=HI_UP))  # would lower β ...
    obj.on_skipped_step()  # ... but the step was skipped for a non-finite loss
    assert obj.on_optimizer_step(ACC) == {} and obj.beta == 0.1
    obj.loss(groups(lo=LO_UP, hi=HI_UP))
    obj.on_skipped_step()
    obj.loss(groups(lo=LO, hi=HI))  # the retried step sees only its own batches
    logs = obj.on_optimizer_step(ACC)
    assert logs["kl/avg_steps"] == 0.0 and obj.beta == 0.1


def test_edpo_reduces_across_processes():
    class TwoProcesses(FakeAccelerator):
        num_processes = 2

        def reduce(self, x, reduction="sum"):
            assert reduction == "sum"
            return x + torch.tensor([-4.0, 4.0 * (1 / 0.9), 4.0], dtype=x.dtype)  # the other rank: 4 pairs, s = −1

    obj = build({"name": "edpo", "beta": 0.1, "epsilon": 0.1})[0]
    obj.loss(groups(lo=LO_UP, hi=HI_UP))  # this rank: 4 pairs, s = +1
    logs = obj.on_optimizer_step(TwoProcesses())
    assert logs["kl/avg_steps"] == 0.0 and obj.beta == pytest.approx(0.1)


# --- β-DPO ------------------------------------------------------------------------------------------

def test_beta_dpo_statistics_survive_a_checkpoint(tmp_path):
    cfg = {"name": "beta_dpo", "beta": 0.1, "a": 0.6, "rho": 0.0, "momentum": 0.9}
    obj = build(cfg)[0]
    obj.loss(groups())
    obj.loss(groups([[-1.0, -3.0], [-2.0, -2.5], [-1.0, -1.5], [-3.0, -1.0]]))
    state = obj.state_dict()
    assert state["gap_mean"] != 0.0 and state["gap_std"] != 0.0
    resumed = build(cfg)[0]
    resumed.load_state_dict(round_trip(state, tmp_path))
    assert (resumed.gap_mean, resumed.gap_std) == (obj.gap_mean, obj.gap_std)
    a, b = obj.loss(groups()), resumed.loss(groups())
    assert float(a.loss) == float(b.loss) and a.metrics["beta_dpo/beta"] == b.metrics["beta_dpo/beta"]
    assert (resumed.gap_mean, resumed.gap_std) == (obj.gap_mean, obj.gap_std)
    fresh = build(cfg)[0].loss(groups())
    assert not math.isclose(fresh.metrics["beta_dpo/beta"], a.metrics["beta_dpo/beta"])


# --- TR-DPO -----------------------------------------------------------------------------------------

def linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def test_tr_dpo_reference_survives_a_checkpoint(tmp_path):
    policy, reference = linear(0), linear(1)
    obj = build({"name": "tr_dpo", "update": "soft", "alpha": 0.6, "sync_steps": 2})[0]
    obj.bind(accelerator=ACC, policy=policy, reference=reference)
    for _ in range(3):  # one sync (step 2), then a step into the next period
        obj.on_optimizer_step(ACC)
    state = obj.state_dict()
    assert state["steps"] == 3 and {"reference.weight", "reference.bias"} <= set(state)

    resumed = build({"name": "tr_dpo", "update": "soft", "alpha": 0.6, "sync_steps": 2})[0]
    new_reference = linear(2)
    resumed.bind(accelerator=ACC, policy=policy, reference=new_reference)
    resumed.load_state_dict(round_trip(state, tmp_path))
    assert resumed.steps == 3
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(new_reference.state_dict()[name], value, rtol=0, atol=0)
    # the resumed run syncs at step 4, like the original
    assert resumed.on_optimizer_step(ACC) == {"tr_dpo/reference_updates": 2}
    obj.on_optimizer_step(ACC)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(new_reference.state_dict()[name], value, rtol=0, atol=0)
