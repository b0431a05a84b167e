"""`skiptron-bench-routing compute|balance|topk|decode|plan`: what skip routing saves, what the DP token balancer buys,
what capacity routing's group-wide top-k costs, and decoding speed.

compute (one process, or DP ranks under torchrun with the token balancer as configured): a whole train step
(DeepSpeed engine, AdamW) of the dense model against the same model with every layer routed at execution rate 0.5
(capacity mode, so the rate is exact; `--modes capacity,threshold` adds threshold routing, whose rate the controller
steers to 0.5), with `kv: all` and `kv: active`; each routed step time (the slowest rank's) next to its FLOP ratio
(training/flops.py at the rates measured).

balance (torchrun, 2 or more processes, one thread each): forward + backward + the DP gradient all-reduce of a routed
model whose ranks are deliberately skewed (rank 0 executes 0.5 + `--skew` of its tokens in every routed layer, the
others 0.5 - skew, default 90% and 10%: each rank's router offset is set for that; benchmark only, training keeps
offsets equal) with the balancer off and on (exact: `balance_min_tokens` 0), against the ideal where every rank holds
the mean load. Also prints the bytes the token exchange moves per
step next to the gradient all-reduce's bytes.

topk (torchrun, 2 or more processes): capacity routing's group-wide top-k (`parallel/topk.py`) by all_gather and
by radix selection, per-rank time (the slowest rank's) and bytes received, for growing numbers of scores per rank
(`--tokens`). The gather's cost grows with world x tokens (what every rank receives and sorts), the selection's with
the rank's own tokens.

plan (one process, no process group): the balancer's host time per exchange (a rank's sends and receives, and the
shed that decides), for DP groups of `--worlds` ranks.

decode (one process): `IncrementalDecoder` tokens/s (KV cache) of the dense model and of each router at batch 1 and 8,
untrained, or of trained checkpoints (`--checkpoints NAME=DIR,... --data DIR`) next to their validation loss.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.distributed as dist

from skiptron.parallel import state
from skiptron.tools.bench import alternate_timings, median_interval
from skiptron.tools.results import write_json
from skiptron.training.config import load_config
from skiptron.training.engine import build_engine
from skiptron.training.flops import config_flops_per_token
from skiptron.training.model import GPT
from skiptron.training.routing import LayerFeedback
from skiptron.training.trainer import Trainer, build_model, seed_everything
from skiptron.training import verbosity

ROUTED = ["model.skip.enabled=true", "model.skip.mode=capacity", "model.skip.target_rate=0.5",
          "model.skip.granularity=layer"]


def compute_variants(modes: list[str]) -> dict[str, list[str]]:
    """Name -> overrides of the compute benchmark's systems: dense, then each mode with kv all and active. Capacity
    mode keeps the historical names (`routed kv=all`)."""
    variants = {"dense": []}
    for mode in modes:
        label = "routed" if mode == "capacity" else f"routed {mode}"
        for kv in ("all", "active"):
            variants[f"{label} kv={kv}"] = ROUTED + [f"model.skip.mode={mode}", f"model.skip.kv={kv}"]
    return variants


def compute(args) -> dict:
    device, _ = state.init_world("auto")
    base = load_config(args.config, args.overrides)
    layout = state.init_model_parallel(base.parallel.tp, 1, device)
    ga = base.grad_accum_steps(layout.world_size)
    g = torch.Generator().manual_seed(layout.rank)  # each DP rank its own tokens, so routing loads differ
    batches = [torch.randint(0, args.vocab_size, (base.train.micro_batch_size, base.model.seq_len + 1),
                             generator=g).to(device) for _ in range(ga)]
    systems, trainers = {}, {}
    for name, extra in compute_variants(args.modes.split(",")).items():
        cfg = load_config(args.config, list(args.overrides) + extra)
        seed_everything(cfg.train.seed)
        engine, precision = build_engine(cfg, build_model(cfg, args.vocab_size, device), layout)  # as training does
        trainers[name] = Trainer(cfg, layout, engine, precision, args.vocab_size, manifest={})
        systems[name] = lambda t=trainers[name]: t.train_step(iter(batches))
    times = {name: _slowest_rounds(t, device) for name, t in
             alternate_timings(systems, device, args.warmup, args.rounds, args.steps).items()}
    step = {name: statistics.median(t) for name, t in times.items()}
    flops = {name: step_flops_per_token(t, t.train_step(iter(batches))) for name, t in trainers.items()}
    ratio = {n: step[n] / step["dense"] for n in step}
    flop_ratio = {n: flops[n] / flops["dense"] for n in step}
    per_round = {n: [a / b / flop_ratio[n] for a, b in zip(times[n], times["dense"])] for n in step}
    interval = {n: median_interval(per_round[n]) for n in step}
    result = {"step_s": step, "ratio_vs_dense": ratio, "flop_ratio_vs_dense": flop_ratio,
              "overhead_vs_flops": {n: ratio[n] / flop_ratio[n] for n in step},
              "overhead_vs_flops_per_round": per_round, "overhead_vs_flops_median_of_rounds_95": interval,
              "precision": precision, "device": str(device), "world": layout.world_size,
              "token_balance": base.parallel.token_balance}
    if not layout.is_writer:
        return result
    balancer = base.parallel.token_balance
    print(f"world {layout.world_size} (DP), token balancer "
          f"{'off' if balancer is None else f'on, exchanging at {balancer} tokens shed'}")
    for name in step:
        low, high = interval[name]
        print(f"{name:27s} step {step[name] * 1e3:8.1f} ms | ratio to dense {ratio[name]:.3f} | FLOP ratio "
              f"{flop_ratio[name]:.3f} | time / FLOP ratio {ratio[name] / flop_ratio[name]:.3f}, of the rounds "
              f"{statistics.median(per_round[name]):.3f} [{low:.3f}, {high:.3f}]")
    print("target: time / FLOP ratio <= 1.15 (training/flops.py at the measured execution rates); of the rounds: "
          "median of the rounds' paired ratios and its 95% bootstrap interval")
    return result


def _slowest_rounds(seconds: list[float], device) -> list[float]:
    """Each round's time on the slowest rank: a synchronous DP step takes as long as its slowest rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(seconds)
    slowest = torch.tensor(seconds, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.tolist()


def step_flops_per_token(trainer: Trainer, step_metrics: dict) -> float:
    """Training FLOPs per token at the execution rates a step measured (training/flops.py, router included)."""
    rates = {int(k.rsplit("/L", 1)[1]): v for k, v in step_metrics.items() if k.startswith("skip/rate/L")}
    model = trainer.cfg.model
    return config_flops_per_token(model, model.padded_vocab_size(trainer.vocab_size), rates)


def _skewed_model(cfg, vocab: int, rate: float, balance: bool, tokens: torch.Tensor) -> GPT:
    """A routed model whose router offsets make this rank execute `rate` of its tokens in every routed layer."""
    seed_everything(cfg.train.seed)
    model = GPT(cfg.model.model_copy(update={"skip": cfg.model.skip.model_copy(
        update={"target_rate": rate, "controller_rate": 1.0})}), vocab, 1, balance=0 if balance else None)
    with torch.no_grad():
        for _ in range(3):  # each layer's input depends on the layers before it
            routing = model(tokens, return_output=True).routing
            model.update_routing({i: LayerFeedback(r.logit_quantile) for i, r in routing.items()})
    return model


def balance_bench(args) -> dict:
    device, _ = state.init_world("auto")
    torch.set_num_threads(1)
    cfg = load_config(args.config, list(args.overrides) + ROUTED[:1] + [
        "model.skip.mode=threshold", f"model.skip.granularity={args.granularity}"])
    layout = state.init_model_parallel(1, 1, device)
    if layout.world_size < 2:
        raise SystemExit("the balance benchmark needs 2 or more processes (torchrun --nproc-per-node 2)")
    g = torch.Generator().manual_seed(layout.rank)
    tokens = torch.randint(0, args.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len + 1),
                           generator=g).to(device)
    if not 0 < args.skew < 0.5:
        raise SystemExit(f"--skew must be in (0, 0.5), got {args.skew}")
    rate = 0.5 + args.skew if layout.rank == 0 else 0.5 - args.skew
    mean_rate = 0.5 - args.skew + 2 * args.skew / layout.world_size
    models = {"unbalanced": _skewed_model(cfg, args.vocab_size, rate, False, tokens),
              "balanced": _skewed_model(cfg, args.vocab_size, rate, True, tokens),
              "ideal": _skewed_model(cfg, args.vocab_size, mean_rate, False, tokens)}
    exchange_bytes, routing = {}, {}

    def step(name):
        model = models[name]
        model.zero_grad(set_to_none=True)
        out = model(tokens, return_output=True)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        dist.all_reduce(grads)
        routing[name] = out.routing
        exchange_bytes[name] = 2 * sum(r.balance.get("bytes_moved", 0) for r in out.routing.values())

    times = alternate_timings({n: (lambda n=n: step(n)) for n in models}, device, args.warmup, args.rounds,
                              args.steps)
    step_s = {}
    for name, t in times.items():
        step_s[name] = statistics.median(_slowest_rounds(t, device))
    rates = {i: r.exec_rate for i, r in routing["unbalanced"].items()}
    shed = [r.balance["shed_tokens"] for r in routing["balanced"].values() if r.balance]
    params = sum(p.numel() * p.element_size() for p in models["ideal"].parameters())
    grad_bytes = 2 * (layout.world_size - 1) / layout.world_size * params
    result = {"granularity": args.granularity, "world": layout.world_size, "step_s": step_s,
              "balanced_vs_ideal": step_s["balanced"] / step_s["ideal"],
              "unbalanced_vs_balanced": step_s["unbalanced"] / step_s["balanced"],
              "exchange_bytes_per_step_rank0": exchange_bytes["balanced"], "grad_allreduce_bytes_per_rank": grad_bytes,
              "rank0_exec_rates": rates, "shed_tokens_per_layer": statistics.mean(shed) if shed else 0.0}
    if layout.is_writer:
        for name, s in step_s.items():
            print(f"{name:10s} step {s * 1e3:8.1f} ms (slowest rank)")
        print(f"skew: rank 0 executes {0.5 + args.skew:.2f} of its tokens, the others {0.5 - args.skew:.2f}; the "
              f"exchange takes {result['shed_tokens_per_layer']:.0f} tokens per routed layer off rank 0")
        print(f"balanced / ideal: {result['balanced_vs_ideal']:.3f} (target <= 1.15); "
              f"unbalanced / balanced: {result['unbalanced_vs_balanced']:.3f} (target >= 1.5)")
        print(f"token exchange: {exchange_bytes['balanced'] / 1e6:.2f} MB/step on rank 0 (forward + backward) | "
              f"gradient all-reduce: {grad_bytes / 1e6:.2f} MB/step per rank")
    return result


