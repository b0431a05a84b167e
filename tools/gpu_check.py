"""`skiptron-gpu-check [--device cuda|cpu] [--quick] [--out DIR]`: one command that proves the GPU paths.

On whatever CUDA devices are visible it runs, through skiptron's own entry points (the trainer, the benchmarks, the
converter), and prints one table (and writes `<out>/gpu_check.json`):

    world          the trainer on a process group of every visible device (NCCL; one GPU: a world of one)
    dense 125m     bf16 training, 30 steps: tokens/s, TFLOP/s, MFU, peak memory; 1.3b too when memory allows
    routed 125m    skiptron-bench-routing compute: threshold and capacity, kv all / active, step time vs dense
    vs llama       skiptron-bench: the 125m step against transformers' Llama + torch's fused AdamW (fp32/TF32), the
                   ratio with its 95% interval; again with train.compile ("vs llama compiled", GPU only)
    fused loss     the chunked output layer + cross entropy against whole logits (loss, gradients, peak memory)
    capacity top-k capacity routing's top-k by radix selection (as at scale) against the all_gather and sort, on
                   the device's collectives: the same split, and both times
    decode         skiptron-bench-routing decode: KV-cache decoding tokens/s at batch 1 and 8, dense vs each router
    srupp kernel   skiptron-bench-srupp: the fused kernel (Triton on GPUs) against the reference, outputs and
                   gradients, and its speed-up
    resume         deterministic mode: N steps == N/2 + resume from the checkpoint + N/2, bitwise (loss, weights)
    reshard bf16   that bf16 checkpoint resumed under another ZeRO stage follows the run within bf16 tolerance
    hf export      skiptron-convert to-hf, loaded by transformers on the device: logits equal skiptron's
    sdpa           which scaled-dot-product-attention kernel each attention path ran (dense, routed kv all / active)
    host reads     reads of device values (host stalls) in one forward + backward: one per routed layer, none in the
                   dense model; on CUDA also torch's count of synchronizing operations
    tp2, dp2, pp2  with two or more devices: TP=2, DP=2 with the token balancer, PP=2 (torchrun)

It exits non-zero when any check fails, naming them. `--device cpu --quick` runs the same pieces at toy sizes on
the CPU (gloo, two processes for the multi-process part), which the test suite does; its numbers say nothing about
GPUs. A check that cannot run here (too little memory, a single device) is `skip`, with the reason.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Toy model of the quick mode (the test suite's size), and the GPU sizes.
QUICK_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_len=32",
               "model.make_vocab_size_divisible_by=64", "train.micro_batch_size=2", "train.global_batch_size=2"]
COMMON = ["optimizer.warmup_steps=2", "eval.interval=0", "eval.batches=1", "logging.tensorboard=false",
          "data.num_workers=0", "checkpoint.save_at_end=false", "launch.health_check=false", "logging.print_every=10"]
ROUTED = ["model.skip.enabled=true", "model.skip.target_rate=0.5"]
BF16_LOSS_ATOL = 2e-2
SDPA_KERNELS = {"_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
                "_scaled_dot_product_flash_attention": "flash", "_flash_attention_forward": "flash",
                "_scaled_dot_product_efficient_attention": "mem-efficient", "_efficient_attention_forward": "mem-efficient",
                "_scaled_dot_product_cudnn_attention": "cudnn", "_scaled_dot_product_attention_math": "math",
                "flex_attention": "flex", "flex_attention_backward": "flex"}


@dataclass
class Row:
    name: str
    status: str  # ok | FAIL | skip
    detail: str = ""
    numbers: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Plan:
    """What to run, at which size."""

    device: str
    quick: bool
    out: Path
    devices: int  # visible CUDA devices (cpu: processes of the multi-process part)
    precision: str
    dense_config: str
    dense_overrides: list[str]
    dense_steps: int
    small_overrides: list[str]  # the model of the resume / reshard / export / sdpa checks
    small_steps: int


def make_plan(device: str, quick: bool, out: Path) -> Plan:
    import torch

    if device == "cpu":
        return Plan("cpu", quick, out, 2, "bf16", "tiny", QUICK_MODEL, 5 if quick else 30, QUICK_MODEL, 6)
    if not torch.cuda.is_available():
        raise SystemExit("skiptron-gpu-check: no CUDA device is visible; use --device cpu for the CPU rehearsal")
    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dense = ["train.micro_batch_size=8", "train.global_batch_size=8", "model.vocab_size=32000"]
    small = ["model.num_layers=4", "model.hidden_size=512", "model.num_heads=8", "model.seq_len=512",
             "train.micro_batch_size=4", "train.global_batch_size=4", "model.vocab_size=32000"]
    return Plan("cuda", quick, out, torch.cuda.device_count(), precision, "125m", dense, 10 if quick else 30,
                small, 10)


# -- pieces -------------------------------------------------------------------------------------------------------
def prepare_data(out: Path, seq_len: int, tokens: int) -> Path:
    """Byte-tokenized shards of enough standard-library sources for `tokens` training tokens (skiptron-data's own
    `prepare`); reused when present."""
    import sysconfig

    from skiptron.training.shards import prepare

    data = out / f"data-s{seq_len}"
    if (data / "manifest.json").is_file():
        return data
    src = out / f"corpus-s{seq_len}"
    src.mkdir(parents=True, exist_ok=True)
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(errors="replace")
        (src / f"{path.name}.txt").write_text(text)
        total += len(text)
        if total > 1.3 * tokens:
            break
    prepare(data, inputs=[src], tokenizer="bytes", seq_len=seq_len, samples_per_shard=512, val_fraction=0.05)
    return data


def train(config: str, overrides: list[str], run_dir: Path, keep: bool = False):
    """The trainer in this process (a world of one); returns (metrics records, trainer if `keep` else None)."""
    from skiptron.training.config import load_config
    from skiptron.training.metrics import read_metrics
    from skiptron.training.trainer import Trainer

    cfg = load_config(config, COMMON + list(overrides) + [f"run.dir={run_dir}"])
    trainer = Trainer.setup(cfg)
    trainer.run()
    return read_metrics(run_dir), (trainer if keep else None)


def steady(records: list[dict], key: str) -> float | None:
    """Median of a per-step metric after the first fifth of the steps (warm-up)."""
    values = [r[key] for r in records[len(records) // 5:] if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_dense(plan: Plan, data: Path, config: str, overrides: list[str]) -> Row:
    records, _ = train(config, overrides + [f"data.path={data}", f"train.precision={plan.precision}",
                                            f"train.max_steps={plan.dense_steps}"], plan.out / f"dense-{config}")
    losses = [r["loss"] for r in records]
    numbers = {k: steady(records, k) for k in ("tokens_per_s", "tflops", "mfu", "peak_mem_gb", "step_time_s")}
    numbers.update(first_loss=losses[0], last_loss=losses[-1])
    if not all(isinstance(v, float) and math.isfinite(v) for v in losses):
        return Row(f"dense {config}", "FAIL", f"non-finite loss: {losses}", numbers)
    mfu = f", MFU {100 * numbers['mfu']:.1f}%" if numbers["mfu"] else ""
    mem = f", peak {numbers['peak_mem_gb']:.1f} GiB" if numbers["peak_mem_gb"] else ""
    return Row(f"dense {config}", "ok", f"{plan.precision}, {numbers['tokens_per_s']:.0f} tok/s, "
               f"{numbers['tflops']:.3g} TFLOP/s{mfu}{mem}", numbers)


def check_large(plan: Plan, data: Path) -> Row:
    import torch

    if plan.device != "cuda":
        return Row("dense 1.3b", "skip", "GPU only")
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total < 60:
        return Row("dense 1.3b", "skip", f"{total:.0f} GiB on the device; 1.3b wants >= 60 GiB")
    return check_dense(plan, data, "1.3b", ["train.micro_batch_size=4", "train.global_batch_size=4",
                                            "model.vocab_size=32000", "parallel.activation_checkpointing=full"])


def check_routed(plan: Plan) -> Row:
    from skiptron.tools import bench_routing

    overrides = plan.dense_overrides + [f"train.precision={plan.precision}"]
    args = argparse.Namespace(config=plan.dense_config, overrides=overrides, vocab_size=512 if plan.quick else 32000,
                              warmup=1, rounds=1 if plan.quick else 3, steps=1 if plan.quick else 3,
                              modes="capacity,threshold")
    result = bench_routing.compute(args)
    ratios, overheads = result["ratio_vs_dense"], result["overhead_vs_flops"]
    bad = [n for n, r in ratios.items() if not math.isfinite(r)]
    detail = ", ".join(f"{n.removeprefix('routed ')} {r:.2f}x ({overheads[n]:.2f} of its FLOP ratio)"
                       for n, r in ratios.items() if n != "dense")
    return Row(f"routed {plan.dense_config}", "FAIL" if bad else "ok", f"step time vs dense: {detail}", result)


def check_vs_llama(plan: Plan, compiled: bool) -> Row:
    """skiptron-bench: skiptron's step against transformers' LlamaForCausalLM + torch's fused AdamW on the same model,
    in fp32 (TF32 matmuls on GPUs, for both: the bench compares fp32 steps), eager or with `train.compile` (Llama
    stays eager). A measurement, not a pass/fail on speed: it fails only when a step does not finish or its time is
    not finite."""
    from skiptron.tools import bench

    name = "vs llama" + (" compiled" if compiled else "")
    if compiled and plan.device == "cpu":
        return Row(name, "skip", "inductor's C++ build takes minutes on the CPU rehearsal (tests/test_training.py "
                                 "compiles blocks with it)")
    sizes = (["--vocab-size", "512", "--rounds", "1", "--steps", "1", "--warmup", "1", "--matmul-size", "256"]
             if plan.quick else ["--vocab-size", "32000", "--rounds", "3", "--steps", "3", "--warmup", "2"])
    result = bench.run(bench.build_parser().parse_intermixed_args(
        ["--config", plan.dense_config, "--threads", "0", "--no-plain", *sizes, *plan.dense_overrides,
         "train.precision=fp32", f"train.compile={str(compiled).lower()}"]))
    low, high = result["ratio_llama_median_of_rounds_95"]
    numbers = {k: result[k] for k in ("ratio_llama", "ratio_llama_median_of_rounds", "ratio_llama_per_round",
                                      "cpu_ratio_llama", "matmul_peak_gflops", "skiptron_first_step_s")}
    numbers.update(ratio_llama_median_of_rounds_95=[low, high], skiptron=result["skiptron"], llama=result["llama"])
    finite = all(math.isfinite(v) for v in (result["skiptron"]["step_s"], result["llama"]["step_s"]))
    return Row(name, "ok" if finite else "FAIL",
               f"skiptron / Llama {result['ratio_llama']:.3f} (median of rounds "
               f"{result['ratio_llama_median_of_rounds']:.3f}, 95% [{low:.3f}, {high:.3f}]), skiptron "
               f"{result['skiptron']['tokens_per_s']:.0f} tok/s, {100 * result['skiptron']['peak_fraction']:.0f}% of "
               f"the measured matmul peak; first step {result['skiptron_first_step_s']:.1f} s; step peak "
               f"{result['skiptron']['step_peak_bytes'] / 2**20:.0f} vs {result['llama']['step_peak_bytes'] / 2**20:.0f}"
               f" MiB", numbers)


def check_loss(plan: Plan) -> Row:
    """The fused, chunked loss (`training/fused_loss.py`) against whole logits and torch's cross entropy, in the
    training precision on the device: loss and gradients agree, and the peak memory of each (Llama 3's 128k
    vocabulary at 8k tokens, hidden 4096, on GPUs)."""
    import torch
    import torch.nn.functional as F

    from skiptron.tools.bench import step_peak_bytes
    from skiptron.training.fused_loss import chunked_cross_entropy

    device = torch.device(plan.device)
    dtype = torch.bfloat16 if plan.precision == "bf16" else torch.float16
    tokens, hidden, vocab = (256, 64, 1000) if plan.quick else (8192, 4096, 128256)
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, generator=gen).to(dtype)
    weight = (0.02 * torch.randn(vocab, hidden, device=device, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    def measure(loss_fn) -> tuple:
        """(loss, input gradient, weight gradient, peak bytes of the forward and backward), as fp32."""
        a, b = h.clone().requires_grad_(), weight.clone().requires_grad_()
        losses = []

        def step():
            loss = loss_fn(a, b)
            loss.backward()
            losses.append(loss.detach().float())

        peak = step_peak_bytes(step, device)
        return losses[0], a.grad.float(), b.grad.float(), peak

    results = {}
    for name, loss_fn in (("whole", lambda a, b: F.cross_entropy(F.linear(a, b).float(), labels)),
                          ("fused", lambda a, b: chunked_cross_entropy(a, b, labels, 1024))):
        results[name] = measure(loss_fn)
        release_memory()
    (loss, grad_h, grad_w, fused_peak), (want, want_h, want_w, whole_peak) = results["fused"], results["whole"]
    errors = {"loss": float((loss - want).abs()),
              "grad_h": float((grad_h - want_h).abs().max() / want_h.abs().max()),
              "grad_w": float((grad_w - want_w).abs().max() / want_w.abs().max())}
    numbers = {"errors": errors, "fused_peak_bytes": fused_peak, "whole_peak_bytes": whole_peak,
               "tokens": tokens, "hidden": hidden, "vocab": vocab}
    good = errors["loss"] <= 1e-3 * float(want.abs()) + 1e-3 and max(errors["grad_h"], errors["grad_w"]) <= 2e-2
    return Row("fused loss", "ok" if good else "FAIL",
               f"{tokens} tokens x vocab {vocab}: loss error {errors['loss']:.1e}, gradients "
               f"{max(errors['grad_h'], errors['grad_w']):.1e} (relative to their max); peak {fused_peak / 2**20:.0f} "
               f"vs {whole_peak / 2**20:.0f} MiB with whole logits", numbers)


def check_topk(plan: Plan) -> Row:
    """`parallel/topk.py` on the device and its backend (this process's world): the radix selection (histograms,
    searchsorted, int64 all-reduces) picks exactly the split the sort does, scores with many ties included."""
    import torch
    import torch.distributed as dist

    from skiptron.parallel.topk import start_top_k
    from skiptron.parallel.timing import synchronized_seconds

    device = torch.device(plan.device if plan.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
    n = 4096 if plan.quick else 1 << 22
    gen = torch.Generator(device=device).manual_seed(0)
    scores = torch.randint(0, 1000, (n,), device=device, generator=gen).float() / 1000  # ties straddle the k-th
    k = n // 3
    picked, seconds = {}, {}
    for method in ("gather", "select"):
        picked[method] = start_top_k(scores, k, dist.group.WORLD, method).wait()[0]
        seconds[method] = synchronized_seconds(lambda m=method: start_top_k(scores, k, dist.group.WORLD, m).wait(),
                                               device)
    same = torch.equal(picked["gather"], picked["select"]) and int(picked["select"].sum()) == k
    return Row("capacity top-k", "ok" if same else "FAIL",
               f"{n} scores, k {k}: selection {'equals' if same else 'DIFFERS FROM'} the sort; "
               f"{seconds['select'] * 1e3:.2f} ms vs {seconds['gather'] * 1e3:.2f} ms", {"seconds": seconds, "n": n})


def check_decode(plan: Plan) -> Row:
    """skiptron-bench-routing decode: `IncrementalDecoder` tokens/s with the KV cache at batch 1 and 8, the dense
    model against each router (untrained models: their routers' decoding decisions set the rates shown)."""
    from skiptron.tools import bench_routing

    sizes = (["--vocab-size", "512", "--rounds", "1", "--warmup", "1", "--prompt", "8", "--new-tokens", "8"]
             if plan.quick else ["--vocab-size", "32000", "--rounds", "2", "--warmup", "1", "--prompt", "128",
                                 "--new-tokens", "64"])
    result = bench_routing.decode_bench(bench_routing.build_parser().parse_intermixed_args(
        ["decode", "--config", plan.dense_config, *sizes, *plan.dense_overrides]))
    parts, finite = [], True
    for batch in ("batch1", "batch8"):
        per_s = result[batch]["tokens_per_s"]
        finite &= all(math.isfinite(v) and v > 0 for v in per_s.values())
        relative = [v / per_s["dense"] for n, v in per_s.items() if n != "dense"]
        parts.append(f"{batch.removeprefix('batch')}: dense {per_s['dense']:.0f} tok/s, routed "
                     f"{min(relative):.2f}-{max(relative):.2f}x")
    return Row("decode", "ok" if finite else "FAIL", "batch " + "; batch ".join(parts), result)


def check_srupp(plan: Plan) -> Row:
    from skiptron.tools import bench_srupp

    shape = dict(seq=64, batch=2, hidden=64) if plan.quick else dict(seq=2048, batch=16, hidden=2048)
    dtype = "fp32" if plan.device == "cpu" else plan.precision
    args = argparse.Namespace(device=plan.device, dtype=dtype, repeats=2 if plan.quick else 5, threads=None,
                              json=True, **shape)
    result = bench_srupp.run(args)
    error = max(result["relative_error"].values())
    tolerance = 1e-4 if dtype == "fp32" else 2e-2
    status = "ok" if error <= tolerance else "FAIL"
    return Row("srupp kernel", status, f"{result['fused_impl']} vs reference: rel. error {error:.1e} (<= "
               f"{tolerance:.0e}), {result['speedup']:.1f}x faster", result)


def check_resume_and_reshard(plan: Plan, data: Path) -> list[Row]:
    """Deterministic bf16 run of N steps with a checkpoint at N/2; a second run resumed from it must equal the first
    bitwise; a third, under another ZeRO stage (the resharding path), within bf16 tolerance."""
    import torch

    from skiptron.training import checkpoint as ckpt
    from skiptron.training.numerics import set_deterministic
    from skiptron.training.weights import full_state_dict

    n = plan.small_steps
    base = plan.small_overrides + [f"data.path={data}", f"train.precision={plan.precision}", f"train.max_steps={n}",
                                   "train.deterministic=true", "checkpoint.keep=0"]
    records, full = train("tiny", base + [f"checkpoint.interval={n // 2}", "zero.stage=1"], plan.out / "resume-full",
                          keep=True)
    weights = full_state_dict(full.engine.module)
    del full
    release_memory()
    half = plan.out / "resume-full" / "checkpoints" / ckpt.step_tag(n // 2)
    losses = {r["step"]: r["loss"] for r in records}
    again, resumed = train("tiny", base + ["zero.stage=1", f"resume={half}"], plan.out / "resume-again", keep=True)
    same_loss = all(losses[r["step"]] == r["loss"] for r in again) and len(again) == n - n // 2
    same_weights = all(torch.equal(w, weights[k]) for k, w in full_state_dict(resumed.engine.module).items())
    del resumed
    release_memory()
    rows = [Row("resume", "ok" if same_loss and same_weights else "FAIL",
                f"{n} steps == {n // 2} + resume + {n - n // 2}, deterministic {plan.precision}: "
                f"losses {'bitwise equal' if same_loss else 'DIFFER'}, weights "
                f"{'bitwise equal' if same_weights else 'DIFFER'}",
                {"losses": [losses[s] for s in sorted(losses)], "resumed": [r["loss"] for r in again]})]
    other, _ = train("tiny", base + ["zero.stage=3", f"resume={half}"], plan.out / "reshard")
    set_deterministic(False)  # process-wide: the checks after this one run in the default mode
    gap = max(abs(losses[r["step"]] - r["loss"]) for r in other)
    rows.append(Row("reshard bf16", "ok" if gap <= BF16_LOSS_ATOL else "FAIL",
                    f"ZeRO-1 {plan.precision} checkpoint resumed under ZeRO-3: largest loss gap {gap:.1e} "
                    f"(<= {BF16_LOSS_ATOL})", {"gap": gap}))
    return rows


def _skiptron_logits(checkpoint: Path, tokens, device):
    """skiptron's own logits (fp32 weights from the checkpoint, TP=1) on `device`."""
    import torch

    from skiptron.training import checkpoint as ckpt
    from skiptron.training.config import load_config
    from skiptron.training.model import GPT

    cfg = load_config(checkpoint / "config.yaml")
    weights, _, _, extras = ckpt.read_full_state(checkpoint, with_optimizer=False)
    vocab = ckpt.read_meta(checkpoint)["vocab_size"]
    model = GPT(cfg.model, vocab, 1)
    model.load_state_dict({**weights, **extras.get("buffers", {})}, strict=False)
    with torch.no_grad():
        return model.to(device).eval().logits(tokens.to(device))[..., :vocab].float()


def check_export(plan: Plan) -> Row:
    import torch

    from skiptron.tools.convert import to_hf
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.numerics import set_tf32

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return Row("hf export", "skip", "transformers is not installed")
    checkpoint = ckpt.find_resumable(plan.out / "resume-full" / "checkpoints", log=None)
    out = to_hf(checkpoint, plan.out / "hf")
    device = torch.device(plan.device)
    vocab = ckpt.read_meta(checkpoint)["vocab_size"]
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    set_tf32(False)  # compare in full fp32
    try:
        ours = _skiptron_logits(checkpoint, tokens, device)
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
        with torch.no_grad():
            theirs = hf(tokens.to(device)).logits[..., :vocab].float()
    finally:
        set_tf32(True)
    error = ((ours - theirs).abs().max() / ours.abs().max()).item()
    return Row("hf export", "ok" if error <= 1e-4 else "FAIL",
               f"{type(hf).__name__} on {device}: logits rel. error {error:.1e} (<= 1e-4)", {"relative_error": error})


def sdpa_kernels_used(fn) -> list[str]:
    """The scaled-dot-product-attention kernels `fn()` ran, from the profiler's record of aten ops."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    seen = set()
    for event in prof.events():
        name = event.name.removeprefix("aten::")
        if name in SDPA_KERNELS:
            seen.add(SDPA_KERNELS[name])
    return sorted(seen)


def check_sdpa(plan: Plan) -> Row:
    import torch

    from skiptron.training import model as model_module
    from skiptron.training.config import load_config

    device = torch.device(plan.device)
    dtype = torch.float32 if plan.device == "cpu" else torch.bfloat16
    paths = {"dense": [], "routed kv=all": ROUTED + ["model.skip.kv=all"],
             "routed kv=active": ROUTED + ["model.skip.kv=active"]}
    used = {}
    for name, extra in paths.items():
        cfg = load_config("tiny", plan.small_overrides + extra)
        gpt = model_module.GPT(cfg.model, 512, 1, balance=None).to(device, dtype)
        tokens = torch.randint(0, 512, (2, cfg.model.seq_len + 1), device=device)
        used[name] = sdpa_kernels_used(lambda: gpt(tokens).backward())
    numbers = {"kernels": used}
    # informational: a path that runs no aten SDPA op (e.g. a compiled flex_attention) shows "other"
    detail = "; ".join(f"{n}: {'+'.join(k) or 'other'}" for n, k in used.items())
    try:  # the attention module's own account of the kernel each variant selects, where this tree has one
        from skiptron.training.attention import attention_backend_report
    except ImportError:
        detail += " (no per-variant backend report in this tree)"
    else:
        numbers["selected"] = attention_backend_report(device, dtype)
        detail += " | selected: " + "; ".join(f"{k}: {v}" for k, v in numbers["selected"].items())
    return Row("sdpa", "ok", detail, numbers)


def check_host_reads(plan: Plan) -> Row:
    """How often one forward makes the host read a device value (`parallel/syncs.py`): once per routed layer (its
    counts), nothing else. On CUDA also torch's own count of synchronizing operations, dense model alongside."""
    import torch

    from skiptron.parallel.syncs import cuda_synchronizations, host_reads
    from skiptron.training import model as model_module
    from skiptron.training.config import load_config

    device = torch.device(plan.device)
    dtype = torch.float32 if plan.device == "cpu" else torch.bfloat16
    paths = {"dense": [], "threshold kv=all": ROUTED + ["model.skip.kv=all", "model.skip.mode=threshold"],
             "threshold kv=active": ROUTED + ["model.skip.kv=active", "model.skip.mode=threshold"],
             "capacity kv=all": ROUTED + ["model.skip.kv=all", "model.skip.mode=capacity"],
             "mlp": ROUTED + ["model.skip.granularity=mlp"]}
    numbers, extra = {}, []
    for name, overrides in paths.items():
        cfg = load_config("tiny", plan.small_overrides + overrides)
        gpt = model_module.GPT(cfg.model, 512, 1, balance=None).to(device, dtype)
        tokens = torch.randint(0, 512, (2, cfg.model.seq_len + 1), device=device)
        gpt(tokens).backward()  # warm: lazy initializations may read once
        syncs = contextlib.nullcontext([]) if plan.device == "cpu" else cuda_synchronizations()
        with syncs as synchronized, host_reads() as reads:
            out = gpt(tokens, return_output=True)
            out.loss.backward()
        routed = len(out.routing)
        numbers[name] = {"reads": [f"{r.op} at {r.caller}" for r in reads], "routed_layers": routed,
                         "cuda_synchronizations": list(synchronized)}
        if len(reads) != routed:
            extra.append(name)
    detail = "; ".join(f"{n}: {len(v['reads'])} reads / {v['routed_layers']} routed layers"
                       + ("" if plan.device == "cpu" else f", torch counts {len(v['cuda_synchronizations'])} syncs")
                       for n, v in numbers.items())
    return Row("host reads", "FAIL" if extra else "ok", detail + (f" | not one per layer: {extra}" if extra else ""),
               numbers)


def torchrun(plan: Plan, name: str, nproc: int, overrides: list[str], data: Path, steps: int) -> Row:
    """`skiptron-train` under torchrun on `nproc` devices (processes); ok when it exits 0 with finite losses."""
    from skiptron.training.metrics import read_metrics

    run_dir = plan.out / name.replace(" ", "-")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_free_port()), "-m", "skiptron.tools.train", "--config", plan.dense_config if plan.device == "cuda"
           else "tiny", *COMMON, *plan.dense_overrides, *overrides, f"data.path={data}", f"run.dir={run_dir}",
           f"train.precision={plan.precision}", f"train.max_steps={steps}", "resume=none"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode:
        return Row(name, "FAIL", f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}",
                   {"stderr_tail": done.stderr[-3000:]})
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records]
    if not losses or not all(isinstance(v, float) and math.isfinite(v) for v in losses):
        return Row(name, "FAIL", f"losses {losses}")
    extra = {k: steady(records, k) for k in ("tokens_per_s", "skip/imbalance_after", "pipe/bubble") if steady(records, k)}
    detail = f"{nproc} processes, {steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, " \
             f"{extra.get('tokens_per_s', 0):.0f} tok/s"
    if "skip/imbalance_after" in extra:
        detail += f", imbalance after balancing {extra['skip/imbalance_after']:.3f}"
    return Row(name, "ok", detail, {"losses": losses, **extra})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multi_process_checks(plan: Plan, data: Path) -> list[Row]:
    steps = 4 if plan.quick else 10
    balanced = ROUTED + ["model.skip.mode=capacity", "parallel.balance_tokens=true", "parallel.balance_min_tokens=0"]
    per_rank = ["train.micro_batch_size=2", "train.global_batch_size=4"] if plan.device == "cpu" else \
        ["train.micro_batch_size=8", "train.global_batch_size=16"]
    if plan.device == "cpu" and plan.quick:  # one multi-process run: the world, DP=2 and the balancer at once
        return [torchrun(plan, "world dp2 balanced", 2, balanced + per_rank, data, steps),
                Row("tp2", "skip", "quick mode"), Row("pp2", "skip", "quick mode")]
    rows = [torchrun(plan, "world", plan.devices, [f"train.global_batch_size={plan.devices * 8}",
                                                   "launch.health_check=true"], data, steps)
            if plan.device == "cuda" and plan.devices > 1 else None]
    if plan.devices < 2:
        return [Row("tp2", "skip", "one device"), Row("dp2 balanced", "skip", "one device"),
                Row("pp2", "skip", "one device")]
    pp_batch = ["train.micro_batch_size=2", "train.global_batch_size=8"]
    rows += [torchrun(plan, "tp2", 2, ["parallel.tp=2", "zero.stage=2"] + per_rank[:1] +
                      [per_rank[1].replace("=16", "=8").replace("=4", "=2")], data, steps),
             torchrun(plan, "dp2 balanced", 2, balanced + per_rank, data, steps),
             torchrun(plan, "pp2", 2, ["parallel.pp=2"] + pp_batch, data, steps)]
    return [r for r in rows if r is not None]


