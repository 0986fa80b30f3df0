"""Peak memory of one TDPO2 training step (forward + backward), and of one ε-DPO step, with
prefkit's chunked LM-head path against the official full-vocabulary approach.

    .venv/bin/python scripts/bench_tdpo_memory.py                   # vocab 50,304, 512 tokens, 8 pairs
    .venv/bin/python scripts/bench_tdpo_memory.py --vocab 8192 --seq-len 256    # a quick check

Setup: 8 pairs = 16 sequences of 512 tokens (chosen
rows first, then rejected, as the official code concatenates them), Pythia's vocabulary 50,304,
and a small GPT-NeoX backbone (2 layers, hidden 128, 4 heads, MLP 512, untied embeddings: about
13.6M parameters, 12.9M of them in the two embeddings) so that the LM-head side dominates, as in
the spec. Prompts are 32 tokens (BOS + 31); responses are 384-480 tokens (EOS last), padded on the
right to 512, so about 7,000 of the 8,176 shifted positions are response tokens. The policy is
the reference plus seeded noise (σ = --perturb), so the KL terms and the ε-DPO decisions are not
trivial. Everything is float32.

  official  TDPO2: the official TDPO code path (Vance0124/Token-level-Direct-Preference-Optimization,
            trainers.py): full [N, L, V] logits of both models, the policy log_softmax, the reference
            softmax and its log (here log_softmax, as prefkit does, to avoid 0·log 0 = NaN; the same
            tensors stay alive),
            per-position KL, masked sums, tdpo_loss, backward.
            ε-DPO: the official trainer's concatenated_forward (oddqueue/e-dpo, trainer.py): full logits,
            log_softmax of the policy, the two logit mixtures (1±ε)·logits ∓ ε·ref_logits built on
            the grad-carrying logits (as the official code does), their log_softmaxes, the step
            decision, DPO with the per-pair β̃, backward.
  prefkit   what `prefkit align` runs: reference_hidden, then StatsLM.forward with the
            objective's own TokenRequest (TDPO2: kl + reverse_kl; ε-DPO: mixtures (1+ε, 1−ε)),
            recompute=True (align's recompute_lm_head=auto for these objectives), chunk size
            --chunk (align's hardware.logprob_chunk, auto by default), then Groups → objective.loss,
            backward.

Method (CPU): every measurement runs in a fresh subprocess that builds the models and the batch,
collects garbage, resets the kernel's peak-RSS counter (writes 5 to /proc/self/clear_refs; falls
back to ru_maxrss when that is not allowed), reads VmRSS as the baseline, runs the step, and
reports VmHWM − baseline: the extra resident memory at the peak of the step. On CUDA:
torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before.
The loss, the decisions and every parameter gradient are checked to agree between the two
approaches: loss within 1e-5 relative, and each gradient tensor torch.allclose(rtol=1e-5,
atol=1e-5 × its largest entry), the criterion of tests/test_trl_parity.py; the table prints the
loss's relative error and the worst max|Δg| / max|g| over the tensors. A float64 run of prefkit's
path (which matches the official path in float64 to ~1e-13; --no-truth skips it) says which
float32 implementation a disagreement comes from, and the same criterion is checked for each
against it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc
import torch
import torch.nn.functional as F

TOL = 1e-5
TARGET = 0.35


# --- the worker: one measurement in a fresh process -----------------------------------------------

def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> str:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM after clear_refs"
    except OSError:
        return "ru_maxrss (no reset)"


def read_peak(device: torch.device, how: str) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    if how.startswith("VmHWM"):
        return status_kb("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(args):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from prefkit.models import disable_dropout, freeze

    config = GPTNeoXConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                           max_position_embeddings=max(512, args.seq_len), tie_word_embeddings=False,
                           bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    reference = GPTNeoXForCausalLM(config)
    policy = GPTNeoXForCausalLM(config)
    policy.load_state_dict(reference.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(args.perturb * torch.randn(p.shape, generator=g))
    disable_dropout(policy)
    disable_dropout(reference)
    freeze(reference)
    policy.train()
    return policy, reference


def make_batch(args) -> dict[str, torch.Tensor]:
    """[chosen rows; rejected rows], right-padded to seq_len; labels -100 on prompt and padding."""
    g = torch.Generator().manual_seed(2)
    n = 2 * args.pairs
    resp_max = args.seq_len - args.prompt_len
    lengths = torch.randint(resp_max - 96, resp_max + 1, (n,), generator=g)
    lengths[0] = resp_max  # the batch is exactly seq_len wide
    ids = torch.zeros(n, args.seq_len, dtype=torch.long)
    mask = torch.zeros(n, args.seq_len, dtype=torch.long)
    labels = torch.full((n, args.seq_len), -100, dtype=torch.long)
    for i in range(n):
        total = args.prompt_len + int(lengths[i])
        seq = torch.randint(4, args.vocab, (total,), generator=g)
        seq[0], seq[total - 1] = 2, 3  # BOS, EOS
        ids[i, :total] = seq
        mask[i, :total] = 1
        labels[i, args.prompt_len:total] = seq[args.prompt_len:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def f32(x: torch.Tensor) -> torch.Tensor:
    """The official `.to(torch.float32)`; float64 (the agreement check's ground truth) is kept."""
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def official_tdpo(policy, reference, batch, beta: float, alpha: float):
    """_tdpo_get_batch_logps + tdpo_loss (TDPO2) on full logits, as the official code does."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        reference_all_logits = f32(reference(input_ids=ids, attention_mask=mask, use_cache=False).logits)
    all_logits = f32(policy(input_ids=ids, attention_mask=mask, use_cache=False).logits)
    labels = batch["labels"][:, 1:].clone()
    logits = all_logits[:, :-1, :]
    reference_logits = reference_all_logits[:, :-1, :]
    loss_mask = labels != -100
    labels[labels == -100] = 0
    vocab_logps = logits.log_softmax(-1)
    reference_vocab_ps = reference_logits.softmax(-1)
    reference_vocab_logps = reference_logits.log_softmax(-1)  # official: reference_vocab_ps.log()
    per_reference_token_logps = torch.gather(reference_vocab_logps, dim=2, index=labels.unsqueeze(2)).squeeze(2)
    per_position_kl = (reference_vocab_ps * (reference_vocab_logps - vocab_logps)).sum(-1)
    per_policy_token_logps = torch.gather(vocab_logps, dim=2, index=labels.unsqueeze(2)).squeeze(2)
    logps_margin = per_policy_token_logps - per_reference_token_logps
    margin = (logps_margin * loss_mask).sum(-1)
    kl = (per_position_kl * loss_mask).sum(-1)
    b = margin.shape[0] // 2
    chosen_rejected_logps_margin = margin[:b] - margin[b:]
    chosen_position_kl, rejected_position_kl = kl[:b], kl[b:]
    logits_ = chosen_rejected_logps_margin - alpha * (rejected_position_kl - chosen_position_kl.detach())
    losses = -F.logsigmoid(beta * logits_)
    return losses.mean(), {"kl_chosen": float(kl[:b].detach().mean()), "kl_rejected": float(kl[b:].detach().mean())}


def official_edpo(policy, reference, batch, beta: float, eps: float):
    """The official ε-DPO trainer's concatenated_forward + dpo_loss (TRL 0.13 style) on full logits."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = batch["labels"][:, 1:].clone()
    loss_mask = labels != -100
    labels[~loss_mask] = 0

    def seq_logps(lg):
        per_token = torch.gather(lg.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
        return (per_token * loss_mask).sum(-1)

    with torch.no_grad():  # compute_ref_log_probs: the reference's logps and its full logits
        ref_logits = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        ref_logps = seq_logps(ref_logits)
    logits = policy(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    all_logps = seq_logps(logits)
    b = all_logps.shape[0] // 2
    logratios = all_logps[:b] - all_logps[b:]
    # the official code builds the mixtures from the grad-carrying logits (no detach), as it is
    p_epsilon_logits = ((1 + eps) * logits) - (eps * ref_logits)
    p_epsilon_all_logps = seq_logps(p_epsilon_logits)
    n_epsilon_logits = ((1 - eps) * logits) + (eps * ref_logits)
    n_epsilon_all_logps = seq_logps(n_epsilon_logits)
    p_epsilon_logratios = p_epsilon_all_logps[:b] - p_epsilon_all_logps[b:]
    n_epsilon_logratios = n_epsilon_all_logps[:b] - n_epsilon_all_logps[b:]
    p_epsilon_steps = (p_epsilon_logratios > logratios) & (logratios > n_epsilon_logratios)
    n_epsilon_steps = (n_epsilon_logratios > logratios) & (logratios > p_epsilon_logratios)
    steps = 1 * p_epsilon_steps - 1 * n_epsilon_steps
    del p_epsilon_logits, n_epsilon_logits, p_epsilon_all_logps, n_epsilon_all_logps
    d = (all_logps[:b] - all_logps[b:]) - (ref_logps[:b] - ref_logps[b:])
    updated_beta = beta / (1 + eps * steps)
    losses = -F.logsigmoid(updated_beta * d)
    return losses.mean(), {"steps": steps.tolist()}


def prefkit_step(policy, reference, batch, objective, chunk: int | None):
    """align's forward for a logits-reference objective: reference_hidden → StatsLM → Groups → loss."""
    from prefkit.modules import StatsLM, reference_hidden
    from prefkit.objectives import Groups

    needs = objective.needs
    module = StatsLM(policy)
    ref = reference_hidden(reference, **batch)
    stats, _ = module(**batch, reference=ref, req=needs.tokens, chunk_size=chunk,
                      recompute=needs.tokens.needs_reference_logits)
    b = batch["input_ids"].shape[0] // 2

    def pairs(t):  # [chosen rows; rejected rows] -> [B, 2]
        return None if t is None else t.view(2, b).T

    g = Groups(logps=pairs(stats.logps), lengths=pairs(stats.lengths), training=True,
               ref_logps=pairs(stats.ref_logps), kl=pairs(stats.kl), reverse_kl=pairs(stats.reverse_kl),
               mixture_logps={lam: pairs(t) for lam, t in stats.mixture_logps.items()})
    out = objective.loss(g)
    info = {}
    if g.kl is not None:
        info = {"kl_chosen": float(g.kl[:, 0].detach().mean()), "kl_rejected": float(g.kl[:, 1].detach().mean())}
    if hasattr(objective, "steps"):
        info["steps"] = objective.steps(g).tolist()
    return out.loss, info


def worker(args) -> None:
    bc.set_threads(args.threads)
    from prefkit.objectives import build as build_objective
    from prefkit.tokenstats import chunk_setting

    device = torch.device(args.device)
    policy, reference = build(args)
    dtype = torch.float64 if args.float64 else torch.float32
    policy.to(device, dtype)
    reference.to(device, dtype)
    batch = {k: v.to(device) for k, v in make_batch(args).items()}
    if args.method == "tdpo2":
        objective, _ = build_objective({"name": "tdpo2", "beta": args.beta, "alpha": args.alpha})
    else:
        objective, _ = build_objective({"name": "edpo", "beta": args.edpo_beta, "epsilon": args.epsilon})
    n_resp = int((batch["labels"][:, 1:] != -100).sum())
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        how = "torch.cuda.max_memory_allocated"
    else:
        how = reset_peak()
        base = status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    if args.impl == "official":
        if args.method == "tdpo2":
            loss, info = official_tdpo(policy, reference, batch, args.beta, args.alpha)
        else:
            loss, info = official_edpo(policy, reference, batch, args.edpo_beta, args.epsilon)
    else:
        chunk = chunk_setting(args.chunk if args.chunk == "auto" else int(args.chunk))
        loss, info = prefkit_step(policy, reference, batch, objective, chunk)
    forward_peak = read_peak(device, how)
    loss.backward()
    peak = read_peak(device, how)
    secs = time.perf_counter() - t0
    grads = {n: p.grad.detach().cpu() for n, p in policy.named_parameters() if p.grad is not None}
    torch.save({"loss": loss.detach().cpu(), "grads": grads}, args.out + ".pt")
    with open(args.out, "w") as f:
        json.dump({"peak_bytes": peak - base, "forward_peak_bytes": forward_peak - base, "baseline_bytes": base,
                   "method": how, "seconds": secs,
                   "loss": float(loss.detach()), "info": info, "response_tokens": n_resp,
                   "params": bc.n_params(policy)}, f)


# --- the driver -----------------------------------------------------------------------------------

def measure(args, method: str, impl: str, tmp: Path, float64: bool = False) -> dict:
    out = tmp / f"{method}-{impl}{'-float64' if float64 else ''}.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method, "--impl", impl,
           "--out", str(out)] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                 if k in PASSED] + (["--float64"] if float64 else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {method}/{impl} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    res = json.loads(out.read_text())
    res["tensors"] = torch.load(str(out) + ".pt")
    return res


PASSED = ("vocab", "seq_len", "prompt_len", "pairs", "hidden", "layers", "heads", "perturb", "chunk", "beta",
          "alpha", "edpo_beta", "epsilon", "device", "threads")


def compare(a: dict, b: dict) -> tuple[bool, float, float]:
    """(agree, loss relative error, worst gradient error relative to its tensor's largest entry)."""
    la, lb = a["tensors"]["loss"].double(), b["tensors"]["loss"].double()
    loss_err = float((la - lb).abs() / la.abs().clamp(min=1e-12))
    ga, gb = a["tensors"]["grads"], b["tensors"]["grads"]
    ok = set(ga) == set(gb) and loss_err <= TOL
    worst = 0.0
    for name in ga:
        x, y = ga[name].double(), gb[name].double()
        scale = float(x.abs().max())
        worst = max(worst, float((x - y).abs().max()) / max(scale, 1e-30))
        ok = ok and torch.allclose(y, x, rtol=TOL, atol=TOL * scale)
    return ok, loss_err, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="tdpo2,edpo")
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--perturb", type=float, default=0.01, help="σ of the noise that moves the policy off the "
                                                                    "reference")
    parser.add_argument("--chunk", default="auto", help="prefkit's hardware.logprob_chunk: tokens, or auto (align's "
                                                         "default: 2^26 logits per chunk)")
    parser.add_argument("--beta", type=float, default=0.1, help="TDPO2 β")
    parser.add_argument("--alpha", type=float, default=0.5, help="TDPO2 α")
    parser.add_argument("--edpo-beta", type=float, default=0.1, help="ε-DPO β")
    parser.add_argument("--epsilon", type=float, default=0.01, help="ε-DPO ε")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per implementation (median peak)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=["fp32"], help="float32 only (the spec's arithmetic)")
    parser.add_argument("--no-truth", dest="truth", action="store_false",
                        help="skip the float64 run of prefkit's path (ground truth: it matches the official path in "
                             "float64 to ~1e-13) and report each float32 result's error against it")
    parser.add_argument("--float64", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    wall = bc.Stopwatch()
    full = 2 * args.pairs * args.seq_len * args.vocab * 4
    print(f"vocab {args.vocab}, {args.pairs} pairs × {args.seq_len} tokens (prompt {args.prompt_len}), backbone "
          f"{args.layers} layers × hidden {args.hidden}; one fp32 [N, L, V] tensor = {full / 2**30:.2f} GiB; "
          f"prefkit chunk {args.chunk} tokens; threads {args.threads}; device {args.device}", flush=True)
    if args.device == "cpu":
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
        if avail < 8.5 * full:
            print(f"warning: {avail / 2**30:.1f} GiB available; the official approach needs about "
                  f"{8 * full / 2**30:.0f} GiB at this size", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_tdpo_mem_"))
    rows, ratios = [], []
    for method in [m for m in args.methods.split(",") if m]:
        res = {}
        for impl in ("official", "prefkit"):
            runs = [measure(args, method, impl, tmp) for _ in range(args.repeats)]
            runs.sort(key=lambda r: r["peak_bytes"])
            res[impl] = runs[len(runs) // 2]  # the median peak (one fresh process each)
            r = res[impl]
            print(f"  {method:5s} {impl:8s} peak +{r['peak_bytes'] / 2**30:.3f} GiB  loss {r['loss']:.6f}  "
                  f"{r['seconds']:.1f} s  {r['info'] if 'steps' not in r['info'] else r['info']['steps']}",
                  flush=True)
        truth, truth_ok = {}, {}
        if args.truth:
            t = measure(args, method, "prefkit", tmp, float64=True)
            for impl in ("official", "prefkit"):
                truth_ok[impl], le, ge = compare(t, res[impl])
                truth[impl] = f"loss {le:.1e}, grads {ge:.1e}"
            print(f"  {method:5s} float64 truth: official fp32 {truth['official']}; prefkit fp32 {truth['prefkit']}",
                  flush=True)
        ok, loss_err, grad_err = compare(res["official"], res["prefkit"])
        steps_same = res["official"]["info"].get("steps") == res["prefkit"]["info"].get("steps")
        ratio = res["prefkit"]["peak_bytes"] / res["official"]["peak_bytes"]
        agreement = f"loss {loss_err:.1e}, grads {grad_err:.1e}" + (
            (", steps equal" if steps_same else ", STEPS DIFFER") if method == "edpo" else "")
        for impl in ("official", "prefkit"):
            r = res[impl]
            rows.append([method, impl, f"{r['peak_bytes'] / 2**30:.3f}", f"{r['forward_peak_bytes'] / 2**30:.3f}",
                         f"{r['peak_bytes'] / full:.2f}",
                         f"{r['seconds']:.1f}", f"{r['loss']:.7f}",
                         f"{ratio:.3f}" if impl == "prefkit" else "",
                         agreement if impl == "prefkit" else ""] + ([truth[impl]] if truth else []))
        agree = ok and (steps_same or method != "edpo")
        ratios.append(f"{method} prefkit/official peak={ratio:.3f} (target <={TARGET} {bc.verdict(ratio <= TARGET)}; "
                      f"loss+grads within {TOL:g}: {bc.verdict(agree)}"
                      + "".join(f"; {impl} within {TOL:g} of float64: {bc.verdict(truth_ok[impl])}"
                                for impl in truth_ok) + ")")
    r0 = next(iter(res.values()))
    bc.print_table(f"Peak extra memory of one training step ({r0['method']}; response tokens "
                   f"{r0['response_tokens']}, policy {bc.fmt_params(r0['params'])} parameters)",
                   ["method", "impl", "peak GiB", "fwd peak GiB", "× [N,L,V] fp32", "step s", "loss",
                    "prefkit/official", "agreement (rel. error)"]
                   + (["error vs float64 truth"] if args.truth else []), rows)
    print(f"wall time {wall():.0f} s")
    print("RATIOS: " + "; ".join(ratios))


if __name__ == "__main__":
    main()
