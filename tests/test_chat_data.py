"""Conversational rows (message lists, TRL's forms) through real families' chat templates: the
prompt is the template's rendering with the generation prompt, each response exactly what the
template adds after it (end-of-turn included), and no doubled BOS."""

import json
from pathlib import Path

import pytest
from families import llama3_tokenizer, qwen25_tokenizer
from omegaconf import OmegaConf

from prefkit.data import encode, encode_options
from prefkit.datasets import load_rows
from prefkit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
USER = {"role": "user", "content": "Say hello in French."}
GOOD = {"role": "assistant", "content": "Bonjour !"}
BAD = {"role": "assistant", "content": "No."}
SYSTEM = {"role": "system", "content": "Answer briefly."}


@pytest.fixture(scope="module", params=["llama3", "qwen2.5"])
def family(request, tmp_path_factory):
    build = {"llama3": llama3_tokenizer, "qwen2.5": qwen25_tokenizer}[request.param]
    return request.param, build(tmp_path_factory.mktemp(request.param))


def local_chat(files: dict, tmp: Path, **overrides):
    """conf/dataset/local_chat.yaml as Hydra composes it (over local.yaml)."""
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf/dataset/local.yaml"),
                          {k: v for k, v in OmegaConf.load(ROOT / "conf/dataset/local_chat.yaml").items()
                           if k != "defaults"})
    cfg.data_files, cfg.cache_dir = files, str(tmp / "cache")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_conversational_form_renders_through_the_template(family, tmp_path):
    name, tok = family
    prefs = write(tmp_path / "prefs.jsonl", [
        {"chosen": [SYSTEM, USER, GOOD], "rejected": [SYSTEM, USER, BAD]},            # implicit prompt
        {"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD], "id": 7}])    # explicit prompt
    sft = write(tmp_path / "sft.jsonl", [{"messages": [SYSTEM, USER, GOOD]},
                                         {"prompt": [SYSTEM, USER], "completion": [GOOD]}])
    prompts = write(tmp_path / "prompts.jsonl", [{"messages": [SYSTEM, USER]}, {"prompt": [SYSTEM, USER]}])
    expected_prompt = tok.apply_chat_template([SYSTEM, USER], tokenize=False, add_generation_prompt=True)
    whole = tok.apply_chat_template([SYSTEM, USER, GOOD], tokenize=False)
    eot = {"llama3": "<|eot_id|>", "qwen2.5": "<|im_end|>\n"}[name]
    assert whole == expected_prompt + "Bonjour !" + eot

    pref_rows = load_rows(local_chat({"train": prefs, "eval": prefs}, tmp_path), "preference", "train", None, tok)
    assert [r["prompt"] for r in pref_rows] == [expected_prompt] * 2
    assert pref_rows[0]["completions"] == ["Bonjour !" + eot, "No." + eot] and pref_rows[1]["id"] == 7
    sft_rows = load_rows(local_chat({"train": sft, "eval": sft}, tmp_path), "sft", "train", None, tok)
    assert {(r["prompt"], r["completion"]) for r in sft_rows} == {(expected_prompt, "Bonjour !" + eot)}
    prompt_rows = load_rows(local_chat({"train": prompts, "eval": prompts}, tmp_path), "prompts", "train", None, tok)
    assert all(r["prompt"] == expected_prompt and r["messages"] == [SYSTEM, USER] for r in prompt_rows)

    # tokens: the prompt's, then exactly the template's continuation; the end-of-turn id last; one BOS at most
    ds = local_chat({"train": prefs}, tmp_path)
    e = encode(tok, pref_rows[0]["prompt"], pref_rows[0]["completions"][0], **{**encode_options(ds), "max_length": 512,
                                                                               "max_prompt_length": 512})
    assert tok.decode(e.ids) == whole
    assert list(e.ids[:e.prompt_len]) == tok(expected_prompt, add_special_tokens=False)["input_ids"]
    eot_id = tok.convert_tokens_to_ids(eot.strip())
    assert eot_id in e.ids[e.prompt_len:]
    if tok.bos_token_id is not None:
        assert list(e.ids).count(tok.bos_token_id) == 1 and e.ids[0] == tok.bos_token_id


def test_a_template_without_a_system_prompt_still_splits(family, tmp_path):
    _, tok = family
    rows = write(tmp_path / "p.jsonl", [{"chosen": [USER, GOOD], "rejected": [USER, BAD]}])
    got = load_rows(local_chat({"train": rows, "eval": rows}, tmp_path), "preference", "train", None, tok)
    assert got[0]["prompt"] == tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)


def test_plain_and_conversational_files_are_each_pointed_to_their_dataset(tmp_path):
    tok = llama3_tokenizer(tmp_path / "tok")
    chats = write(tmp_path / "c.jsonl", [{"chosen": [USER, GOOD], "rejected": [USER, BAD]}])
    plain = write(tmp_path / "t.jsonl", [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}])
    local = OmegaConf.load(ROOT / "conf/dataset/local.yaml")
    local.data_files, local.cache_dir = {"train": chats, "eval": chats}, str(tmp_path / "cache")
    with pytest.raises(UserError, match="lacks column\\(s\\) prompt \\(for conversational files of message lists "
                                        "use dataset=local_chat\\)"):
        load_rows(local, "preference", "train", None, tok)  # the implicit-prompt form has no prompt column
    explicit = write(tmp_path / "e.jsonl", [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}])
    local.data_files = {"train": explicit, "eval": explicit}
    with pytest.raises(UserError, match=r"row 0 .*a conversation \(message lists\): read conversational files "
                                        "with dataset=local_chat"):
        load_rows(local, "preference", "train", None, tok)
    with pytest.raises(UserError, match=r"row 0 .*'prompt' is text, not a list of messages: read plain-text rows "
                                        "with dataset=local"):
        load_rows(local_chat({"train": plain, "eval": plain}, tmp_path), "preference", "train", None, tok)
    mixed = write(tmp_path / "m.jsonl", [{"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "x"}, BAD]}])
    with pytest.raises(UserError, match="chosen and rejected differ before their last assistant message"):
        load_rows(local_chat({"train": mixed, "eval": mixed}, tmp_path), "preference", "train", None, tok)


def test_a_tokenizer_without_a_template_is_one_line(tmp_path):
    from prefkit.models import load_tokenizer

    tok = qwen25_tokenizer(tmp_path / "tok")
    plain = load_tokenizer(str(tmp_path / "tok"))
    plain.chat_template = None
    rows = write(tmp_path / "c.jsonl", [{"chosen": [USER, GOOD], "rejected": [USER, BAD]}])
    with pytest.raises(UserError, match=r"has no chat template; use a chat \(instruct\) model or set "
                                        "dataset.chat_template"):
        load_rows(local_chat({"train": rows, "eval": rows}, tmp_path), "preference", "train", None, plain)
    got = load_rows(local_chat({"train": rows, "eval": rows}, tmp_path, chat_template=tok.chat_template),
                    "preference", "train", None, plain)
    assert got[0]["completions"][0] == "Bonjour !<|im_end|>\n"
