"""prefkit's losses against TRL 1.16's, end to end, on the same tiny model and batch.

DPOTrainer (sigmoid, hinge, ipo, exo_pair, sigmoid+sft): a real trainer on a 4-row dataset;
its collated batch goes through `trainer._compute_loss` (TRL's fused LM head) and through
prefkit's StatsLM + objective. Loss, logged metrics and parameter gradients must agree.

CPO / SimPO / ORPO (trl.experimental): TRL's own `get_batch_loss_metrics` (full-logit forward,
its log-prob and NLL code, `cpo_loss` / `odds_ratio_loss`) on a lightweight trainer object
holding only the attributes those methods read.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import FakeAccelerator

from prefkit import synthetic
from prefkit.data import IGNORE
from prefkit.embedded import embedded_dir
from prefkit.models import load_causal_lm, load_tokenizer
from prefkit.modules import StatsLM, reference_hidden
from prefkit.objectives import Groups, build, sft_nll, trl_metrics
from prefkit.tokenstats import TokenRequest

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ARCH = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 64}
B = 4
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    assert trl.__version__ == "1.16.0"
    root = tmp_path_factory.mktemp("trl")
    path = str(embedded_dir("trl", ARCH, root / "cache"))
    rows = synthetic.preference_examples(B, 1, "train")
    data = {"prompt": [r["prompt"] for r in rows], "chosen": [" " + r["completions"][0] for r in rows],
            "rejected": [" " + r["completions"][1] for r in rows]}
    return {"path": path, "tok": load_tokenizer(path), "data": data, "root": root}


def policy_model(path: str):
    """The tiny model moved away from its initialisation, so policy ≠ reference and no loss is trivial."""
    model = load_causal_lm(path)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def dpo_trainer(setup, **config):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(setup["root"] / "out"), per_device_train_batch_size=B, report_to="none",
                     use_cpu=True, gradient_checkpointing=False, save_strategy="no", logging_strategy="no",
                     bf16=False, fp16=False, **config)
    policy, reference = policy_model(setup["path"]), load_causal_lm(setup["path"])
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                         train_dataset=datasets.Dataset.from_dict(setup["data"]), processing_class=setup["tok"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(B)])
    return trainer, reference, batch


def pairs(t: torch.Tensor | None) -> torch.Tensor | None:
    """TRL's [chosen rows; rejected rows] as prefkit's [B, 2]."""
    return None if t is None else t.view(2, B).T


def prefkit_loss(model, reference, batch, cfg: dict):
    """prefkit's loss on a TRL batch: labels are the completion tokens, as in TRL."""
    obj, sft_weight = build(cfg)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref = reference_hidden(reference, ids, mask, labels) if obj.needs.reference != "none" else None
    req = replace(obj.needs.tokens, entropy=True)
    stats, _ = StatsLM(model)(ids, mask, labels, reference=ref, req=req, chunk_size=8)
    g = Groups(logps=pairs(stats.logps), lengths=pairs(stats.lengths), ref_logps=pairs(stats.ref_logps))
    out = obj.loss(g)
    loss = out.loss + sft_weight * sft_nll(g) if sft_weight else out.loss
    entropy = stats.entropy.sum() / stats.lengths.sum()
    return loss, {**{k: float(v) for k, v in trl_metrics(g, out).items()}, "entropy": float(entropy)}


def grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict, b: dict):
    assert set(a) == set(b) and a
    scale = max(float(v.abs().max()) for v in a.values())
    assert scale > 1e-4
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=TOL, atol=TOL * scale, msg=name)