DECODE_VARIANTS = {
    "dense": [],
    "routed sigmoid kv=all": ["model.skip.enabled=true", "model.skip.mode=threshold", "model.skip.kv=all"],
    "routed sigmoid kv=active": ["model.skip.enabled=true", "model.skip.mode=threshold", "model.skip.kv=active"],
    "routed gumbel": ["model.skip.enabled=true", "model.skip.router=gumbel"],
    "mod (every 2nd layer)": ["model.skip.enabled=true", "model.skip.router=mod"],
}


def _decode_models(args, device) -> dict[str, tuple[GPT, float | None]]:
    """Name -> (model in eval mode, validation loss or None): the trained checkpoints of `--checkpoints` (loss on
    `--data`'s val split), else the dense model and each router of `DECODE_VARIANTS`, untrained."""
    if not args.checkpoints:
        models = {}
        for name, extra in DECODE_VARIANTS.items():
            cfg = load_config(args.config, list(args.overrides) + extra)
            seed_everything(cfg.train.seed)
            models[name] = GPT(cfg.model, args.vocab_size, cfg.parallel.tp).to(device).eval(), None
        return models
    from skiptron.tools.finetune import build_model as model_with_weights, checkpoint_weights, val_loss

    if not args.data:
        raise SystemExit("skiptron-bench-routing decode: --checkpoints needs --data (the val split they are scored "
                         "on and prompted from)")
    models = {}
    for entry in args.checkpoints.split(","):
        name, sep, path = entry.partition("=")
        if not sep:
            raise SystemExit(f"skiptron-bench-routing decode: --checkpoints entry {entry!r} is not NAME=PATH")
        cfg, vocab, weights = checkpoint_weights(path)
        model = model_with_weights(cfg.model, vocab, weights).to(device)
        models[name] = model, val_loss(model, args.data, batches=args.val_batches)
    return models