# -- the command ----------------------------------------------------------------------------------------------------
def run_checks(plan: Plan) -> list[Row]:
    import torch

    from skiptron.parallel import state

    plan.out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []

    def attempt(name: str, fn, *args):
        start = time.perf_counter()
        try:
            got = fn(*args)
        except Exception as err:  # a failed check is a row, not the end of the run
            got = Row(name, "FAIL", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                      {"traceback": traceback.format_exc()[-4000:]})
        for row in got if isinstance(got, list) else [got]:
            row.seconds = row.seconds or (0.0 if row.status == "skip" else time.perf_counter() - start)
            rows.append(row)
            print(f"[gpu-check] {row.status:4s} {row.name}: {row.detail}", flush=True)
        release_memory()

    seq = 32 if plan.device == "cpu" else 2048
    small_seq = 32 if plan.device == "cpu" else 512
    data = prepare_data(plan.out, seq, 40 * 8 * (seq + 1))
    small_data = data if small_seq == seq else prepare_data(plan.out, small_seq, 20 * 4 * (small_seq + 1))
    device, backend = state.init_world("nccl" if plan.device == "cuda" else "gloo")
    rows.append(Row("world (this process)", "ok", f"{backend} on {device}, {plan.devices} device(s) visible"
                    + (f": {torch.cuda.get_device_name(0)}" if plan.device == "cuda" else ""),
                    {"backend": backend, "devices": plan.devices}))
    attempt(f"dense {plan.dense_config}", check_dense, plan, data, plan.dense_config, plan.dense_overrides)
    attempt("dense 1.3b", check_large, plan, data)
    attempt(f"routed {plan.dense_config}", check_routed, plan)
    attempt("vs llama", check_vs_llama, plan, False)
    attempt("vs llama compiled", check_vs_llama, plan, True)
    attempt("fused loss", check_loss, plan)
    attempt("capacity top-k", check_topk, plan)
    attempt("decode", check_decode, plan)
    attempt("srupp kernel", check_srupp, plan)
    attempt("resume", check_resume_and_reshard, plan, small_data)
    attempt("hf export", check_export, plan)
    attempt("sdpa", check_sdpa, plan)
    attempt("host reads", check_host_reads, plan)
    state.shutdown()
    attempt("multi-process", multi_process_checks, plan, data)
    return rows