DPO_CASES = [
    ("sigmoid", {"loss_type": ["sigmoid"], "beta": 0.1}, {"name": "dpo", "beta": 0.1}),
    ("hinge", {"loss_type": ["hinge"], "beta": 0.1}, {"name": "slic", "beta": 0.1}),
    ("ipo", {"loss_type": ["ipo"], "beta": 0.1}, {"name": "ipo", "beta": 0.1, "length_normalize": True}),
    ("exo_pair", {"loss_type": ["exo_pair"], "beta": 0.1, "label_smoothing": 1e-3},
     {"name": "exo", "beta": 0.1, "label_smoothing": 1e-3}),
    ("sigmoid+sft", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7], "beta": 0.1},
     {"name": "dpo", "beta": 0.1, "sft_weight": 0.7}),
]


@pytest.mark.parametrize("trl_cfg, cfg", [c[1:] for c in DPO_CASES], ids=[c[0] for c in DPO_CASES])
def test_dpo_trainer_losses(setup, trl_cfg, cfg):
    trainer, reference, batch = dpo_trainer(setup, **trl_cfg)
    model = trainer.model
    trl_loss = trainer._compute_loss(model, batch, False)
    mode = "train" if model.training else "eval"
    trl_logged = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    ours, logged = prefkit_loss(model, reference, batch, cfg)
    assert abs(trl_loss.item()) > 1e-3
    torch.testing.assert_close(ours, trl_loss, rtol=TOL, atol=TOL, check_dtype=False)  # ours: float64 sums
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "entropy"):
        assert logged[key] == pytest.approx(trl_logged[key], rel=TOL, abs=TOL), key
    assert_same_grads(grads(model, trl_loss), grads(model, prefkit_loss(model, reference, batch, cfg)[0]))


def test_the_batch_is_not_trivial(setup):
    trainer, reference, batch = dpo_trainer(setup, loss_type=["hinge"], beta=0.1)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
    stats, _ = StatsLM(trainer.model)(batch["input_ids"], batch["attention_mask"], labels,
                                           reference=reference_hidden(reference, batch["input_ids"],
                                                                      batch["attention_mask"], labels),
                                           req=TokenRequest())
    assert stats.lengths.unique().numel() > 1  # responses of different lengths (padding, IPO's normalisation)
    d = 0.1 * (pairs(stats.logps) - pairs(stats.ref_logps)) @ torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert (d != 0).all() and (d.abs() > 1e-2).any()


# --- CPO, SimPO, ORPO ---------------------------------------------------------------------------------



def light(cls, **attrs):
    """A trainer object with only the attributes its loss methods read."""
    obj = object.__new__(cls)
    obj.__dict__.update(is_encoder_decoder=False, accelerator=FakeAccelerator(), aux_loss_enabled=False, **attrs)
    return obj


def split_batch(batch):
    """TRL-experimental's chosen_/rejected_ batch from the DPO collator's concatenated one."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
    out = {}
    for prefix, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
        out.update({f"{prefix}_input_ids": batch["input_ids"][rows],
                    f"{prefix}_attention_mask": batch["attention_mask"][rows], f"{prefix}_labels": labels[rows]})
    return out


@pytest.fixture(scope="module")
def plain(setup):
    """A policy without TRL's patches, and a collated batch."""
    _, _, batch = dpo_trainer(setup, loss_type=["sigmoid"])
    return policy_model(setup["path"]), batch


