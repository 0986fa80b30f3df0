"""The shared training loop: exact resume, non-finite-loss handling, schedules."""

import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from prefkit import synthetic
from prefkit.data import EpochSampler, collate, encode
from prefkit.embedded import embedded_dir
from prefkit.engine import make_accelerator
from prefkit.errors import UserError
from prefkit.models import load_causal_lm, load_tokenizer
from prefkit.modules import StatsLM
from prefkit.trainer import Trainer, _schedule

ARCH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64}


def _cfg(**train):
    return OmegaConf.create({
        "stage": "sft", "seed": 0, "run": {"name": "t"}, "logger": {"every": 2, "wandb": False},
        "hardware": {"device": "cpu", "precision": "fp32", "micro_batch_size": 4},
        "train": {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.01, "scheduler": "cosine",
                  "warmup_steps": 2, "epochs": 1, "max_steps": 10, "batch_size": 8, "max_grad_norm": 1.0,
                  "eval_every": 0, "save_every": 3, "keep_checkpoints": 2, "max_bad_steps": 3, **train}})


class Killed(BaseException):
    """A kill nothing can catch (SIGKILL, a lost node): raised inside a step to simulate one."""


def _setup(tmp_path: Path, cfg, fail_at=None, poison=None, interrupt_at=None, accelerator=None):
    path = embedded_dir("tiny", ARCH, tmp_path / "cache")
    tok = load_tokenizer(str(path))
    torch.manual_seed(0)
    model = StatsLM(load_causal_lm(str(path)))
    rows = synthetic.sft_examples(64, 0, "train")
    seqs = [encode(tok, r["prompt"], r["completion"], max_length=64, max_prompt_length=16) for r in rows]
    calls = {"n": 0}

    def loss_fn(model, indices, training):
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise Killed  # a kill in the middle of a step
        if interrupt_at is not None and calls["n"] == interrupt_at:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a step
        batch = collate([seqs[i] for i in indices], tok.pad_token_id)
        stats, _ = model(**batch)
        loss = -stats.logps.sum() / stats.lengths.sum()
        if poison is not None and calls["n"] in poison:
            loss = loss * float("nan")
        return loss, {"num_tokens": int(stats.lengths.sum())}

    trainer = Trainer(cfg, tmp_path / "job", model, accelerator or make_accelerator(cfg.hardware), len(seqs), loss_fn,
                      lengths=[len(s.ids) for s in seqs])
    trainer.seen = []  # the micro-batches' widths, as padded
    inner = trainer.loss_fn

    def record(model, indices, training):
        trainer.seen.append(max(len(seqs[i].ids) for i in indices))
        return inner(model, indices, training)

    trainer.loss_fn = record
    return trainer


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    straight = _setup(tmp_path / "a", _cfg())
    straight.fit()
    # 2 micro-batches per step: the 15th loss call is inside step 8, after the step-6 checkpoint
    crashed = _setup(tmp_path / "b", _cfg(), fail_at=15)
    with pytest.raises(Killed):
        crashed.fit()
    assert crashed.step == 7 and (tmp_path / "b/job/checkpoints/step-6").is_dir()
    assert (tmp_path / "b/job/checkpoints/step-3").is_dir()  # keep_checkpoints=2 keeps steps 3 and 6
    resumed = _setup(tmp_path / "b", _cfg())
    resumed.fit()
    assert resumed.step == 10
    a, b = _weights(straight), _weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    lines = (tmp_path / "b/job/metrics.jsonl").read_text().strip().splitlines()
    assert any('"step": 10' in ln for ln in lines)


def test_length_grouped_batches_resume_exactly_and_pad_less(tmp_path):
    cfg = _cfg(group_by_length=True)
    straight = _setup(tmp_path / "a", cfg)
    straight.fit()
    crashed = _setup(tmp_path / "b", cfg, fail_at=15)
    with pytest.raises(Killed):
        crashed.fit()
    resumed = _setup(tmp_path / "b", cfg)
    resumed.fit()
    a, b = _weights(straight), _weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert crashed.seen[:14] + resumed.seen[-8:] == straight.seen[:14] + straight.seen[-8:]
    ungrouped = _setup(tmp_path / "c", _cfg())
    ungrouped.fit()
    assert sum(straight.seen) < sum(ungrouped.seen)  # fewer padded columns for the same number of steps


