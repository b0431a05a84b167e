"""`skiptron-bench-memory`: peak memory per rank of building a model (ZeRO-1 and ZeRO-3, DP=2), of resharding a
checkpoint (saved at TP=2, resumed at DP=2, ZeRO-1) and of exporting it (`to-hf`), next to the model's whole fp32
size and the rank's final share, for several model sizes.

Each measurement runs in processes of its own (spawned, gloo), so its peak RSS (VmHWM) is its own; a 1-layer model
of the same width measures the fixed overhead of a process (imports, groups). Also printed: the peak bytes the
construction code itself allocated (`training/memory.AllocationMeter`), and the ZeRO-3 target: partition + 2 x the
largest parameter + the fixed overhead. The resharding rows print the peak RSS during `checkpoint.load` above the
fresh DP=2 engine it loads into (VmHWM reset before the load), its anonymous part (sampled; the checkpoint's files
are memory-mapped, so the rest is page cache the kernel can drop), and the target: 15% of the model's whole fp32
state at 12 bytes per parameter. Their share column is the rank's part of the Adam moments, which loading allocates
(a fresh engine makes them at its first step), so the extra memory of resharding is the growth minus that share.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import socket
import sys
import tempfile
import time
from collections.abc import Mapping

MB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(preset: str, overrides: list[str], stage: int):
    from skiptron.training.config import load_config

    return load_config(preset, overrides + [f"zero.stage={stage}", "train.micro_batch_size=1",
                                            "train.global_batch_size=2", "train.precision=fp32"])


def _init(rank: int, world: int, port: int, tp: int = 1):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist

    from skiptron.parallel import state

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return state.init_model_parallel(tp, 1, torch.device("cpu"))


def _construct(rank: int, world: int, port: int, preset: str, overrides: list[str], stage: int, vocab: int,
               results) -> None:
    """One rank of a DP=2 construction: (peak RSS before building, after, meter peak, partition, largest, whole)."""
    _init(rank, world, port)
    import torch
    import torch.distributed as dist

    from skiptron.training.memory import AllocationMeter, current_rss_bytes, peak_rss_bytes
    from skiptron.training.trainer import build_model

    cfg = _config(preset, overrides, stage)
    if stage == 3:
        import deepspeed

        deepspeed.init_distributed("gloo", dist_init_required=False, verbose=False)
    before = current_rss_bytes()
    torch.manual_seed(0)
    with AllocationMeter() as meter:
        model = build_model(cfg, vocab, torch.device("cpu"))
    params = list(model.parameters())
    if stage == 3:
        share = sum(p.ds_tensor.numel() for p in params) * 4
        whole = [p.ds_numel for p in params]
    else:
        share = sum(p.numel() for p in params) * 4
        whole = [p.numel() for p in params]
    results.put((rank, before, peak_rss_bytes(), meter.peak, share, max(whole) * 4, sum(whole) * 4))
    dist.destroy_process_group()


def _to_hf(rank: int, world: int, port: int, preset: str, overrides: list[str], vocab: int, results) -> None:
    """Export a weights checkpoint of the model with to-hf, then import the export with from-hf: (0, a row for each:
    ("to-hf" / "from-hf", RSS before, peak RSS, meter peak))."""
    _init(rank, world, port)

    from skiptron.tools.convert import from_hf, to_hf
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.memory import AllocationMeter, current_rss_bytes, peak_rss_bytes, reset_peak_rss

    cfg = _config(preset, overrides, 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.write_weights_checkpoint(f"{tmp}/ckpt", cfg, _Zeros(_whole_shapes(cfg, vocab)), vocab)
        for what, convert in (("to-hf", lambda: to_hf(f"{tmp}/ckpt", f"{tmp}/hf", max_shard_size="200MB")),
                              ("from-hf", lambda: from_hf(f"{tmp}/hf", f"{tmp}/back", log=lambda msg: None))):
            reset_peak_rss()
            before = current_rss_bytes()
            with AllocationMeter() as meter:
                convert()
            rows.append((what, before, peak_rss_bytes(), meter.peak))
    results.put((0, rows))


def _reshard(rank: int, world: int, port: int, preset: str, overrides: list[str], vocab: int, directory: str,
             mode: str, stage: int, results) -> None:
    """`mode` "save": train one step at TP=2 (ZeRO-1) and save. "reshard": build a fresh DP=2 engine at ZeRO
    `stage`, load that checkpoint into it, train one step; "fresh": the same without the load. Puts (rank, RSS
    before the load, peak RSS of the load, peak anonymous RSS growth of the load, whole state at 12 bytes/parameter,
    the process's peak RSS over its life, step included, the load's seconds)."""
    layout = _init(rank, world, port, 2 if mode == "save" else 1)
    import torch
    import torch.distributed as dist

    from skiptron.training import checkpoint as ckpt
    from skiptron.training.engine import build_engine
    from skiptron.training.memory import AnonPeak, current_rss_bytes, peak_rss_bytes, reset_peak_rss
    from skiptron.training.trainer import Trainer, build_model, seed_everything

    cfg = _config(preset, overrides + [f"parallel.tp={layout.tp}", f"checkpoint.dir={directory}"],
                  1 if mode == "save" else stage)
    seed_everything(0)  # built as training builds it, so both runs step under the same host allocator policy
    engine, precision = build_engine(cfg, build_model(cfg, vocab, layout.device), layout)
    trainer = Trainer(cfg, layout, engine, precision, vocab, manifest={})
    params = sum(info.numel() for info in _whole_shapes_sizes(cfg, vocab))
    batch = torch.randint(0, vocab, (cfg.train.micro_batch_size, cfg.model.seq_len + 1),
                          generator=torch.Generator().manual_seed(0))
    before = load_peak = anon_growth = load_s = 0
    lifetime_peak = peak_rss_bytes()
    if mode == "reshard":
        path = ckpt.find_resumable(directory, log=None)
        before = current_rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        with AnonPeak() as anon:
            ckpt.load(engine, cfg, layout, path, vocab, trainer.extra_state, log=None)
        load_s = time.perf_counter() - start
        load_peak, anon_growth = peak_rss_bytes(), anon.peak - anon.start
    trainer.train_step(iter([batch] * cfg.grad_accum_steps(layout.world_size)))
    lifetime_peak = max(lifetime_peak, peak_rss_bytes())
    if mode == "save":
        trainer.progress.step = 1
        ckpt.save(engine, cfg, layout, trainer.progress, vocab, trainer.extra_state)
    results.put((rank, before, load_peak, anon_growth, 12 * params, lifetime_peak, load_s))
    dist.barrier()
    dist.destroy_process_group()


def _whole_shapes_sizes(cfg, vocab: int):
    import torch

    return [torch.Size(shape) for shape in _whole_shapes(cfg, vocab).values()]


class _Zeros(Mapping):
    """Name -> a zero tensor of its shape, made when looked up: the weights checkpoint to export is written one tensor
    at a time, so the process's peak RSS is the export's, not the set-up's."""

    def __init__(self, shapes: dict):
        self.shapes = shapes

    def __getitem__(self, name: str):
        import torch

        return torch.zeros(self.shapes[name])

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _whole_shapes(cfg, vocab: int) -> dict:
    """GPT's parameter names and whole shapes, each layer built on the meta device (a real build for a layer that
    needs real tensors, like the head's vocabulary-padding check): no whole model in memory."""
    import torch

    from skiptron.training.model import layer_sequence

    shapes = {}
    for prefix, build in layer_sequence(cfg.model, vocab, 1, None, base_seed=0):
        try:
            with torch.device("meta"):
                layer = build()
        except RuntimeError:
            layer = build()
        shapes.update({f"{prefix}.{n}": tuple(p.shape) for n, p in layer.named_parameters()})
    return shapes