def summarize(rows: list[Row]) -> tuple[str, int]:
    """The table, and the exit code (1 when any check failed; the failures are named under the table)."""
    width = max(len(r.name) for r in rows)
    lines = [f"{'check':{width}s}  status  seconds  result", "-" * (width + 60)]
    lines += [f"{r.name:{width}s}  {r.status:6s}  {r.seconds:7.1f}  {r.detail}" for r in rows]
    failed = [r.name for r in rows if r.status == "FAIL"]
    lines.append(f"FAILED: {', '.join(failed)}" if failed else "all checks passed")
    return "\n".join(lines), int(bool(failed))


def build_parser() -> argparse.ArgumentParser:
    from skiptron.training import verbosity

    p = argparse.ArgumentParser(prog="skiptron-gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when visible, else cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes and fewer steps (what the test suite runs)")
    p.add_argument("--out", default="runs/gpu-check", help="work directory; gpu_check.json is written there")
    verbosity.add_argument(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cpu":  # before torch or DeepSpeed look for devices
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["DS_ACCELERATOR"] = "cpu"
    from skiptron.training.numerics import DETERMINISTIC_ENV  # imports torch, not DeepSpeed; no CUDA work yet

    # The resume check runs in deterministic mode, whose cuBLAS setting torch reads once, at the first matmul.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_ENV["CUBLAS_WORKSPACE_CONFIG"])
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = make_plan(device, args.quick, Path(args.out))
    start = time.perf_counter()
    rows = run_checks(plan)
    table, code = summarize(rows)
    print(table)
    report = {"device": device, "quick": args.quick, "seconds": time.perf_counter() - start,
              "torch": torch.__version__, "rows": [asdict(r) for r in rows], "failed": code != 0}
    (plan.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {plan.out / 'gpu_check.json'} ({report['seconds']:.0f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
