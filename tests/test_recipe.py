"""The parts the training stages share (prefkit.recipe), through the stages that use them: the
reward stage prepares its model and saves it like the others (two bugs it had on its own)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TEST_CONF

from prefkit import recipe
from prefkit.engine import make_accelerator
from prefkit.models import is_peft, load_tokenizer
from prefkit.stages import reward


def _compose(stage: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from prefkit.config import conf_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=stage, overrides=[f"hydra.searchpath=[file://{TEST_CONF}]", *overrides],
                       return_hydra_config=False)


def _member_parts(sft_run: Path, monkeypatch, *overrides: str):
    """What the reward stage hands to the trainer for one member (the run itself is not needed)."""
    cfg = _compose("reward", ["model=tiny_test", "dataset=synthetic_test", "run.name=shared",
                              f"run.root={sft_run / 'outputs'}", *overrides])
    init = next((sft_run / "outputs/shared/sft").iterdir()) / "model"
    tok = load_tokenizer(str(init))
    groups = {"train": [], "eval": []}
    seen = {}

    def capture(cfg, out, module, accelerator, n, loss_fn, eval_fn, save_fn, stateful=None):
        seen.update(module=module, save_fn=save_fn)
        return {}

    monkeypatch.setattr(recipe, "train", capture)
    reward.train_member(cfg, 0, 1, sft_run / "unused", str(init), tok, groups, make_accelerator(cfg.hardware))
    return seen


@pytest.mark.slow
def test_reward_models_use_gradient_checkpointing_when_the_hardware_asks(sft_run, monkeypatch):
    on = _member_parts(sft_run, monkeypatch, "hardware.gradient_checkpointing=true")["module"]
    off = _member_parts(sft_run, monkeypatch)["module"]
    assert on.lm.is_gradient_checkpointing and not off.lm.is_gradient_checkpointing
    assert on.reward_head is not None


@pytest.mark.slow
def test_a_mid_training_save_of_a_lora_reward_model_leaves_the_live_model_alone(sft_run, monkeypatch, tmp_path):
    pytest.importorskip("peft")
    parts = _member_parts(sft_run, monkeypatch, "peft=lora")
    module = parts["module"]
    assert is_peft(module.lm)
    with torch.no_grad():  # a trained adapter (LoRA's B starts at zero, so the merge would be a no-op)
        for name, p in module.lm.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    before = {k: v.clone() for k, v in module.lm.state_dict().items()}
    parts["save_fn"](module, tmp_path / "checkpoint-model", False, None)  # a checkpoint kept for sampling
    assert is_peft(module.lm)  # still training with its adapter, not merged into the base
    after = module.lm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "checkpoint-model/reward_head.safetensors").exists()
    assert (tmp_path / "checkpoint-model/adapter/adapter_config.json").exists()
