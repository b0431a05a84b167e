"""`skiptron-bench-routers cost|agreement`: what the routers of the papers cost, and how well Mixture-of-Depths'
causal predictor stands in for its top-k.

cost (one process): whole train steps (DeepSpeed engine, AdamW, random tokens) of each router next to the sigmoid
router in the same setting, timed alternately in the same run: `gumbel` (SkipLayer: every layer, rate 0.5, kv all;
its training also runs the skipped tokens' forward for the soft path) against sigmoid capacity 0.5 (kv all, every
layer), and `mod` (Mixture-of-Depths: every 2nd layer, capacity 0.125, kv active, with its predictor) against sigmoid
capacity 0.125 in the same layers. Prints step times, ratios to the sigmoid router, the measured execution rates
and the FLOP ratio `training/flops.py` counts for each pair.

agreement (one process): a trained `mod` checkpoint on the validation split: per routed layer the fraction of
tokens on which the predictor's decision (what evaluation and decoding use) equals the per-sequence top-k
(training's rule), the predictor's execution rate, and the validation loss with each rule.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from skiptron.parallel import state
from skiptron.tools.bench import alternate_timings
from skiptron.tools.results import write_json
from skiptron.training import verbosity
from skiptron.training.config import load_config
from skiptron.training.engine import build_engine
from skiptron.training.flops import config_flops_per_token
from skiptron.training.model import GPT
from skiptron.training.trainer import Trainer, seed_everything

ROUTED = ["model.skip.enabled=true", "model.skip.granularity=layer"]
SYSTEMS = {  # name -> (overrides, the sigmoid system it is compared with)
    "sigmoid kv=all 0.5": (["model.skip.router=sigmoid", "model.skip.mode=capacity", "model.skip.target_rate=0.5",
                            "model.skip.layers=all", "model.skip.kv=all"], None),
    "gumbel kv=all 0.5": (["model.skip.router=gumbel", "model.skip.target_rate=0.5", "model.skip.layers=all",
                           "model.skip.kv=all"], "sigmoid kv=all 0.5"),
    "sigmoid every:2 kv=active 0.125": (["model.skip.router=sigmoid", "model.skip.mode=capacity",
                                         "model.skip.target_rate=0.125", "model.skip.layers=every:2",
                                         "model.skip.kv=active"], None),
    "mod every:2 kv=active 0.125": (["model.skip.router=mod", "model.skip.target_rate=0.125",
                                     "model.skip.layers=every:2", "model.skip.kv=active"],
                                    "sigmoid every:2 kv=active 0.125"),
}


def cost(args) -> dict:
    device, _ = state.init_world("auto")
    base = load_config(args.config, args.overrides)
    layout = state.init_model_parallel(base.parallel.tp, 1, device)
    if layout.world_size != 1:
        raise SystemExit("the cost benchmark runs as one process")
    ga = base.grad_accum_steps(1)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab_size, (base.train.micro_batch_size, base.model.seq_len + 1),
                             generator=g).to(device) for _ in range(ga)]
    systems, rates, flops = {}, {}, {}
    for name, (extra, _) in SYSTEMS.items():
        cfg = load_config(args.config, list(args.overrides) + ROUTED + extra)
        seed_everything(cfg.train.seed)
        engine, precision = build_engine(cfg, GPT(cfg.model, args.vocab_size, cfg.parallel.tp), layout)
        trainer = Trainer(cfg, layout, engine, precision, args.vocab_size, manifest={})

        def step(t=trainer, name=name):
            rates[name] = t.train_step(iter(batches)).get("skip/exec_rate")

        systems[name] = step
        flops[name] = cfg
    times = alternate_timings(systems, device, args.warmup, args.rounds, args.steps)
    step_s = {name: statistics.median(t) for name, t in times.items()}
    padded = load_config(args.config, args.overrides).model.padded_vocab_size(args.vocab_size)
    fpt = {name: config_flops_per_token(cfg.model, padded, {i: rates[name] for i in
                                                            cfg.model.skip.routed_layers(cfg.model.num_layers)})
           for name, cfg in flops.items()}
    result = {"step_s": step_s, "exec_rate": rates, "flops_per_token": fpt, "ratio_vs_sigmoid": {},
              "flop_ratio_vs_sigmoid": {}, "device": str(device), "precision": precision}
    for name in step_s:
        ref = SYSTEMS[name][1]
        line = f"{name:33s} step {step_s[name] * 1e3:8.1f} ms | exec rate {rates[name]:.3f}"
        if ref:
            result["ratio_vs_sigmoid"][name] = step_s[name] / step_s[ref]
            result["flop_ratio_vs_sigmoid"][name] = fpt[name] / fpt[ref]
            line += (f" | vs {ref}: step {step_s[name] / step_s[ref]:.3f}x, FLOPs {fpt[name] / fpt[ref]:.3f}x")
        print(line)
    return result


def agreement(args) -> dict:
    from skiptron.tools.finetune import build_model, checkpoint_weights, single_process_groups
    from skiptron.training.loader import TokenLoader

    cfg, vocab, weights = checkpoint_weights(args.checkpoint, trust=args.trust_checkpoint)
    if not cfg.model.skip.enabled or cfg.model.skip.router != "mod":
        raise SystemExit(f"skiptron-bench-routers agreement: {args.checkpoint}: model.skip.router is not mod")
    per_layer: dict[int, dict[str, list[float]]] = {}
    losses = {"predictor": [], "top_k": []}
    with single_process_groups():
        model = build_model(cfg.model, vocab, weights)
        loader = iter(TokenLoader(args.data, "val", args.micro_batch, dp_rank=0, dp_size=1, num_workers=0,
                                  seed=1234, shuffle=False))
        with torch.no_grad():
            for _ in range(args.batches):
                tokens = next(loader, None)
                if tokens is None:
                    break
                model.eval()  # the predictor decides (causal: evaluation, decoding, the HF export)
                out = model(tokens, return_output=True)
                losses["predictor"].append(float(out.lm_loss))
                for i, r in out.routing.items():
                    row = per_layer.setdefault(i, {"agreement": [], "predictor_rate": []})
                    row["agreement"].append(float(r.agreement))
                    row["predictor_rate"].append(r.exec_rate)
                model.train()  # the top-k of each sequence decides (training's rule; not causal)
                losses["top_k"].append(float(model(tokens, return_output=True).lm_loss))
    result = {"layers": {i: {k: statistics.mean(v) for k, v in row.items()} for i, row in per_layer.items()},
              "val_loss": {k: statistics.mean(v) for k, v in losses.items()}, "batches": len(losses["top_k"]),
              "capacity": cfg.model.skip.target_rate}
    result["agreement"] = statistics.mean(r["agreement"] for r in result["layers"].values())
    for i, row in result["layers"].items():
        print(f"layer {i}: predictor agrees with the top-k on {row['agreement']:.4f} of tokens | predictor executes "
              f"{row['predictor_rate']:.4f} (top-k: {result['capacity']})")
    print(f"mean agreement {result['agreement']:.4f} | val loss with the predictor's decisions "
          f"{result['val_loss']['predictor']:.4f}, with the top-k {result['val_loss']['top_k']:.4f} "
          f"({result['batches']} batches)")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skiptron-bench-routers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["cost", "agreement"],
                   help="cost: step time of each router vs the sigmoid router; agreement: MoD's predictor vs its top-k")
    p.add_argument("--config", default="tiny", help="cost: YAML file or preset name (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8192, help="cost: vocabulary of the model (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="cost: timed steps per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="cost: alternating timing rounds (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="cost: untimed steps before timing (default: %(default)s)")
    p.add_argument("--checkpoint", help="agreement: a trained mod checkpoint (directory, its run or checkpoints dir)")
    p.add_argument("--data", help="agreement: prepared data directory whose val split is read")
    p.add_argument("--batches", type=int, default=16, help="agreement: validation micro-batches (default: %(default)s)")
    p.add_argument("--micro-batch", type=int, default=8, help="agreement: sequences per batch (default: %(default)s)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="agreement: load checkpoint pickles that reference code (only for checkpoints you made)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("overrides", nargs="*", help="cost: dotted.key=value config overrides, e.g. model.num_layers=8")
    verbosity.add_argument(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    verbosity.configure(args.verbose or None)
    if args.mode == "agreement" and not (args.checkpoint and args.data):
        raise SystemExit("skiptron-bench-routers agreement: --checkpoint and --data are required")
    result = cost(args) if args.mode == "cost" else agreement(args)
    write_json(args.json, result)
    state.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
