"""`skiptron-finetune`: adapt a pretrained checkpoint (full or mask finetuning) and use the small task file.

    skiptron-finetune train --config FILE|PRESET finetune.base=CKPT finetune.method=mask [dotted.key=value ...]
        one rank of a finetuning run (under torchrun, like skiptron-train); with method=mask it ends by writing
        <run.dir>/task.safetensors: the bit-packed masks (+ trained head), a few percent of the model's size
    skiptron-finetune merge --base CKPT --task FILE --out DIR
        base checkpoint + task file -> a weights-only checkpoint of the finetuned model (resume=DIR loads it under
        any layout; skiptron-convert to-hf exports it)
    skiptron-finetune eval --checkpoint CKPT [--task FILE] --data DIR [--batches N]
        validation loss / perplexity of a checkpoint (with a task applied) in this process

See training/masking.py for the method.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

import torch

TASK_FILE = "task.safetensors"


@contextlib.contextmanager
def single_process_groups():
    """A one-process gloo world with megatron's TP=1 groups, unless groups exist already (then those are used)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    created = False
    if not dist.is_initialized():
        import tempfile

        store = tempfile.NamedTemporaryFile(prefix="skiptron-store-", delete=False).name
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        created = True
    made_mp = False
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        made_mp = True
    try:
        yield
    finally:
        if made_mp:
            ps.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def build_model(model_cfg, vocab_size: int, weights: dict[str, torch.Tensor]):
    """A TP=1 GPT holding whole `weights` (needs groups: see `single_process_groups`)."""
    from skiptron.training.masking import load_whole_weights
    from skiptron.training.model import GPT

    model = GPT(model_cfg, vocab_size, 1)
    load_whole_weights(model, weights)
    return model.eval()


@torch.no_grad()
def val_loss(model, data: str | os.PathLike, batches: int = 16, micro_batch: int = 8, seed: int = 1234) -> float:
    """Mean LM loss over the first `batches` micro-batches of the `val` split (unshuffled)."""
    from skiptron.training.loader import TokenLoader

    loader = iter(TokenLoader(data, "val", micro_batch, dp_rank=0, dp_size=1, num_workers=0, seed=seed,
                              shuffle=False))
    total, n = 0.0, 0
    for _ in range(batches):
        try:
            tokens = next(loader)
        except StopIteration:
            break
        total += float(model(tokens))
        n += 1
    return total / max(n, 1)


def checkpoint_weights(checkpoint: str | os.PathLike, task: str | os.PathLike | None = None, trust: bool = False):
    """(model config, vocab size, whole weights) of a checkpoint (any form `--checkpoint` takes), with a task file
    merged in when given; `trust`: load pickles that reference code (--trust-checkpoint)."""
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.config import load_config
    from skiptron.training.masking import merge_task, read_base_weights, read_task_file

    path = ckpt.resolve_checkpoint(checkpoint)
    meta = ckpt.read_meta(path)
    cfg = load_config(path / "config.yaml")
    weights = read_base_weights(path, trust)
    weights = {k: v for k, v in weights.items() if not k.endswith(".mask_scores")}
    if task:
        weights = merge_task(weights, read_task_file(task)[0])
    return cfg, meta["vocab_size"], weights


def merge(base: str | os.PathLike, task: str | os.PathLike, out: str | os.PathLike, trust: bool = False) -> Path:
    from skiptron.training import checkpoint as ckpt

    base = ckpt.resolve_checkpoint(base)
    cfg, vocab, weights = checkpoint_weights(base, task, trust)
    cfg.finetune.method, cfg.finetune.base = "full", None
    tok = base / "tokenizer.json"
    return ckpt.write_weights_checkpoint(out, cfg, weights, vocab, tok if tok.is_file() else None)