def test_length_grouping_keeps_each_epochs_examples_and_is_seeded():
    rng = random.Random(1)
    lengths = [rng.randint(1, 500) for _ in range(1003)]
    plain, grouped = EpochSampler(1003, 10, seed=4), EpochSampler(1003, 10, seed=4, lengths=lengths)
    for _ in range(3):  # three epochs: the same examples as ungrouped, the same dropped tail
        a = [plain.next() for _ in range(100)]
        b = [grouped.next() for _ in range(100)]
        assert sorted(i for x in a for i in x) == sorted(i for x in b for i in x)
        spread = [max(lengths[i] for i in x) - min(lengths[i] for i in x) for x in b]
        assert sum(spread) < 0.2 * sum(max(lengths[i] for i in x) - min(lengths[i] for i in x) for x in a)
        # no trend through the epoch: long batches are not all at the start
        widths = [max(lengths[i] for i in x) for x in b]
        assert sum(widths[:50]) / sum(widths) < 0.6
    again = EpochSampler(1003, 10, seed=4, lengths=lengths)
    again.load_state_dict(grouped.state_dict())
    assert [again.next() for _ in range(120)] == [grouped.next() for _ in range(120)]
    assert EpochSampler(1003, 10, seed=5, lengths=lengths).next() != EpochSampler(1003, 10, seed=4,
                                                                                     lengths=lengths).next()


def test_ctrl_c_checkpoints_the_last_step_and_the_resume_is_exact(tmp_path):
    from prefkit.config import Stopped

    straight = _setup(tmp_path / "a", _cfg(save_every=0))
    straight.fit()
    stopped = _setup(tmp_path / "b", _cfg(save_every=0), interrupt_at=15)  # inside step 8, no checkpoint yet
    with pytest.raises(Stopped, match=r"interrupted at step 7/10 \(checkpoint of step 7 saved\)") as err:
        stopped.fit()
    assert err.value.exit_code == 130 and (tmp_path / "b/job/checkpoints/step-7").is_dir()
    resumed = _setup(tmp_path / "b", _cfg(save_every=0))
    resumed.fit()
    a, b = _weights(straight), _weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6  # the abandoned step is redone as it was


def test_resume_refuses_a_different_config(tmp_path):
    crashed = _setup(tmp_path, _cfg(), fail_at=9)
    with pytest.raises(Killed):
        crashed.fit()
    with pytest.raises(UserError, match=r"different config \(train.lr: 0.003 -> 0.01\)"):
        _setup(tmp_path, _cfg(lr=1e-2)).fit()


def test_a_job_killed_before_an_option_was_added_resumes(tmp_path):
    """A checkpoint written before prefkit gained an option resumes when the option is at its default
    (here, as if train.group_by_length had not existed when the job was killed)."""
    straight = _setup(tmp_path / "a", _cfg())
    straight.fit()
    crashed = _setup(tmp_path / "b", _cfg(), fail_at=15)
    with pytest.raises(Killed):
        crashed.fit()
    resumed = _setup(tmp_path / "b", _cfg(group_by_length=False))
    resumed.fit()
    assert resumed.step == 10
    a, b = _weights(straight), _weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_a_nonfinite_loss_skips_the_step_and_is_counted(tmp_path):
    trainer = _setup(tmp_path, _cfg(max_steps=4, save_every=0), poison={3})  # call 3 = step 2's first half
    result = trainer.fit()
    assert trainer.step == 4 and trainer.skipped == 1  # 5 attempts, one skipped
    assert result["skipped_steps"] == 1.0
    assert all(torch.isfinite(v).all() for v in _weights(trainer).values())


def test_a_run_of_nonfinite_losses_aborts(tmp_path):
    trainer = _setup(tmp_path, _cfg(max_steps=6, save_every=0), poison=set(range(1, 100)))
    with pytest.raises(UserError, match="3 optimizer steps in a row"):
        trainer.fit()
    assert trainer.step == 0


def _fp16_accelerator(cfg, init_scale: float):
    """What accelerate gives `hardware.precision=fp16` on CUDA: fp16 autocast and a GradScaler. It
    gives no scaler on a CPU, so here the scaler is set by hand before the trainer prepares."""
    acc = make_accelerator(OmegaConf.merge(cfg.hardware, {"precision": "fp16"}))
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=init_scale), True
    return acc


