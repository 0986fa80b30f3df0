"""The whole pipeline on a tiny embedded task, as a user runs it: every stage through the CLI,
reading and writing one run directory; then what each stage wrote."""

from __future__ import annotations

import csv
import http.server
import json
import re
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import TINY, TINY_ALIGN, TINY_SFT, prefkit

pytestmark = pytest.mark.slow  # the CLI end to end

RUN = "pipe"
SAMPLING = ["sample.max_new_tokens=24", "sample.batch_size=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    r = f"run.name={RUN}"
    prefkit("sft", r, *TINY_SFT, cwd=root)
    prefkit("sample", r, "job=pool", "sample.policies=[sft]", "sample.split=train", "sample.n=4", *TINY, *SAMPLING,
            cwd=root)
    prefkit("judge", r, "job=label", "judge.task=label", "judge.samples=pool", "judge.label.eval_fraction=0.25",
            *TINY, cwd=root)
    prefkit("reward", r, "dataset=labeled", "reward.kind=drdo_oracle", "model=tiny_test", "train.max_steps=4",
            "train.batch_size=8", "hardware.micro_batch_size=8", "train.eval_every=4", cwd=root)
    align = [a for a in TINY_ALIGN if not a.startswith("dataset=")]
    prefkit("align", "-m", r, "dataset=labeled", "objective=dpo,tdpo2,edpo,exo,simpo", *align, cwd=root)
    prefkit("align", r, "dataset=labeled", "objective=drdo", "rewards.source=model", *align, cwd=root)
    prefkit("sample", r, "job=eval", "sample.n=2", "sample.n_reference=8", *TINY, *SAMPLING, cwd=root)
    prefkit("judge", r, "job=eval", "judge.samples=eval", *TINY, cwd=root)
    prefkit("frontier", r, "job=plot", cwd=root)
    return root / "outputs" / RUN


def _sft(run: Path) -> Path:
    (job,) = [p for p in (run / "sft").iterdir() if p.is_dir()]
    return job


def test_sft_model_loads_with_from_pretrained(run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(_sft(run) / "model")
    saved = load_file(_sft(run) / "model/model.safetensors")
    state = {**model.state_dict(), "embed_out.weight": model.get_output_embeddings().weight}  # named lm_head in 5.x
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())  # the trained weights, not a fresh init
    tok = AutoTokenizer.from_pretrained(_sft(run) / "model")
    ids = tok("the movie was", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_label_step_makes_pairs_best_first(run):
    rows = [json.loads(line) for line in (run / "judge/label/pairs.jsonl").read_text().splitlines()]
    assert rows and {r["split"] for r in rows} == {"train", "eval"}
    pool = run / "sample/pool/sft" / _sft(run).name / "samples.jsonl"
    samples = [json.loads(line) for line in pool.read_text().splitlines()]
    from prefkit.data import join_text
    from prefkit.synthetic import oracle_reward

    by_prompt: dict[int, list[float]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_id"], []).append(oracle_reward(join_text(s["prompt"], s["completion"])))
    for r in rows:
        assert len(r["completions"]) == 2 and r["rewards"][0] > r["rewards"][1]
        assert r["rewards"][0] == max(by_prompt[r["prompt_id"]])  # best against worst
        assert r["rewards"] == [oracle_reward(join_text(r["prompt"], c)) for c in r["completions"]]


def test_reward_model_and_align_jobs(run):
    reward = next((run / "reward").iterdir())
    assert (reward / "model/reward_head.safetensors").exists() and (reward / "lineage.json").exists()
    jobs = {p.name: p for p in (run / "align").iterdir() if p.is_dir()}
    for name in ("dpo", "tdpo2", "edpo", "exo", "simpo", "drdo"):
        job = next(p for n, p in jobs.items() if n.split("_")[0] == name)
        assert (job / "model/model.safetensors").exists() and (job / "lineage.json").exists()
        metrics = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        keys = set().union(*metrics)
        assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "eval_loss", "eval_rewards/accuracies"} <= keys, (name, keys)
        if name == "tdpo2":
            assert {"kl/chosen", "kl/rejected", "kl/margin"} <= keys
        if name == "edpo":
            assert {"kl/beta", "beta", "kl/p_epsilon_steps"} <= keys
        if name == "drdo":
            assert (job / "model/reward_head.safetensors").exists()
            assert "reward_model" in json.loads((job / "lineage.json").read_text())["inputs"]
    # one reference cache for the sweep's jobs that can use scalar reference log-probs (dpo, exo)
    assert len(list((run / "cache/ref_logps").glob("*.safetensors"))) == 1


def test_samples_carry_their_statistics(run):
    index = json.loads((run / "sample/eval/policies.json").read_text())
    assert len(index) == 7  # sft + six aligned policies
    for key, entry in index.items():
        rows = [json.loads(line) for line in Path(entry["samples"]).read_text().splitlines()]
        per_prompt = 8 if key.startswith("sft/") else 2
        assert len(rows) == 16 * per_prompt
        for r in rows:
            assert 1 <= r["n_tokens"] <= 24 and r["finished"] == (r["completion_ids"][-1] == 3)
            assert r["kl_exact"] >= -1e-5 and r["entropy"] >= 0
            if key.startswith("sft/"):  # the reference of itself
                assert r["logp_policy"] == r["logp_ref"] and r["kl_exact"] == 0.0


def test_judge_summary_and_frontier(run):
    summary = json.loads((run / "judge/eval/summary.json").read_text())
    for entry in summary["policies"].values():
        assert entry["reward"]["low"] <= entry["reward"]["mean"] <= entry["reward"]["high"]
        assert set(entry["kl"]) == {"k1", "k3", "exact"}
        for est in entry["kl"].values():
            assert est["low"] <= est["mean"] <= est["high"]
    plot = run / "frontier/plot"
    for name in ("frontier.png", "frontier.svg", "frontier.csv", "frontier_seeds.csv", "optimal.csv", "best_of_n.csv",
                 "matched_kl.csv", "summary.json", "lineage.json"):
        assert (plot / name).exists(), name
    rows = list(csv.DictReader((plot / "frontier.csv").open()))
    assert len(rows) == 7 and {r["objective"] for r in rows} >= {"sft-reference", "dpo", "tdpo2", "drdo"}
    assert all(r["seeds"] == "1" for r in rows) and len(list(csv.DictReader((plot / "frontier_seeds.csv").open()))) == 7
    ref = next(r for r in rows if r["objective"] == "sft-reference")
    assert abs(float(ref["kl"])) < 1e-4
    assert abs(float(ref["gap_to_optimal"])) < 1e-9  # the optimal frontier starts at the reference (β = inf)
    optimal = list(csv.DictReader((plot / "optimal.csv").open()))
    trusted = max(float(o["kl"]) for o in optimal if o["low_ess"] == "False")
    for r in rows:  # a gap with its CI wherever the optimal frontier is estimated; none beyond it
        if float(r["kl"]) <= trusted and r["gap_to_optimal"] != "nan":
            assert float(r["gap_low"]) <= float(r["gap_to_optimal"]) <= float(r["gap_high"]), r
        if float(r["kl"]) > trusted:
            assert r["gap_to_optimal"] == "nan", r
    assert all(o["proposal"] in {r["policies"] for r in rows} for o in optimal)  # the reference or a sampled policy
    bon = list(csv.DictReader((plot / "best_of_n.csv").open()))
    assert [int(b["n"]) for b in bon] == [1, 2, 4, 8]


def test_win_rate_with_the_reward_model_judge(run):
    prefkit("judge", f"run.name={RUN}", "job=wr", "judge.task=winrate", "judge.samples=eval",
            "judge.scorer=reward_model", *TINY, cwd=run.parent.parent)
    result = json.loads((run / "judge/wr/winrates.json").read_text())
    assert result["baseline"] == f"sft/{_sft(run).name}" and len(result["results"]) == 6
    for r in result["results"].values():
        assert 0 <= r["low"] <= r["rate"] <= r["high"] <= 1
        assert r["wins"] + r["ties"] + r["losses"] == r["n"] == 16


class _Endpoint(http.server.BaseHTTPRequestHandler):
    """A fake OpenAI-compatible endpoint: reads a request, replies with bytes."""

    def request_body(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def reply(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


A_WINS = json.dumps({"model": "fake-judge-v2",
                     "choices": [{"message": {"content": "Comparison: A is nicer.\nPreferred: A"}}]}).encode()


class _AlwaysA(_Endpoint):
    """A judge that always prefers position A."""

    seen_keys: ClassVar[list[str]] = []

    def do_POST(self):
        self.seen_keys.append(self.headers.get("Authorization", ""))
        assert self.request_body()["messages"][-1]["content"].count("Continuation A:") == 1
        self.reply(A_WINS)


def test_llm_judge_asks_both_orders_and_never_stores_the_key(run):
    server = http.server.HTTPServer(("127.0.0.1", 0), _AlwaysA)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = "sk-test-5f3a9c"
    index = json.loads((run / "sample/eval/policies.json").read_text())
    dpo = next(k for k in index if k.startswith("align/dpo_"))
    try:
        prefkit("judge", f"run.name={RUN}", "job=llm", "judge.task=winrate", "judge.samples=eval",
                "judge.winrate.judge=llm", "judge.llm.model=fake-judge", f"judge.winrate.candidates=['{dpo}']",
                "judge.winrate.max_prompts=5", *TINY, cwd=run.parent.parent,
                env={"PREFKIT_JUDGE_BASE_URL": f"http://127.0.0.1:{server.server_port}",
                     "PREFKIT_JUDGE_API_KEY": secret})
    finally:
        server.shutdown()
    assert _AlwaysA.seen_keys and all(k == f"Bearer {secret}" for k in _AlwaysA.seen_keys)
    assert len(_AlwaysA.seen_keys) == 10  # 5 prompts × both orders
    result = json.loads((run / "judge/llm/winrates.json").read_text())
    assert result["answered_by"] == ["fake-judge-v2"]
    r = result["results"][dpo]
    # A always wins: the candidate wins as A and loses as B -> every comparison is a tie (fastchat rule)
    assert r["rate"] == 0.5 and r["ties"] == 5 and r["position_consistency"] == 0.0
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".log"):
            assert secret not in path.read_text(errors="ignore"), path


class _TiresAfterFour(_Endpoint):
    """Answers four requests (two comparisons) as _AlwaysA would, then stops answering."""

    calls: ClassVar[list[int]] = []

    def do_POST(self):
        self.calls.append(1)
        if len(self.calls) <= 4:
            self.request_body()
            self.reply(A_WINS)


def _serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_an_llm_judge_that_gives_up_keeps_every_finished_comparison(run):
    index = json.loads((run / "sample/eval/policies.json").read_text())
    dpo = next(k for k in index if k.startswith("align/dpo_"))
    args = ["judge", f"run.name={RUN}", "job=llm-resume", "judge.task=winrate", "judge.samples=eval",
            "judge.winrate.judge=llm", "judge.llm.model=fake-judge", f"judge.winrate.candidates='{dpo}'",
            "judge.winrate.max_prompts=5", "judge.llm.timeout_s=0.5", "judge.llm.retries=1", *TINY]
    slow = _serve(_TiresAfterFour)
    try:
        proc = prefkit(*args, cwd=run.parent.parent, check=False,
                       env={"PREFKIT_JUDGE_BASE_URL": f"http://127.0.0.1:{slow.server_port}"})
    finally:
        slow.shutdown()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "the 2 comparison(s) judged so far are kept" in lines[-1], proc.stderr
    _AlwaysA.seen_keys.clear()
    good = _serve(_AlwaysA)
    try:  # a single string for a list option is one item
        prefkit(*args, cwd=run.parent.parent, env={"PREFKIT_JUDGE_BASE_URL": f"http://127.0.0.1:{good.server_port}"})
    finally:
        good.shutdown()
    assert len(_AlwaysA.seen_keys) == 6  # only the 3 comparisons not yet judged, both orders
    r = json.loads((run / "judge/llm-resume/winrates.json").read_text())["results"][dpo]
    assert r["n"] == 5 and r["ties"] == 5


class _Garbled(_Endpoint):
    replies: ClassVar[list[bytes]] = [b"\xff\xfe not utf-8", b'{"choices": []}', b'{"choices": [{"message": {}}]}',
                                      b"not json"]

    def do_POST(self):
        self.request_body()
        self.reply(self.replies.pop(0))


def test_unreadable_judge_replies_are_invalid_verdicts_not_crashes(monkeypatch):
    from prefkit.llmjudge import OpenAIBackend, Template, judge_both_orders

    server = _serve(_Garbled)
    monkeypatch.setenv("PREFKIT_JUDGE_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    try:
        backend = OpenAIBackend("m", 8, 0.0, timeout_s=5, retries=1)
        template = Template("", "{prompt} {a} {b}", r"Preferred:\s*([AB])")
        for _ in range(2):
            assert judge_both_orders(backend, template, "p", "a", "b")[:2] == (None, None)
    finally:
        server.shutdown()


def test_report_is_one_self_contained_document(run):
    prefkit("report", f"run.name={RUN}", "job=doc", cwd=run.parent.parent)
    doc = run / "report/doc"
    page = (doc / "report.html").read_text()
    for section in ("Reward vs KL", "Reward at matched KL", "Training curves", "Samples", "Lineage"):
        assert section in page, section
    sources = re.findall(r'(?:src|href)="([^"#]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # no file, server or network
    assert page.count("<img") >= 3  # the frontier and the training curves of the aligned series
    md = (doc / "report.md").read_text()
    for image in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (doc / image).exists(), image
    assert "prefkit align" in md and "| series |" in md


def test_every_logged_metric_is_declared_and_every_declared_one_logged(run):
    """What an experiment's claims are checked against before a run (prefkit.diagnostics.logged_metrics)
    is what the align jobs write: nothing undeclared, nothing declared that never appears."""
    from omegaconf import OmegaConf

    from prefkit.diagnostics import logged_metrics
    from prefkit.objectives.base import TRL_METRICS, build

    for job in sorted(p for p in (run / "align").iterdir() if p.is_dir()):
        cfg = OmegaConf.load(job / "config.yaml")
        objective, sft_weight = build(OmegaConf.to_container(cfg.objective, resolve=True))
        declared = logged_metrics(objective, cfg.get("diagnostics"), sft_weight)
        written = {k for line in (job / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)} - {"step"}
        assert written <= declared, (job.name, written - declared)
        own = {*TRL_METRICS, *objective.logs} - {"tr_dpo/reference_updates"}
        assert own <= written and {f"eval_{k}" for k in set(TRL_METRICS) | set(objective.logs)
                                   if not k.startswith(("kl/beta", "kl/avg", "beta"))} <= written, job.name
