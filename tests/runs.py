"""Tiny training runs for tests: a CPU-sized config and a function that trains it on one rank of a pool."""

BASE = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_len=32",
    "model.make_vocab_size_divisible_by=64", "train.micro_batch_size=2", "train.global_batch_size=4",
    "train.max_steps=5", "optimizer.warmup_steps=2", "optimizer.lr=3e-3", "eval.interval=0", "eval.batches=1",
    "logging.tensorboard=false", "data.num_workers=0", "checkpoint.save_at_end=false",
]


def train_run(overrides, data, run_dir, metrics=("loss",), finetune=False):
    """Train BASE + overrides on this rank (`finetune`: with skiptron-finetune's trainer extension); returns (rank 0:
    per-step values of `metrics`, else None; whole weights). With one metric the per-step values are a plain list."""
    import torch.distributed as dist

    from skiptron.training.config import load_config
    from skiptron.training.metrics import read_metrics
    from skiptron.training.trainer import Trainer
    from skiptron.training.weights import full_state_dict

    cfg = load_config(None, BASE + [f"data.path={data}", f"run.dir={run_dir}"] + list(overrides))
    if finetune:
        from skiptron.training.masking import Finetuning

        trainer = Trainer.setup(cfg, extension=Finetuning())
    else:
        trainer = Trainer.setup(cfg)
    trainer.run()
    weights = full_state_dict(trainer.engine.module)
    dist.barrier()
    values = None
    if dist.get_rank() == 0:
        records = read_metrics(run_dir)
        values = {k: [m.get(k) for m in records] for k in metrics}
        if len(metrics) == 1:
            values = values[metrics[0]]
    return values, weights


def signal_at_step(trainer, stop_at: int) -> None:
    """Make rank 0 send itself SIGUSR1 during step `stop_at`, as SLURM does before a time limit."""
    import os
    import signal

    import torch.distributed as dist

    step_fn = trainer.train_step

    def train_step(batches):
        out = step_fn(batches)
        if trainer.progress.step + 1 == stop_at and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    trainer.train_step = train_step


def train_preset(preset, overrides, data, run_dir) -> None:
    """What `skiptron-train --config PRESET overrides...` trains, on this rank of a pool (a reference run)."""
    from skiptron.training.config import load_config
    from skiptron.training.trainer import Trainer

    Trainer.setup(load_config(preset, list(overrides) + [f"data.path={data}", f"run.dir={run_dir}"])).run()