def _decode_tokens(args, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, the tokens fed one at a time after it): random, or with `--data` the first val sequences."""
    if args.data:
        from skiptron.training.loader import TokenLoader

        loader = TokenLoader(args.data, "val", batch, dp_rank=0, dp_size=1, num_workers=0, seed=0, shuffle=False)
        tokens = next(iter(loader))
        if tokens.shape[1] < args.prompt + args.new_tokens:
            raise SystemExit(f"skiptron-bench-routing decode: {args.data} holds sequences of {tokens.shape[1]} "
                             f"tokens, fewer than --prompt + --new-tokens = {args.prompt + args.new_tokens}")
    else:
        tokens = torch.randint(0, args.vocab_size, (batch, args.prompt + args.new_tokens),
                               generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    return tokens[:, :args.prompt], tokens[:, args.prompt:args.prompt + args.new_tokens]


def decode_bench(args) -> dict:
    """Tokens/s of `IncrementalDecoder` (KV cache, one new token per call after a prompt) at batch 1 and 8, dense
    against each router: untrained models, or trained checkpoints (`--checkpoints`) next to their validation loss,
    which is what makes a pair of equal quality. The execution rates printed (routed layers only) are those of an
    eval-mode forward over the same tokens, which decides as decoding does (Mixture-of-Depths: by its predictor)."""
    from skiptron.training.model import IncrementalDecoder

    device, _ = state.init_world("auto")
    base = load_config(args.config, args.overrides)
    state.init_model_parallel(base.parallel.tp, 1, device)
    models = _decode_models(args, device)
    first = next(iter(models))
    result = {"val_loss": {name: loss for name, (_, loss) in models.items()}}
    for batch in (1, 8):
        prompt, steps = _decode_tokens(args, batch, device)
        systems, rates = {}, {}
        for name, (model, _) in models.items():
            with torch.no_grad():
                _, records = model.logits_and_routing(torch.cat([prompt, steps], dim=1))
            rates[name] = (sum(float(r.exec_rate) for r in records.values()) / len(records)) if records else 1.0

            def generate(m=model):
                decoder = IncrementalDecoder(m)
                decoder(prompt)
                for i in range(args.new_tokens):
                    decoder(steps[:, i:i + 1])
            systems[name] = generate
        times = alternate_timings(systems, device, args.warmup, args.rounds, 1)
        per_s = {n: batch * args.new_tokens / statistics.median(t) for n, t in times.items()}
        result[f"batch{batch}"] = {"tokens_per_s": per_s, "exec_rate": rates}
        for name in systems:
            loss = models[name][1]
            print(f"batch {batch} {name:26s} {per_s[name]:8.1f} tok/s | vs {first} {per_s[name] / per_s[first]:.3f} "
                  f"| exec rate {rates[name]:.2f}" + ("" if loss is None else f" | val loss {loss:.4f}"))
    return result


def topk_bench(args) -> dict:
    from skiptron.parallel.topk import start_top_k

    device, _ = state.init_world("auto")
    world, rank = dist.get_world_size(), dist.get_rank()
    result = {"world": world, "device": str(device), "per_rank_tokens": {}}
    for n in (int(v) for v in args.tokens.split(",")):
        scores = torch.rand(n, generator=torch.Generator().manual_seed(rank)).to(device)
        k = n * world // 2
        systems = {method: (lambda m=method: start_top_k(scores, k, dist.group.WORLD, m).wait())
                   for method in ("gather", "select")}
        times = {m: statistics.median(_slowest_rounds(t, device))
                 for m, t in alternate_timings(systems, device, args.warmup, args.rounds, args.steps).items()}
        # the other ranks' scores; about 2 (world - 1) / world of the 4 histograms (ring all-reduce) and the counts
        received = {"gather": (world - 1) * n * 4, "select": 4 * 256 * 8 * 2 * (world - 1) // world + world * 16}
        result["per_rank_tokens"][n] = {"seconds": times, "bytes_received": received}
        if rank == 0:
            print(f"{n:>9d} scores per rank x {world} ranks | gather {times['gather'] * 1e3:8.2f} ms, receives "
                  f"{received['gather'] / 2**20:8.2f} MiB | select {times['select'] * 1e3:8.2f} ms, receives "
                  f"{received['select'] / 2**10:5.1f} KiB | gather / select {times['gather'] / times['select']:.2f}")
    return result


def plan_bench(args) -> dict:
    """Host time per rank of what the balancer does for each exchange besides communicating, for growing DP groups
    (no process group needed): its own sends and receives from the gathered counts (`rank_splits`) and the shed
    that decides whether to exchange. It grows with the group only through vector operations."""
    from skiptron.parallel.balance import rank_splits, shed_tokens

    result = {}
    for world in (int(v) for v in args.worlds.split(",")):
        counts = tuple(torch.randint(900, 1100, (world,), generator=torch.Generator().manual_seed(world)).tolist())
        systems = {"plan": lambda c=counts, w=world: (rank_splits(c, w // 2), shed_tokens(c))}
        seconds = alternate_timings(systems, torch.device("cpu"), args.warmup, args.rounds, args.steps)["plan"]
        result[world] = statistics.median(seconds)
        print(f"DP group of {world:6d} ranks: {result[world] * 1e6:9.1f} us of host time per exchange plan")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skiptron-bench-routing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["compute", "balance", "topk", "decode", "plan"],
                   help="compute: routed vs dense step time in one process; balance: the DP token balancer; "
                        "topk: capacity routing's group-wide top-k; decode: IncrementalDecoder tokens/s, dense vs "
                        "each router; plan: the balancer's host time per exchange for growing DP groups")
    p.add_argument("--config", default="tiny", help="YAML file or preset name (tiny, 125m, 350m, 1.3b, 6.7b)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the model (default: %(default)s)")
    p.add_argument("--granularity", default="mlp", choices=["layer", "mlp"], help="balance mode")
    p.add_argument("--skew", type=float, default=0.4, help="balance: rank 0 executes 0.5 + skew of its tokens, the "
                                                           "others 0.5 - skew (default: %(default)s)")
    p.add_argument("--modes", default="capacity", help="compute mode: routing modes to time, comma-separated "
                                                       "(capacity, threshold)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each round (default: %(default)s)")
    p.add_argument("--tokens", default="2048,32768,262144,2097152",
                   help="topk: scores per rank, comma-separated (default: %(default)s)")
    p.add_argument("--worlds", default="8,64,1024,8192",
                   help="plan: DP group sizes, comma-separated (default: %(default)s)")
    p.add_argument("--prompt", type=int, default=64, help="decode: prompt tokens (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode: generated tokens (default: %(default)s)")
    p.add_argument("--checkpoints", help="decode: NAME=CHECKPOINT,... trained models to decode instead of the "
                                         "untrained variants (the first is the reference); needs --data")
    p.add_argument("--data", help="decode: a prepared dataset; prompts are its first val sequences, and each "
                                  "checkpoint's val loss is measured on it")
    p.add_argument("--val-batches", type=int, default=16, help="decode: val micro-batches of 8 scored per checkpoint")
    p.add_argument("--json", help="also write the results to this file (rank 0)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides, e.g. parallel.tp=2")
    verbosity.add_argument(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    result = {"compute": compute, "balance": balance_bench, "topk": topk_bench,
              "decode": decode_bench, "plan": plan_bench}[args.mode](args)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_json(args.json, result)
    state.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
