"""Real-dataset adapters (prefkit.datasets.<name>, read by prefkit.datasets.reader) on local files
in the exact Hub schemas.

tests/fixtures/<dataset>/ hold a handful of rows per dataset, malformed ones included;
tests/fixtures/hh-rlhf/ holds 2,312 real Anthropic HH pairs (harmless-base test, MIT licence).
Nothing is downloaded: every source is read through `data_files`, the path a user takes for a
local copy, with the same `datasets.load_dataset` call as a Hub id.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prefkit import synthetic
from prefkit.data import encode, encode_options
from prefkit.datasets import ADAPTERS, load_rows, reader
from prefkit.datasets.hh import HH
from prefkit.embedded import build_word_tokenizer, embedded_dir
from prefkit.errors import UserError
from prefkit.models import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures"
HH_REAL = FIX / "hh-rlhf" / "harmless-base-test.jsonl.gz"
ARCH = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 64}
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
NAMES = ("hh", "imdb", "tldr", "ultrafeedback", "ultrafeedback_argilla", "local")


@pytest.fixture(scope="module", autouse=True)
def offline_probe(tmp_path_factory):
    """A fresh interpreter (HF_HUB_OFFLINE is read at import) loading the hh config's Hub id with
    an empty cache; started with the module's first test so its imports overlap the others."""
    home = tmp_path_factory.mktemp("hf-home")
    code = ("from omegaconf import OmegaConf\nfrom prefkit.datasets import load_rows\n"
            "from prefkit.errors import UserError\n"
            f"cfg = OmegaConf.load({str(ROOT / 'conf' / 'dataset' / 'hh.yaml')!r})\n"
            "try:\n    load_rows(cfg, 'preference', 'train')\nexcept UserError as err:\n    print('USERERROR', err)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-datasets")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A tiny local tokenizer directory: the embedded model's word-level tokenizer (BOS on
    prompts, EOS appended by encode). PREFKIT_TEST_EMBEDDED=1 takes it from embedded_dir, which
    also builds the model (importing GPT-NeoX costs 6-9 s, most of this file's budget)."""
    root = tmp_path_factory.mktemp("tokenizer")
    if os.environ.get("PREFKIT_TEST_EMBEDDED") == "1":
        return embedded_dir("tiny", ARCH, root)
    build_word_tokenizer(synthetic.lexicon()).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(str(tok_dir))


@pytest.fixture(scope="module")
def chat_tok(tok_dir):
    """The same tokenizer with chat markers as special tokens and a simple Jinja chat template."""
    t = load_tokenizer(str(tok_dir))
    t.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    t.chat_template = CHAT
    return t


def read_jsonl(path: Path) -> list[dict]:
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
        return [json.loads(line) for line in f]


def ds(name: str, cache: Path, **overrides):
    """The shipped conf/dataset/<name>.yaml with overrides (dotted keys allowed)."""
    cfg = OmegaConf.load(ROOT / "conf" / "dataset" / f"{name}.yaml")
    cfg.cache_dir = str(cache)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def files(name: str, **splits: str) -> dict[str, str]:
    return {split: str(FIX / name / f) for split, f in splits.items()}


def encode_all(rows, tokenizer, cfg, kind):
    opts = encode_options(cfg)
    texts = [r["completion"] for r in rows] if kind == "sft" else [c for r in rows for c in r["completions"]]
    prompts = [r["prompt"] for r in rows] if kind == "sft" else [r["prompt"] for r in rows for _ in r["completions"]]
    return [encode(tokenizer, p, c, **opts) for p, c in zip(prompts, texts, strict=True)]


# --- configs --------------------------------------------------------------------------------------

def test_configs_compose_and_every_key_is_read():
    from hydra import compose, initialize_config_dir

    from prefkit.config import conf_dir, register_resolvers

    register_resolvers()
    lengths = {"hh": (512, 256), "imdb": (512, 32), "tldr": (650, 575), "ultrafeedback": (2048, 1800),
               "ultrafeedback_argilla": (2048, 1800), "local": (512, 256)}
    with initialize_config_dir(str(conf_dir()), version_base=None):
        for name in NAMES:
            cfg = compose("sft", overrides=[f"dataset={name}", "dataset.data_files={train: a.jsonl, test: b.jsonl}"])
            d = cfg.dataset
            assert d.name == name and d.on_bad_row == "error" and d.min_response_tokens == 1
            assert d.prompt_truncation in ("keep_end", "keep_start")
            assert (d.max_length, d.max_prompt_length) == lengths[name]
            assert dict(d.data_files) == {"train": "a.jsonl", "test": "b.jsonl"}
            reader._check_keys(d, name, ADAPTERS[name].keys)  # nothing in the yaml goes unread
            chat = name.startswith("ultrafeedback")
            assert d.add_eos is not chat and d.prompt_special_tokens is not chat
    bad = OmegaConf.load(ROOT / "conf" / "dataset" / "hh.yaml")
    bad.prompt_words = 3
    with pytest.raises(UserError, match=r"unknown key.*prompt_words"):
        load_rows(bad, "sft", "train")


# --- Anthropic HH ---------------------------------------------------------------------------------

def test_hh_rows_for_every_kind(cache, tok):
    cfg = ds("hh", cache, data_files=files("hh", train="train.jsonl", test="test.jsonl"), on_bad_row="skip")
    pref = load_rows(cfg, "preference", "train", None, tok)
    assert [r["prompt"] for r in pref] == [
        "\n\nHuman: What is a good movie for a rainy day?\n\nAssistant:",
        "\n\nHuman: Can you help me plan a trip?\n\nAssistant: Sure, where would you like to go?"
        "\n\nHuman: Paris, in May.\n\nAssistant:",
        "\n\nHuman: How do I boil an egg?\n\nAssistant:"]
    assert pref[1]["completions"] == [" May is lovely in Paris: book museums early and walk along the Seine.",
                                      " I don't know."]
    assert set(pref[0]) == {"prompt", "completions"}
    sft = load_rows(cfg, "sft", "train", None, tok)
    assert [(r["prompt"], r["completion"]) for r in sft] == [(r["prompt"], r["completions"][0]) for r in pref]
    prompts = load_rows(cfg, "prompts", "eval", None, tok)
    assert len(prompts) == 3 and prompts[2] == {"prompt": "\n\nHuman: Name a colour.\n\nAssistant:",
                                                "reference": " Blue."}
    single = load_rows(ds("hh", cache, data_files=files("hh", train="train.jsonl", test="test.jsonl"),
                          single_turn=True), "prompts", "eval", None, tok)
    assert len(single) == 2 and all(r["prompt"].count("\n\nHuman:") == 1 for r in single)
    seqs = encode_all(pref, tok, cfg, "preference")
    assert all(s.ids[0] == tok.bos_token_id and s.ids[-1] == tok.eos_token_id for s in seqs)


def test_hh_malformed_rows(cache, caplog):
    cfg = ds("hh", cache, data_files=files("hh", train="train.jsonl", test="test.jsonl"))
    with pytest.raises(UserError, match=r"row 2 of .*train.jsonl \(split train\) is malformed: chosen and rejected "
                                        "do not share the prompt") as err:
        load_rows(cfg, "preference", "train")
    assert "on_bad_row=skip" in str(err.value) and "\n" not in str(err.value)
    raw = read_jsonl(FIX / "hh" / "train.jsonl")
    adapter, reasons = HH(cfg, "preference", None), {}
    for i, row in enumerate(raw):
        try:
            adapter.convert(row, i)
        except reader.Malformed as bad:
            reasons[i] = str(bad)
    assert sorted(reasons) == [2, 4, 5]
    assert reasons[4] == "the chosen response is empty" and reasons[5] == "rejected has no '\\n\\nAssistant:' turn"
    cfg.on_bad_row = "skip"
    with caplog.at_level("WARNING", logger="prefkit"):
        assert len(load_rows(cfg, "sft", "train")) == 3
    assert "skipped 3 malformed row(s), first row 2" in caplog.text


def test_hh_real_rows(cache, tok):
    """All 2,312 real harmless-base test pairs: every row is either a well-formed pair or a
    malformed one we can name; one multi-turn row checked by hand."""
    raw = read_jsonl(HH_REAL)
    assert len(raw) == 2312

    def prompt(t):
        return t[: t.rindex("\n\nAssistant:") + len("\n\nAssistant:")]

    differ = [i for i, r in enumerate(raw) if prompt(r["chosen"]) != prompt(r["rejected"])]
    empty = [i for i, r in enumerate(raw) if i not in differ
             and not all(r[k][len(prompt(r[k])):].strip() for k in ("chosen", "rejected"))]
    print(f"\nHH harmless-base test: {len(raw)} pairs, {len(differ)} with different chosen/rejected prompts "
          f"(rows {differ}), {len(empty)} with an empty response (rows {empty})")
    assert (len(differ), len(empty)) == (5, 4)

    cfg = ds("hh", cache, data_files={"test": str(HH_REAL)}, splits={"train": "test", "eval": "test"},
             on_bad_row="skip")
    pref = load_rows(cfg, "preference", "eval", None, tok)
    assert len(pref) == 2312 - len(differ) - len(empty)
    multi = sum(r["prompt"].count("\n\nHuman:") > 1 for r in pref)
    assert multi > 1500  # most harmless-base dialogues have several turns
    # row 0, by hand: three Human turns; the prompt ends at the third "\n\nAssistant:"
    first = pref[0]
    assert first["prompt"].startswith("\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant: Are you")
    assert first["prompt"].endswith("\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert first["prompt"].count("\n\nHuman:") == 3 and first["prompt"].count("\n\nAssistant:") == 3
    assert first["completions"][0] == (" No, sorry!  All of these involve a pen, the point is that you can get "
                                       "funny results by doing pranks with pens.")
    assert first["prompt"] + first["completions"][0] == raw[0]["chosen"]
    assert first["prompt"] + first["completions"][1] == raw[0]["rejected"]
    kept = [x for i, x in enumerate(raw) if i not in differ and i not in empty]
    for r, src in zip(pref, kept, strict=True):  # every kept pair reassembles into its two transcripts
        assert [r["prompt"] + c for c in r["completions"]] == [src["chosen"], src["rejected"]]
    assert len(load_rows(cfg, "sft", "eval", None, tok)) == len(pref)
    assert len(load_rows(cfg, "prompts", "eval", None, tok)) == len(pref)
    seqs = encode_all(pref, tok, cfg, "preference")
    assert max(len(s.ids) for s in seqs) <= 512 and max(s.prompt_len for s in seqs) <= 256

    cfg.on_bad_row = "error"
    with pytest.raises(UserError, match=f"row {min(differ + empty)} .*the chosen response is empty"):
        load_rows(cfg, "preference", "eval")


# --- IMDb -----------------------------------------------------------------------------------------

def test_imdb_word_prefixes_interleaved(cache):
    cfg = ds("imdb", cache, data_files=files("imdb", train="train.jsonl", test="test.jsonl"),
             prefix={"unit": "words", "length": 4}, on_bad_row="skip")
    prompts = load_rows(cfg, "prompts", "eval")
    assert [r["label"] for r in prompts] in ([0, 1, 0, 1], [1, 0, 1, 0])  # stored sorted by label
    texts = {r["text"].replace("<br />", "\n") for r in read_jsonl(FIX / "imdb" / "test.jsonl")}
    for r in prompts:
        assert len(r["prompt"].split()) == 4 and r["prompt"] + r["reference"] in texts
    boring = next(r for r in prompts if r["prompt"].startswith("Boring"))
    assert "<br />" not in boring["reference"] and "\n\nI left" in boring["reference"]
    sft = load_rows(cfg, "sft", "train")  # "Bad." has nothing after its prefix: skipped
    assert len(sft) == 5 and all(r["completion"].startswith(" ") for r in sft)
    assert load_rows(cfg, "prompts", "eval") == prompts  # seeded: the same order every time
    with pytest.raises(UserError, match=r"row 2 .*nothing after its 4-word prefix"):
        load_rows(ds("imdb", cache, data_files=files("imdb", train="train.jsonl", test="test.jsonl"),
                     prefix={"unit": "words", "length": 4}), "sft", "train")
    ranged = load_rows(ds("imdb", cache, data_files=files("imdb", train="train.jsonl", test="test.jsonl"),
                          prefix={"unit": "words", "length": [2, 8]}), "prompts", "eval")
    assert all(2 <= len(r["prompt"].split()) <= 8 for r in ranged)


def test_imdb_token_prefixes_with_a_bpe_tokenizer(cache, tmp_path):
    """EXO's 10-token prefixes, cut where the 10th token ends: the prompt is exactly 10 tokens and
    prompt + rest tokenizes as the review did (byte-level BPE, GPT-2 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [r["text"] for f in ("train.jsonl", "test.jsonl") for r in read_jsonl(FIX / "imdb" / f)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    gpt = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")

    # the yaml's defaults (10 tokens), the test split as a Parquet copy
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_jsonl(FIX / "imdb" / "test.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    cfg = ds("imdb", cache, data_files={"train": str(FIX / "imdb" / "train.jsonl"),
                                        "test": str(tmp_path / "test.parquet")})
    prompts = load_rows(cfg, "prompts", "eval", None, gpt)
    assert len(prompts) == 4
    for r in prompts:
        ids = gpt(r["prompt"], add_special_tokens=False)["input_ids"]
        whole = gpt(r["prompt"] + r["reference"], add_special_tokens=False)["input_ids"]
        assert len(ids) == 10 and whole[:10] == ids
        assert ids + gpt(r["reference"], add_special_tokens=False)["input_ids"] == whole
    sft = load_rows(ds("imdb", cache, data_files=files("imdb", train="train.jsonl", test="test.jsonl"),
                       on_bad_row="skip"), "sft", "train", None, gpt)
    seqs = encode_all(sft, gpt, cfg, "sft")
    assert all(s.prompt_len == 10 and s.ids[-1] == gpt.eos_token_id for s in seqs)
    with pytest.raises(UserError, match=r"prefix.unit=tokens .* none was given"):
        load_rows(cfg, "prompts", "eval")


def test_imdb_has_no_preference_rows(cache):
    cfg = ds("imdb", cache, data_files=files("imdb", train="train.jsonl", test="test.jsonl"))
    with pytest.raises(UserError, match=r"synthetic-pairs loop"):
        load_rows(cfg, "preference", "train")


# --- TL;DR ----------------------------------------------------------------------------------------

def tldr(cache, **overrides):
    sft = {"path": None, "config_name": None, "data_dir": None, "revision": None,
           "splits": {"train": "train", "eval": "valid"},
           "data_files": files("tldr", train="sft-train.jsonl", valid="sft-valid.jsonl")}
    overrides = {"sft_source": sft, **overrides}
    return ds("tldr", cache, data_files=files("tldr", train="comparisons-train.jsonl",
                                              validation="comparisons-validation.jsonl"), **overrides)


def test_tldr_comparisons(cache, tok):
    cfg = tldr(cache, on_bad_row="skip")
    pref = load_rows(cfg, "preference", "train", None, tok)
    assert len(pref) == 3  # the news article is left out (site=reddit), rows 4 and 5 are malformed
    assert pref[0] == {
        "prompt": "SUBREDDIT: r/relationships\nTITLE: Roommate eats my food\nPOST: My roommate keeps eating my food "
                  "and says it is fine because we share the fridge. I asked twice.\n\nTL;DR:",
        "completions": [" I asked my roommate to stop eating my food twice.", " roommate eats my food, what do I do"],
        "confidence": 8}
    assert pref[1]["completions"][0].startswith(" Pay off") and pref[1]["confidence"] is None
    assert encode_all(pref, tok, cfg, "preference")
    with pytest.raises(UserError, match=r"row 4 .*a summary is empty"):
        load_rows(tldr(cache), "preference", "train")
    # confidence filters
    assert [r["confidence"] for r in load_rows(tldr(cache, on_bad_row="skip", min_confidence=5),
                                               "preference", "train")] == [8, None]
    assert [r["confidence"] for r in load_rows(tldr(cache, on_bad_row="skip", min_confidence=5,
                                                    null_confidence="drop"), "preference", "train")] == [8]
    # prompt rows from the validation comparisons: reference = chosen summary; repeated posts kept or not
    prompts = load_rows(cfg, "prompts", "eval")
    assert [r["reference"] for r in prompts] == [" Dog hides from the vacuum; how to help?",
                                                 " My dog is scared of the vacuum cleaner and hides."]
    assert len(load_rows(tldr(cache, unique_prompts=True), "prompts", "eval")) == 1
    news = load_rows(tldr(cache, site="news"), "prompts", "eval")
    assert news == [{"prompt": "Summarize this news article clearly and concisely. Use TL;DR in your response:\n"
                               "TITLE: Team wins final\nThe home team won the final 2-1 after extra time.\nTL;DR:",
                     "reference": " Home team wins the final 2-1 in extra time.", "confidence": None}]
    assert len(load_rows(tldr(cache, site="all", max_rows={"train": None, "eval": 2}), "prompts", "eval")) == 2


def test_tldr_sft(cache, tok):
    sft = load_rows(tldr(cache, on_bad_row="skip"), "sft", "train", None, tok)
    assert sft == [
        {"prompt": "SUBREDDIT: r/cooking\nTITLE: Rice always burns\nPOST: My rice burns at the bottom every time."
                   "\nTL;DR:",
         "completion": " my rice keeps burning, help"},
        {"prompt": "SUBREDDIT: r/running\nTITLE: First 10k\nPOST: I ran my first 10k today and loved it.\nTL;DR:",
         "completion": " Ran my first 10k and loved it."}]
    with pytest.raises(UserError, match=r"row 2 .*the summary is empty"):
        load_rows(tldr(cache), "sft", "train")
    # sft_source: null -> the comparisons' chosen summaries
    from_pairs = load_rows(tldr(cache, sft_source=None, on_bad_row="skip"), "sft", "train")
    assert from_pairs[0]["completion"] == " I asked my roommate to stop eating my food twice."
    with pytest.raises(UserError, match=r"lacks column.*columns found: info, summaries"):
        load_rows(tldr(cache, **{"sft_source.data_files": files("tldr", train="comparisons-train.jsonl")}),
                  "sft", "train")


# --- UltraFeedback --------------------------------------------------------------------------------

def uf(cache, **overrides):
    return ds("ultrafeedback", cache, data_files=files("ultrafeedback", train_prefs="train_prefs.jsonl",
                                                       test_prefs="test_prefs.jsonl"), **overrides)


def test_ultrafeedback_chat_rows(cache, chat_tok):
    cfg = uf(cache, on_bad_row="skip")
    pref = load_rows(cfg, "preference", "train", None, chat_tok)
    assert len(pref) == 3  # rows 2 (prompts differ) and 3 (rejected ends with a user turn) are malformed
    assert pref[0] == {"prompt": "<bos><|user|>\nWrite a haiku about rain.<|end|>\n<|assistant|>\n",
                       "completions": ["Soft rain on the roof\nthe film ends, the lights come up\nwe walk home slowly"
                                       "<|end|>\n", "Rain is wet.<|end|>\n"],
                       "scores": [8.5, 3.0]}
    multi = pref[1]
    assert multi["prompt"] == ("<bos><|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4.<|end|>\n<|user|>\nAnd times 3?"
                               "<|end|>\n<|assistant|>\n")
    assert multi["completions"] == ["12.<|end|>\n", "7.<|end|>\n"]
    seqs = encode_all(pref, chat_tok, cfg, "preference")
    end = chat_tok.convert_tokens_to_ids("<|end|>")
    for s in seqs:  # one BOS (the template's), and the template's end-of-turn instead of EOS
        assert s.ids[0] == chat_tok.bos_token_id and chat_tok.bos_token_id not in s.ids[1:]
        assert end in s.ids[s.prompt_len:] and chat_tok.eos_token_id not in s.ids
    with pytest.raises(UserError, match=r"row 2 .*chosen and rejected differ before their last assistant message"):
        load_rows(uf(cache), "preference", "train", None, chat_tok)
    rewards = load_rows(uf(cache, on_bad_row="skip", scores_as_rewards=True), "preference", "eval", None, chat_tok)
    assert [r["rewards"] for r in rewards] == [[9.0, 2.0], [8.0, 1.0]] and "scores" not in rewards[0]
    sft = load_rows(cfg, "sft", "eval", None, chat_tok)
    assert sft[0] == {"prompt": "<bos><|user|>\nSay hello in French.<|end|>\n<|assistant|>\n",
                      "completion": "Bonjour !<|end|>\n"}
    prompts = load_rows(cfg, "prompts", "eval", None, chat_tok)
    assert prompts[1] == {"prompt": "<bos><|user|>\nIs the sky green?<|end|>\n<|assistant|>\n",
                          "reference": "No, on a clear day it looks blue.",
                          "messages": [{"role": "user", "content": "Is the sky green?"}]}


def test_ultrafeedback_template_errors(cache, tok, chat_tok):
    plain = load_tokenizer(tok.name_or_path)
    assert not plain.chat_template
    with pytest.raises(UserError, match=r"has no chat template"):
        load_rows(uf(cache), "preference", "eval", None, plain)
    with pytest.raises(UserError, match=r"renders conversations with the model's chat template"):
        load_rows(uf(cache), "preference", "eval")
    # dataset.chat_template supplies one (e.g. for a base model)
    rows = load_rows(uf(cache, chat_template=CHAT), "preference", "eval", None, plain)
    assert rows[0]["completions"][0] == "Bonjour !<|end|>\n"
    # a template whose prompt is not a prefix of the whole conversation cannot be split
    odd = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
           "{% if add_generation_prompt %}ANSWER:{% else %}DONE{% endif %}")
    with pytest.raises(UserError, match=r"row 0: the chat template does not render the prompt"):
        load_rows(uf(cache, chat_template=odd), "preference", "eval", None, plain)


def test_ultrafeedback_argilla_carves_eval_by_prompt(cache, chat_tok):
    def load(split, **kw):
        cfg = ds("ultrafeedback_argilla", cache, data_files=files("ultrafeedback_argilla", train="train.jsonl"),
                 on_bad_row="skip", eval_fraction=0.3, **kw)
        return [r["prompt"] for r in load_rows(cfg, "preference", split, None, chat_tok)]

    train, held_out = load("train"), load("eval")
    assert train and held_out and not set(train) & set(held_out)
    assert len(train) + len(held_out) == 11  # 12 rows, one malformed (empty rejected reply)
    assert load("eval") == held_out  # deterministic
    assert load("eval", seed=1) != held_out  # and seeded
    row = load_rows(ds("ultrafeedback_argilla", cache, data_files=files("ultrafeedback_argilla", train="train.jsonl"),
                       on_bad_row="skip"), "preference", "train", None, chat_tok)[0]
    assert row["scores"] == [5.0, 2.0] and row["completions"][0].endswith("<|end|>\n")


# --- local rows -----------------------------------------------------------------------------------

def test_local_files_in_row_schema(cache, tok):
    cfg = ds("local", cache, data_files=files("local", train="preference.jsonl", eval="pairs.json"),
             on_bad_row="skip")
    pref = load_rows(cfg, "preference", "train", None, tok)
    assert pref == [{"prompt": "the movie was", "completions": [" great", " fine", " awful"],
                     "rewards": [2.0, 0.5, -1.5]},
                    {"prompt": "this film is", "completions": [" a joy", " ok", " dull"], "rewards": [1.0, 0.0, -1.0]}]
    assert load_rows(cfg, "preference", "eval") == [
        {"prompt": "the ending", "completions": [" was moving", " was silly"]},
        {"prompt": "the music", "completions": [" is lovely", " is noise"]}]
    assert load_rows(cfg, "sft", "eval")[1] == {"prompt": "the music", "completion": " is lovely"}
    assert load_rows(cfg, "prompts", "train")[0] == {"prompt": "the movie was", "reference": " great"}
    assert encode_all(pref, tok, cfg, "preference")
    with pytest.raises(UserError, match=r"row 2 .*'rewards' must be one number per completion"):
        load_rows(ds("local", cache, data_files=files("local", train="preference.jsonl", eval="pairs.json")),
                  "preference", "train")
    sft_cfg = ds("local", cache, data_files=files("local", train="sft.jsonl"), splits={"train": "train", "eval": None},
                 on_bad_row="skip", eval_fraction=0.5, seed=1)  # seed 1 puts one prompt on each side
    train, held_out = load_rows(sft_cfg, "sft", "train"), load_rows(sft_cfg, "sft", "eval")
    assert [r["prompt"] for r in train] == ["the movie was"] and [r["prompt"] for r in held_out] == ["this film is"]
    both = train + held_out
    assert all(r["source"] == "hand" for r in both)
    with pytest.raises(UserError, match=r"row 2 .*'completion' is missing or empty"):
        load_rows(ds("local", cache, data_files=files("local", train="sft.jsonl", eval="sft.jsonl")),
                  "sft", "train")


def test_carve_holds_out_a_prompt_even_when_no_hash_falls_under_the_fraction(cache, tmp_path):
    """Three prompts and eval_fraction=1e-6: no prompt's hash is that small, so the smallest is
    held out (train and eval reads agree on which) rather than leaving eval empty."""
    path = tmp_path / "rows.jsonl"
    prompts = ["be kind", "say hello", "thank them"]
    path.write_text("".join(json.dumps({"prompt": p, "chosen": f" yes {i}", "rejected": f" no {i}"}) + "\n"
                            for p in prompts for i in range(3)))
    cfg = ds("local", cache, data_files={"train": str(path)}, splits={"train": "train", "eval": None},
             eval_fraction=1e-6)
    train, held_out = load_rows(cfg, "preference", "train"), load_rows(cfg, "preference", "eval")
    assert len({r["prompt"] for r in held_out}) == 1 and len(held_out) == 3
    assert {r["prompt"] for r in train} == set(prompts) - {held_out[0]["prompt"]} and len(train) == 6
    assert load_rows(cfg, "preference", "eval") == held_out
    single = tmp_path / "one.jsonl"  # one distinct prompt: nothing can be held out without emptying train
    single.write_text(json.dumps({"prompt": "hi", "chosen": " a", "rejected": " b"}) + "\n")
    one = ds("local", cache, data_files={"train": str(single)}, splits={"train": "train", "eval": None},
             eval_fraction=1e-6)
    assert len(load_rows(one, "preference", "train")) == 1


# --- reading ----------------------------------------------------------------------------------------

def test_source_errors_are_one_clear_line(cache):
    with pytest.raises(UserError, match=r"lacks column.*chosen, rejected; columns found: text, label"):
        load_rows(ds("hh", cache, data_files=files("hh", train="../imdb/train.jsonl", test="test.jsonl")),
                  "preference", "train")
    with pytest.raises(UserError, match=r"data file .*nope.jsonl does not exist"):
        load_rows(ds("hh", cache, data_files={"train": str(FIX / "nope.jsonl")}), "preference", "train")
    with pytest.raises(UserError, match=r"data_files has no 'test' entry"):
        load_rows(ds("hh", cache, data_files=files("hh", train="train.jsonl")), "preference", "eval")
    with pytest.raises(UserError, match=r"cannot tell the format"):
        load_rows(ds("hh", cache, data_files={"train": "rows.txt"}), "preference", "train")
    with pytest.raises(UserError, match=r"set dataset.path \(a Hub id\) or dataset.data_files"):
        load_rows(ds("local", cache), "sft", "train")
    limited = ds("hh", cache, data_files=files("hh", train="train.jsonl", test="test.jsonl"),
                 max_rows={"train": 2, "eval": 1})
    assert len(load_rows(limited, "sft", "train")) == 2 and len(load_rows(limited, "sft", "eval")) == 1


def test_hub_id_offline_is_a_user_error(offline_probe):
    """HF_HUB_OFFLINE=1, a Hub id and an empty cache: one line naming the problem and data_files."""
    out, err = offline_probe.communicate(timeout=120)
    lines = [line for line in out.splitlines() if line.startswith("USERERROR")]
    assert len(lines) == 1, out + err
    assert "Anthropic/hh-rlhf" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert "data_files={train: <file>, test: <file>}" in lines[0]
