"""`skiptron-bench --config FILE [overrides]`: skiptron's train step against Hugging Face `transformers`'
`LlamaForCausalLM` (the same architecture and dimensions) trained by torch's AdamW, and against the same model in
plain PyTorch as a second reference.

All three run in this one process, on the same device and thread count, with the same batch, dimensions and AdamW
settings (lr, betas, eps, weight decay groups, gradient clipping), on random tokens; skiptron runs as `skiptron-train`
runs it (DeepSpeed engine, the configured ZeRO stage, megatron-core layers, the step guard). Timing rounds alternate
between the systems so that machine noise hits all alike. Prints tokens/s, achieved GFLOP/s (training/flops.py), the
fraction of this machine's matmul peak (a large torch.mm in the model's dtype, measured in every round) and the
ratios skiptron / Llama and skiptron / plain, and each system's step peak memory (what one step allocates above
what lives between steps). `--profile` adds a torch.profiler table per system.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from skiptron.parallel import state
from skiptron.parallel.timing import synchronized_seconds
from skiptron.tools.results import write_json
from skiptron.training import numerics, verbosity
from skiptron.training.config import Config, load_config
from skiptron.training.engine import build_engine, param_groups
from skiptron.training.flops import config_flops_per_token
from skiptron.training.guard import StepGuard
from skiptron.training.memory import AllocationMeter
from skiptron.training.trainer import Trainer, build_model, seed_everything


class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, rope: tuple[torch.Tensor, torch.Tensor]):
        super().__init__()
        self.heads = heads
        self.register_buffer("cos", rope[0], persistent=False)  # buffers: `.to(device)` moves them
        self.register_buffer("sin", rope[1], persistent=False)
        self.n1, self.n2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.qkv, self.out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate_up, self.down = nn.Linear(d, 2 * ffn, bias=False), nn.Linear(ffn, d, bias=False)

    def rotate(self, x):
        cos, sin = self.cos[: x.shape[2]].to(x.dtype), self.sin[: x.shape[2]].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(self.rotate(q), self.rotate(k), v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, s, d))
        gate, up = self.gate_up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class PlainGPT(nn.Module):
    """The baseline: the same Llama-style model in plain PyTorch (no DeepSpeed, no megatron-core)."""

    def __init__(self, cfg: Config, vocab: int):
        super().__init__()
        m = cfg.model
        hd = m.head_dim
        inv = 1.0 / m.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
        emb = torch.outer(torch.arange(m.seq_len).float(), inv).repeat(1, 2)
        rope = (emb.cos(), emb.sin())
        self.embed = nn.Embedding(vocab, m.hidden_size)
        self.blocks = nn.ModuleList(PlainBlock(m.hidden_size, m.num_heads, m.ffn_size, rope)
                                    for _ in range(m.num_layers))
        self.norm = nn.RMSNorm(m.hidden_size, eps=1e-5)

    def forward(self, tokens):
        x = self.embed(tokens[:, :-1])
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.norm(x), self.embed.weight)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def torch_step(model, optimizer, batches, clip: float) -> float:
    """One optimizer step of a plain torch model over micro-batches (`model(tokens)` returns the mean loss)."""
    total = 0.0
    for tokens in batches:
        loss = model(tokens) / len(batches)
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


class LlamaLoss(nn.Module):
    """transformers' LlamaForCausalLM as its users train it: `model(input_ids, labels=...)` computes the loss
    (its own cross entropy over fp32 logits); `shift_labels` hands it the next tokens already shifted."""

    def __init__(self, cfg: Config, vocab: int):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        m = cfg.model
        if m.bias or m.qkv_bias or m.rope_scaling is not None or m.block != "transformer" or m.skip.enabled:
            raise SystemExit("skiptron-bench compares a dense Llama without biases or rope scaling: this config "
                             "has model.bias, model.qkv_bias, model.rope_scaling, model.block or model.skip set")
        self.llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads,
            max_position_embeddings=m.seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
            tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False, initializer_range=m.init_std,
            attn_implementation="sdpa", use_cache=False))

    def forward(self, tokens):
        targets = tokens[:, 1:].contiguous()
        return self.llama(input_ids=tokens[:, :-1], labels=targets, shift_labels=targets).loss


def torch_adamw(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """torch's AdamW with skiptron's settings and weight-decay groups, in its fused form (one kernel per step; CPU
    and CUDA), the fastest torch has."""
    o = cfg.optimizer
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=device.type in ("cpu", "cuda"))


def matmul_seconds(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Seconds of one n x n x n matmul in `dtype` (the best of `reps`): 2 n^3 FLOPs at this machine's peak rate."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    return min(synchronized_seconds(lambda: torch.mm(a, b, out=out), device) for _ in range(reps))


def step_peak_bytes(fn, device: torch.device) -> int:
    """Peak bytes of tensor memory one call of `fn` allocated beyond what was alive before it: the step's activations,
    logits and temporaries (and gradients or optimizer state it creates anew). CUDA: the caching allocator's peak;
    CPU: every storage the step's ops create (`AllocationMeter`)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with AllocationMeter() as meter:
        fn()
    return meter.peak