CPO_CASES = [
    ("cpo", {"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.0, "simpo_gamma": 0.5},
     {"name": "cpo", "beta": 0.1, "alpha": 1.0}),
    ("cpo_alpha", {"loss_type": "sigmoid", "beta": 0.3, "cpo_alpha": 0.4, "simpo_gamma": 0.5},
     {"name": "cpo", "beta": 0.3, "alpha": 0.4}),
    ("simpo", {"loss_type": "simpo", "beta": 2.0, "cpo_alpha": 0.0, "simpo_gamma": 0.5},
     {"name": "simpo", "beta": 2.0, "gamma": 0.5}),
    ("cpo_simpo", {"loss_type": "simpo", "beta": 2.0, "cpo_alpha": 1.0, "simpo_gamma": 0.8},
     {"name": "simpo", "beta": 2.0, "gamma": 0.8, "sft_weight": 1.0}),
]


@pytest.mark.parametrize("trl_attrs, cfg", [c[1:] for c in CPO_CASES], ids=[c[0] for c in CPO_CASES])
def test_cpo_trainer_losses(setup, plain, trl_attrs, cfg):
    from trl.experimental.cpo import CPOTrainer

    model, batch = plain
    cpo = light(CPOTrainer, pad_token_id=setup["tok"].pad_token_id, label_smoothing=0.0, alpha=0.0, **trl_attrs)
    trl_loss, trl_logged = cpo.get_batch_loss_metrics(model, split_batch(batch))
    ours, logged = prefkit_loss(model, None, batch, cfg)
    torch.testing.assert_close(ours, trl_loss, rtol=TOL, atol=TOL, check_dtype=False)  # ours: float64 sums
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert logged[key] == pytest.approx(trl_logged[key], rel=TOL, abs=TOL), key
    assert_same_grads(grads(model, trl_loss), grads(model, prefkit_loss(model, None, batch, cfg)[0]))


def test_orpo_odds_ratio_term(setup, plain):
    from trl.experimental.orpo import ORPOTrainer

    model, batch = plain
    beta = 0.25
    orpo = light(ORPOTrainer, padding_value=setup["tok"].pad_token_id, beta=beta)
    trl_loss, trl_logged = orpo.get_batch_loss_metrics(model, split_batch(batch))
    obj = build({"name": "orpo", "beta": beta})[0]
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
    stats, _ = StatsLM(model)(batch["input_ids"], batch["attention_mask"], labels)
    g = Groups(logps=pairs(stats.logps), lengths=pairs(stats.lengths))
    out = obj.loss(g)
    # the odds-ratio term −β·mean log σ(log odds_w − log odds_l) and its logs agree ...
    odds_trl = trl_loss.item() - trl_logged["nll_loss"]
    odds_ours = out.loss.item() - out.metrics["nll_loss"].item()
    assert abs(odds_ours) > 1e-3
    assert odds_ours == pytest.approx(odds_trl, rel=TOL, abs=TOL)
    assert float(out.metrics["log_odds_ratio"]) == pytest.approx(trl_logged["log_odds_ratio"], rel=TOL, abs=TOL)
    assert float(out.metrics["log_odds_chosen"]) == pytest.approx(trl_logged["log_odds_chosen"], rel=TOL, abs=TOL)
    for key in ("rewards/chosen", "rewards/margins"):
        assert trl_metrics(g, out)[key].item() == pytest.approx(trl_logged[key], rel=TOL, abs=TOL)
    # ... and so do their gradients
    chosen, rejected, *_ = orpo.concatenated_forward(model, split_batch(batch))
    trl_term = -orpo.odds_ratio_loss(chosen, rejected)[0].mean()
    stats, _ = StatsLM(model)(batch["input_ids"], batch["attention_mask"], labels)
    g = Groups(logps=pairs(stats.logps), lengths=pairs(stats.lengths))
    out = obj.loss(g)
    assert_same_grads(grads(model, trl_term), grads(model, out.loss - sft_nll(g)))
    # The NLL differs by design: TRL's ORPOTrainer averages it over the chosen prompt *and* response tokens,
    # prefkit over the response tokens only (the paper's Eq. 6). TRL's value is prefkit's NLL with every
    # non-padding token after the first as a label:
    whole = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    whole_stats, _ = StatsLM(model)(batch["input_ids"], batch["attention_mask"], whole)
    nll_whole = sft_nll(Groups(logps=pairs(whole_stats.logps), lengths=pairs(whole_stats.lengths)))
    assert nll_whole.item() == pytest.approx(trl_logged["nll_loss"], rel=TOL, abs=TOL)
    assert abs(out.metrics["nll_loss"].item() - trl_logged["nll_loss"]) > 1e-2