def test_fp16_loss_scale_overflows_lower_the_scale_and_are_not_bad_steps(tmp_path):
    """Gradients that overflow at the loss scale are the scaler's to handle: it skips that update and
    halves the scale. They are not bad steps: before, prefkit skipped them itself without the scaler,
    so the scale never fell (and the next unscale_ raised)."""
    cfg = _cfg(max_steps=3, save_every=0)  # max_bad_steps=3: more overflows than that in a row must not abort
    acc = _fp16_accelerator(cfg, init_scale=2.0**40)
    trainer = _setup(tmp_path, cfg, accelerator=acc)
    before = _weights(trainer)
    result = trainer.fit()
    assert trainer.step == 3 and trainer.skipped >= 4 and result["skipped_steps"] == trainer.skipped
    assert acc.scaler.get_scale() <= 2.0**40 / 2**4
    after = _weights(trainer)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the three real steps moved the weights


def test_a_nonfinite_loss_under_fp16_is_still_a_bad_step(tmp_path):
    cfg = _cfg(max_steps=6, save_every=0)
    trainer = _setup(tmp_path, cfg, poison=set(range(1, 100)), accelerator=_fp16_accelerator(cfg, 2.0**8))
    with pytest.raises(UserError, match="3 optimizer steps in a row"):
        trainer.fit()
    assert trainer.step == 0


def test_schedules():
    cosine = _schedule("cosine", 2, 10)
    assert cosine(0) == pytest.approx(1 / 3) and cosine(2) == pytest.approx(1.0)
    assert cosine(10) == pytest.approx(0.0, abs=1e-12)
    assert _schedule("constant", 0, 10)(7) == 1.0
    assert _schedule("linear", 0, 10)(5) == pytest.approx(0.5)
    with pytest.raises(UserError):
        _schedule("exotic", 0, 10)


def test_max_steps_and_epochs_are_never_both_in_force_and_the_start_says_which(tmp_path):
    from prefkit.trainer import Plan

    hw = OmegaConf.create({"micro_batch_size": 8})
    by_steps = Plan.make(OmegaConf.create({"batch_size": 8, "max_steps": 400, "epochs": 1}), hw, 285, 1)
    assert by_steps.total_steps == 400
    assert by_steps.length(OmegaConf.create({"max_steps": 400, "epochs": 1}), 285) == \
        "train.max_steps=400 wins over train.epochs=1: 11.2 epochs of 285 examples"
    by_epochs = Plan.make(OmegaConf.create({"batch_size": 8, "max_steps": None, "epochs": 2}), hw, 285, 1)
    assert by_epochs.total_steps == 2 * (285 // 8)
    assert "train.epochs=2 of 285 examples" in by_epochs.length(OmegaConf.create({"max_steps": None, "epochs": 2}), 285)


def test_evaluation_runs_at_the_end_even_when_eval_every_is_longer_than_the_run(tmp_path):
    trainer = _setup(tmp_path, _cfg(max_steps=4, eval_every=50, save_every=0))
    seen = []
    trainer.eval_fn = lambda model: seen.append(trainer.step) or {"eval_loss": 1.0}
    assert trainer.fit()["eval_loss"] == 1.0 and seen == [4]


def test_wandb_runs_are_grouped_like_the_run_directory_and_keys_split_train_eval(tmp_path, monkeypatch):
    import sys
    import types

    calls = {"log": []}

    class FakeRun:
        def log(self, row, step):
            calls["log"].append((step, row))

        def finish(self):
            calls["finished"] = True

    fake = types.SimpleNamespace(init=lambda **kw: calls.update(init=kw) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = _cfg(max_steps=4, eval_every=4, save_every=0)
    cfg.logger.wandb, cfg.logger.project, cfg.run.name = True, "p", "sweep1"
    cfg.objective = {"name": "dpo"}
    trainer = _setup(tmp_path, cfg)
    trainer.eval_fn = lambda model: {"eval_loss": 0.5}
    trainer.fit()
    init = calls["init"]
    assert (init["group"], init["job_type"], init["name"]) == ("sweep1", "sft", "job")
    assert init["tags"] == ["objective:dpo", "seed:0"] and init["dir"] == str(tmp_path / "job")
    keys = set().union(*(row for _, row in calls["log"]))
    assert {"train/loss", "train/lr", "eval/loss"} <= keys
    assert all(k.startswith(("train/", "eval/")) for k in keys) and calls["finished"]