def _spawn(target, ranks: int, *args) -> list[tuple]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, ranks, port) + args + (results,)) for r in range(ranks)]
    for p in procs:
        p.start()
    out = []
    while len(out) < len(procs):
        try:
            out.append(results.get(timeout=5))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise SystemExit(f"skiptron-bench-memory: {target.__name__} rank(s) {dead} failed (see above)")
    out.sort()
    for p in procs:
        p.join()
    return out


def build_parser() -> argparse.ArgumentParser:
    from skiptron.training import verbosity

    p = argparse.ArgumentParser(prog="skiptron-bench-memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="125m,350m,1.3b", help="comma-separated config presets (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of every model (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="model.seq_len of every model (default: %(default)s)")
    p.add_argument("--reshard-buckets", default="auto",
                   help="checkpoint.reshard_bucket_mb values to reshard with, comma-separated; auto: the config's "
                        "default (default: %(default)s)")
    p.add_argument("--skip-to-hf", action="store_true", help="do not measure to-hf and from-hf")
    p.add_argument("--reshard-presets", default="125m,350m",
                   help="presets whose TP=2 -> DP=2 resharding is measured ('' for none; default: %(default)s)")
    p.add_argument("--reshard-stage", type=int, choices=(1, 3), default=1,
                   help="ZeRO stage of the DP=2 run the TP=2 checkpoint is resharded into, and of the fresh run it is "
                        "compared with (3 halves the target's weights and gradients too: how a model whose DP=2 "
                        "ZeRO-1 run does not fit this machine is measured; default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides for every model, e.g. "
                                                "train.cpu_heap=release")
    verbosity.add_argument(p)
    return p


def main(argv=None) -> int:
    from skiptron.training import verbosity

    args = build_parser().parse_intermixed_args(argv)
    verbosity.configure(args.verbose or None)
    common = [f"model.seq_len={args.seq_len}", f"model.max_position_embeddings={args.seq_len}", *args.overrides]
    print(f"{'model':>6} {'what':>14} {'whole MB':>9} {'share MB':>9} {'RSS peak MB':>12} {'RSS growth MB':>14} "
          f"{'allocated MB':>13} {'target MB':>10}")
    for preset in args.presets.split(","):
        base = _spawn(_construct, 2, preset, common + ["model.num_layers=1"], 3, args.vocab_size)
        overhead = max(peak - share for _, _, peak, _, share, _, _ in base)
        for stage in (1, 3):
            for rank, before, peak, allocated, share, largest, whole in _spawn(
                    _construct, 2, preset, common, stage, args.vocab_size):
                target = f"{(share + 2 * largest + overhead) / MB:10.0f}" if stage == 3 else f"{'':>10}"
                print(f"{preset:>6} {f'ZeRO-{stage} rank {rank}':>14} {whole / MB:9.0f} {share / MB:9.0f} "
                      f"{peak / MB:12.0f} {(peak - before) / MB:14.0f} {allocated / MB:13.0f} {target}", flush=True)
        if preset in args.reshard_presets.split(","):
            with tempfile.TemporaryDirectory() as directory:
                _spawn(_reshard, 2, preset, common, args.vocab_size, directory, "save", args.reshard_stage)
                fresh = _spawn(_reshard, 2, preset, common, args.vocab_size, directory, "fresh", args.reshard_stage)
                for bucket in args.reshard_buckets.split(","):
                    chosen = [] if bucket == "auto" else [f"checkpoint.reshard_bucket_mb={bucket}"]
                    resharded = _spawn(_reshard, 2, preset, common + chosen, args.vocab_size, directory, "reshard",
                                       args.reshard_stage)
                    for (rank, before, peak, anon_growth, whole_state, life, load_s), (*_, fresh_life, _) in zip(
                            resharded, fresh):
                        moments_share = whole_state * 2 / 3 / 2  # ZeRO-1/3 at DP=2: half of the two Adam moments
                        print(f"{preset:>6} {f'reshard rank {rank}':>14} {whole_state / 3 / MB:9.0f} "
                              f"{moments_share / MB:9.0f} {peak / MB:12.0f} {(peak - before) / MB:14.0f} {'':>13} "
                              f"{0.15 * whole_state / MB:10.0f}  ZeRO-{args.reshard_stage}, bucket {bucket}: load "
                              f"{load_s:.2f} s, anonymous growth {anon_growth / MB:.0f}; peak with a step "
                              f"{life / MB:.0f} vs a fresh run's {fresh_life / MB:.0f}: extra "
                              f"{(life - fresh_life) / MB:.0f}", flush=True)
        if not args.skip_to_hf:
            [(_, rows)] = _spawn(_to_hf, 1, preset, common, args.vocab_size)
            for what, before, peak, allocated in rows:
                print(f"{preset:>6} {what:>14} {whole / MB:9.0f} {'':>9} {peak / MB:12.0f} "
                      f"{(peak - before) / MB:14.0f} {allocated / MB:13.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
