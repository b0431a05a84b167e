"""`skiptron-bench --config FILE [overrides]`: skiptron's train step against the same model in plain PyTorch.

Both run in this one process, on the same device, with the same dimensions, batch and AdamW settings, on random
tokens; timings alternate between the two so that machine noise hits both alike. Prints tokens/s, achieved GFLOP/s
and the ratio skiptron / plain.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

from skiptron.parallel import state
from skiptron.parallel.timing import synchronized_seconds
from skiptron.training.config import Config, load_config
from skiptron.training.engine import build_engine
from skiptron.training.flops import config_flops_per_token
from skiptron.training.model import GPT
from skiptron.training.trainer import Trainer, seed_everything
from skiptron.training import verbosity


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


def plain_step(model, optimizer, batches, clip: float) -> float:
    total = 0.0
    for tokens in batches:
        loss = model(tokens) / len(batches)
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def alternate_timings(systems: dict, device: torch.device, warmup: int, rounds: int, steps: int) -> dict:
    """Seconds per call of each system, one list entry per round; rounds alternate between the systems so that
    machine noise hits all of them alike."""
    for run in systems.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in systems}
    for _ in range(rounds):
        for name, run in systems.items():
            times[name].append(synchronized_seconds(lambda: [run() for _ in range(steps)], device) / steps)
    return times


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skiptron-bench", description=__doc__)
    p.add_argument("--config", default="tiny", help="YAML file or preset name (tiny, 125m, 350m, 1.3b, 6.7b)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the model and its random tokens (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and system")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each round (default: %(default)s)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides, e.g. parallel.tp=2")
    verbosity.add_argument(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    device, _ = state.init_world(cfg.parallel.backend)
    layout = state.init_model_parallel(cfg.parallel.tp, cfg.parallel.pp, device)
    if layout.world_size != 1:
        raise SystemExit("skiptron-bench compares against a single-process baseline: run it as one process")
    ga = cfg.grad_accum_steps(1)
    mb, seq, vocab = cfg.train.micro_batch_size, cfg.model.seq_len, args.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (mb, seq + 1), generator=g).to(device) for _ in range(ga)]

    seed_everything(cfg.train.seed)
    engine, precision = build_engine(cfg, GPT(cfg.model, vocab, 1), layout)
    trainer = Trainer(cfg, layout, engine, precision, vocab, manifest={})
    seed_everything(cfg.train.seed)
    padded = cfg.model.padded_vocab_size(vocab)
    plain = PlainGPT(cfg, padded).to(device)
    o = cfg.optimizer
    opt = torch.optim.AdamW(plain.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay, foreach=device.type == "cpu", fused=device.type == "cuda")

    systems = {"skiptron": lambda: trainer.train_step(iter(batches)),
               "plain": lambda: plain_step(plain, opt, batches, o.grad_clip or math.inf)}
    times = alternate_timings(systems, device, args.warmup, args.rounds, args.steps)

    tokens = cfg.train.global_batch_size * seq
    fpt = config_flops_per_token(cfg.model, padded)
    result = {"config": args.config, "overrides": args.overrides, "device": str(device), "threads":
              torch.get_num_threads(), "tokens_per_step": tokens, "precision": precision}
    for name, t in times.items():
        step = statistics.median(t)
        result[name] = {"step_s": step, "tokens_per_s": tokens / step, "gflops": fpt * tokens / step / 1e9}
        print(f"{name:9s} step {step * 1e3:8.1f} ms | {tokens / step:9.0f} tok/s | "
              f"{fpt * tokens / step / 1e9:7.1f} GFLOP/s")
    result["ratio"] = result["skiptron"]["tokens_per_s"] / result["plain"]["tokens_per_s"]
    print(f"ratio skiptron / plain PyTorch: {result['ratio']:.3f} (target >= 0.95)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    state.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
