"""Every model family of conf/model/, offline: a tiny random-init model built from the family's own
transformers config class, with a tokenizer of its kind (tests/families.py), run through the
pipeline as a user would with `model=<family entry> model.name_or_path=<dir>` and the entry
otherwise unchanged (its dtypes included: Llama 3 and Mistral train in bfloat16):
sft -> align (dpo, tdpo2, edpo, simpo) -> sample -> judge.
"""

from __future__ import annotations

import json
import math

import pytest
from families import family_model
from transformers import AutoTokenizer

from prefkit import api

pytestmark = pytest.mark.slow  # six small pipelines, about 15 s each

FAMILIES = {"gpt_neox": "pythia160m", "gpt2": "gpt2-large", "llama3": "llama3-8b-instruct",
            "mistral": "mistral-7b-instruct", "qwen2.5": "qwen2.5-0.5b-instruct", "phi3": "phi3-mini"}
SHORT = ["train.max_steps=2", "train.batch_size=8", "hardware.micro_batch_size=8", "train.eval_every=0",
         "train.save_every=0"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_runs_the_pipeline(family, in_run_dir):
    path = family_model(family, in_run_dir / "model")
    common = [f"model={FAMILIES[family]}", f"model.name_or_path={path}", "run.name=fam", "dataset=synthetic_test"]

    sft = api.sft([*common, *SHORT])
    assert math.isfinite(sft.summary["eval_loss"])
    aligned = api.align([*common, *SHORT, "objective=dpo,tdpo2,edpo,simpo"], multirun=True)
    assert sorted(j.config.objective.name for j in aligned) == ["dpo", "edpo", "simpo", "tdpo2"]
    assert all(math.isfinite(j.summary["eval_loss"]) for j in aligned)
    sample = api.sample([*common, "sample.max_prompts=4", "sample.n=2", "sample.n_reference=2",
                         "sample.max_new_tokens=12"])
    judged = api.judge([*common])
    assert len(judged.summary["policies"]) == 5
    assert all(math.isfinite(p["reward"]["mean"]) for p in judged.summary["policies"].values())
    # a sample ends at the family's end-of-turn token, if it reaches one, and holds nothing after it
    eos = AutoTokenizer.from_pretrained(path).eos_token_id
    for file in sample.path.glob("*/samples.jsonl"):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            ids = row["completion_ids"]
            assert (eos in ids) == row["finished"] and (not row["finished"] or ids.index(eos) == len(ids) - 1)