def cpu_seconds(fn) -> float:
    """Process CPU time (all threads) of one call of `fn`."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def alternate_timings(systems: dict, device: torch.device, warmup: int, rounds: int, steps: int,
                      progress=None) -> dict:
    """Seconds per call of each system, one list entry per round; rounds alternate between the systems so that
    machine noise hits all of them alike, and each round starts with the next system, so that none always runs
    right after the same neighbour (whose freed memory and evicted caches it would inherit). The order depends on
    the round only, the same on every rank. `progress(round, {name: seconds})` is called after each round."""
    for run in systems.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in systems}
    names = list(systems)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            run = systems[name]
            times[name].append(synchronized_seconds(lambda: [run() for _ in range(steps)], device) / steps)
        if progress is not None:
            progress(r, {name: t[-1] for name, t in times.items()})
    return times


def median_interval(values: list[float], level: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """Bootstrap interval of the median of `values` (e.g. the rounds' paired ratios): resample the rounds with
    replacement and take the central `level` of the resampled medians. Seeded, so a result reprints alike. A ratio
    whose interval holds 1.0 is not shown to differ from parity on this machine."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    cut = int(round((1 - level) / 2 * (resamples - 1)))
    return medians[cut], medians[resamples - 1 - cut]


def profile_table(run, steps: int, rows: int) -> str:
    """torch.profiler's ops by self CPU time over `steps` calls of `run`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skiptron-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="YAML file or preset name (tiny, 125m, 350m, 1.3b, 6.7b)")
    p.add_argument("--vocab-size", type=int, default=8192,
                   help="vocabulary of the model and its random tokens (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads for every system (default: %(default)s; 0 keeps torch's choice)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round and system (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5,
                   help="alternating timing rounds, i.e. pairs of skiptron and each peer (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each system first (default: %(default)s)")
    p.add_argument("--no-plain", action="store_true", help="leave out the plain-PyTorch reference model")
    p.add_argument("--matmul-size", type=int, default=2048,
                   help="n of the n x n x n matmul that measures the peak (default: %(default)s)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile STEPS steps of each system with torch.profiler and print its ops")
    p.add_argument("--profile-rows", type=int, default=15, help="ops per profile table (default: %(default)s)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides, e.g. model.num_layers=8")
    verbosity.add_argument(p)
    return p


def run(args: argparse.Namespace) -> dict:
    """The comparison for parsed arguments (this parser's); prints the report and returns it. Needs a world of one
    process (started here unless it is already); leaves it up."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    numerics.configure(cfg.train)
    device, _ = state.init_world(cfg.parallel.backend)
    layout = state.init_model_parallel(cfg.parallel.tp, cfg.parallel.pp, device)
    if layout.world_size != 1:
        raise SystemExit("skiptron-bench compares against single-process peers: run it as one process")
    ga = cfg.grad_accum_steps(1)
    mb, seq, vocab = cfg.train.micro_batch_size, cfg.model.seq_len, args.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (mb, seq + 1), generator=g).to(device) for _ in range(ga)]

    # skiptron as Trainer.setup builds it: the model, the step guard watching its gradients, the DeepSpeed engine
    seed_everything(cfg.train.seed)
    model = build_model(cfg, vocab, device)
    guard = StepGuard(device, cfg.train.spike_factor, cfg.train.spike_window)
    guard.watch(model)
    engine, precision = build_engine(cfg, model, layout, guard)
    trainer = Trainer(cfg, layout, engine, precision, vocab, manifest={}, guard=guard)
    if precision != "fp32":
        raise SystemExit(f"skiptron-bench compares fp32 steps; train.precision resolved to {precision}")

    def skiptron_step():
        trainer.train_step(iter(batches))
        guard.finish_step(engine.was_step_applied())

    padded = cfg.model.padded_vocab_size(vocab)
    clip = cfg.optimizer.grad_clip or math.inf
    systems = {"skiptron": skiptron_step}
    peers = {"llama": LlamaLoss(cfg, padded)}
    if not args.no_plain:
        peers["plain"] = PlainGPT(cfg, padded)
    for name, peer in peers.items():
        seed_everything(cfg.train.seed)
        peer.to(device)
        systems[name] = (lambda p, o: lambda: torch_step(p, o, batches, clip))(peer, torch_adamw(peer, cfg, device))
    systems["matmul"] = lambda: matmul_seconds(device, torch.float32, args.matmul_size, 3)
    # process CPU seconds of every step as well: on a machine shared with other jobs a step's wall time includes
    # the time its threads waited for a core, its CPU time much less so (both are reported)
    steps = dict(systems)
    cpu = {name: [] for name in systems if name != "matmul"}
    for name in cpu:
        systems[name] = (lambda fn, store: lambda: store.append(cpu_seconds(fn)))(systems[name], cpu[name])

    def progress(r, seconds):
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in seconds.items()),
              file=sys.stderr, flush=True)

    # skiptron's first step alone: with train.compile it builds the compiled blocks (reported apart from the steady
    # state, which the timing rounds measure after the warmup)
    first_step_s = synchronized_seconds(skiptron_step, device)
    times = alternate_timings(systems, device, args.warmup, args.rounds, args.steps, progress)
    peak = 2 * args.matmul_size ** 3 / min(times["matmul"] + [matmul_seconds(device, torch.float32, args.matmul_size,
                                                                              5)])

    peaks = {name: step_peak_bytes(steps[name], device) for name in cpu}
    tokens = cfg.train.global_batch_size * seq
    fpt = config_flops_per_token(cfg.model, padded)
    result = {"config": args.config, "overrides": args.overrides, "device": str(device), "threads":
              torch.get_num_threads(), "tokens_per_step": tokens, "precision": precision,
              "zero_stage": engine.zero_optimization_stage(), "compile": cfg.train.compile, "matmul_peak_gflops": peak / 1e9,
              "flops_per_token": fpt, "skiptron_first_step_s": first_step_s}
    print(f"{args.config} {' '.join(args.overrides)} | {tokens} tokens/step | {torch.get_num_threads()} threads | "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (torch.mm {args.matmul_size}^3) | skiptron's first step "
          f"{first_step_s:.1f} s{' (incl. torch.compile)' if cfg.train.compile else ''}")
    for name in cpu:
        cpu[name] = cpu[name][args.warmup:]  # the timed steps only
        step = statistics.median(times[name])
        gflops = fpt * tokens / step / 1e9
        cpu_step = statistics.median(cpu[name])
        result[name] = {"step_s": step, "tokens_per_s": tokens / step, "gflops": gflops,
                        "peak_fraction": gflops * 1e9 / peak, "rounds_s": times[name], "cpu_step_s": cpu_step,
                        "cpu_steps_s": cpu[name], "step_peak_bytes": peaks[name]}
        print(f"{name:9s} step {step * 1e3:8.1f} ms | {tokens / step:9.0f} tok/s | {gflops:7.1f} GFLOP/s | "
              f"{gflops * 1e9 / peak:6.1%} of matmul peak | CPU {cpu_step:.2f} s/step | step peak "
              f"{peaks[name] / 2**20:.0f} MiB")
    for name in peers:
        cpu_ratio = statistics.median(cpu[name]) / statistics.median(cpu["skiptron"])
        result[f"cpu_ratio_{name}"] = cpu_ratio
        print(f"CPU-time ratio {name} / skiptron (>1: skiptron needs less CPU per step): {cpu_ratio:.3f}")
        pairs = [b / a for a, b in zip(times["skiptron"], times[name])]
        result[f"ratio_{name}"] = result["skiptron"]["tokens_per_s"] / result[name]["tokens_per_s"]
        result[f"ratio_{name}_per_round"] = pairs
        result[f"ratio_{name}_median_of_rounds"] = statistics.median(pairs)
        low, high = median_interval(pairs)
        result[f"ratio_{name}_median_of_rounds_95"] = [low, high]
        print(f"ratio skiptron / {name}: {result[f'ratio_{name}']:.3f} of the median steps, "
              f"{statistics.median(pairs):.3f} the median of the rounds' ratios, 95% bootstrap interval "
              f"[{low:.3f}, {high:.3f}] (per round: {', '.join(f'{r:.3f}' for r in pairs)})")
    if args.profile:
        for name, run in systems.items():
            if name != "matmul":
                print(f"\n--- profile: {name}, {args.profile} steps ---")
                print(profile_table(run, args.profile, args.profile_rows))
    write_json(args.json, result)
    return result


def main(argv=None) -> int:
    run(build_parser().parse_intermixed_args(argv))
    state.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