def evaluate(checkpoint, data, task=None, batches: int = 16, micro_batch: int = 8, trust: bool = False) -> dict:
    cfg, vocab, weights = checkpoint_weights(checkpoint, task, trust)
    from skiptron.training.loader import read_manifest

    cfg.model.seq_len = read_manifest(data)["seq_len"]
    with single_process_groups():
        loss = val_loss(build_model(cfg.model, vocab, weights), data, batches, micro_batch)
    return {"val_loss": loss, "val_ppl": math.exp(loss)}


def train(args) -> int:
    """One rank of a finetuning run: the trainer with the finetuning extension, then the task file (method=mask)."""
    import torch.distributed as dist

    from skiptron.parallel import state
    from skiptron.tools.train import config_from_args
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.config import ConfigError
    from skiptron.training.masking import Finetuning, save_task_file
    from skiptron.training.signals import Preempted
    from skiptron.training.trainer import Trainer

    try:
        cfg = config_from_args(args)
        if not cfg.finetune.base and cfg.resume == "none":
            raise ConfigError("finetune.base: no pretrained checkpoint to finetune")
        trainer = Trainer.setup(cfg, extension=Finetuning())
    except (ConfigError, ckpt.CheckpointError) as err:
        kind = "config" if isinstance(err, ConfigError) else "checkpoint"
        print(f"skiptron-finetune: {kind} error: {err}", file=sys.stderr)
        state.shutdown()
        return 2 if kind == "config" else 1
    try:
        summary = trainer.run()
        if cfg.finetune.method == "mask":
            out = save_task_file(trainer.engine.module, Path(cfg.run.dir) / TASK_FILE, cfg,
                                 is_writer=trainer.layout.is_writer)
            if out is not None:
                print(f"task file: {out} ({out.stat().st_size} bytes)")
        dist.barrier()
    finally:
        state.shutdown()
    if trainer.stopped_by:
        raise Preempted(trainer.stopped_by, trainer.last_saved_step)
    if int(os.environ.get("RANK", "0")) == 0 and summary.get("best_val_loss") is not None:
        print(f"best validation loss {summary['best_val_loss']:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from skiptron.tools.train import add_trust_argument
    from skiptron.training import verbosity

    p = argparse.ArgumentParser(prog="skiptron-finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="finetune (one rank under torchrun); see above")
    t.add_argument("--config", required=True, help="YAML file or preset name of the run (with finetune.* keys)")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. finetune.base=CKPT finetune.method=mask")
    add_trust_argument(t)
    verbosity.add_argument(t)
    m = sub.add_parser("merge", help="base checkpoint + task file -> weights-only checkpoint")
    m.add_argument("--base", required=True, help="the base checkpoint: a checkpoint, run or checkpoints directory, "
                                                 "or a `latest` file")
    m.add_argument("--task", required=True, help="the task file (task.safetensors) of a mask finetuning run")
    m.add_argument("--out", required=True, help="directory of the merged weights-only checkpoint")
    add_trust_argument(m)
    verbosity.add_argument(m)
    e = sub.add_parser("eval", help="validation loss of a checkpoint (+ task file)")
    e.add_argument("--checkpoint", required=True, help="a checkpoint, run or checkpoints directory, or a `latest` file")
    e.add_argument("--task", help="a task file to apply to the checkpoint first")
    e.add_argument("--data", required=True, help="prepared data directory whose val split is measured")
    e.add_argument("--batches", type=int, default=16, help="validation micro-batches (default: %(default)s)")
    e.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch (default: %(default)s)")
    add_trust_argument(e)
    verbosity.add_argument(e)
    return p


def main(argv=None) -> int:
    from skiptron.training import checkpoint as ckpt
    from skiptron.training import verbosity

    args = build_parser().parse_args(argv)
    verbosity.configure(args.verbose or None)
    if args.cmd == "train":
        return train(args)
    try:
        if args.cmd == "merge":
            print(merge(args.base, args.task, args.out, args.trust_checkpoint))
        else:
            print(json.dumps(evaluate(args.checkpoint, args.data, args.task, args.batches, args.micro_batch,
                                      args.trust_checkpoint)))
    except ckpt.CheckpointError as err:
        print(f"skiptron-finetune: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
