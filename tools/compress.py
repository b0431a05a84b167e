"""`skiptron-compress`: compress a checkpoint's token embedding (V x d) to a V x k code plus a k -> d decoder.

Two methods at the same parameter count (V*k + k*d):

- `ae`: an autoencoder trained with the direction-aware loss of "Direction is what you need: Improving Word Embedding
  Compression in Large Language Models" (Balazy et al., 2021, arXiv 2106.08181), as its released code
  (MohammadrezaBanaei/orientation_based_embedding_compression, configs/config.yaml) sets it: 0.9975 / 5 x the mean
  cosine distance between each row e and its reconstruction e', plus 0.0025 x mean(|e' - e| ^ alpha) over the
  entries, alpha annealed linearly from 1 to 0.1 over the first two thirds of training. The cosine term fixes the
  direction; the second, small term keeps the magnitudes (a plain L1 error at first, then ever closer to counting
  the entries that are not exact). (The paper's text was not available here; the loss is the one its code runs.)
  Encoder: the rank-k SVD projection plus a tanh MLP (its last layer starts at zero, so training starts from the SVD
  solution; the paper's default encoder is linear); decoder: linear k -> d, so the compressed embedding is the
  factorization `codes @ decoder.T` and only codes and decoder are kept.
- `svd`: the truncated SVD, codes U_k S_k and decoder V_k (the best rank-k approximation in squared error).

The compressed model holds the factors, not a V x d table: `model.embedding_rank = k`, parameters `embedding.codes`
(padded V x k, vocab-parallel) and `embedding.decoder` (d x k); with tied embeddings the output layer uses
codes @ decoder.T too. `--out DIR` writes it as a weights-only checkpoint (loads with `resume=DIR` or
`finetune.base=DIR` under any layout; `skiptron-finetune eval` evaluates it).

    skiptron-compress --checkpoint CKPT --data DIR [--ks 16,32,64,128] [--steps 600]    the sweep table
    skiptron-compress --checkpoint CKPT --data DIR --ks 64 --method ae --out DIR         one compressed checkpoint
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from skiptron.tools.results import write_json

EMBEDDING = "embedding.tokens.weight"
CODES, DECODER = "embedding.codes", "embedding.decoder"
COS_WEIGHT, MAGNITUDE_WEIGHT = 0.9975 / 5, 0.0025  # the paper's code: cos_dist coeff / scaler_div, l1_norm coeff


def cosine_distance(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(recon, target, dim=-1, eps=1e-8)).mean()


def direction_loss(target: torch.Tensor, recon: torch.Tensor, alpha: float = 0.1,
                   magnitude_weight: float = MAGNITUDE_WEIGHT) -> torch.Tensor:
    """COS_WEIGHT * mean(1 - cos(e, e')) + magnitude_weight * mean((|e' - e| + 1e-10) ^ alpha), on rows of the
    embedding in its own units (the second term is not scale-free)."""
    magnitude = ((recon - target).abs() + 1e-10).pow(alpha).mean()
    return COS_WEIGHT * cosine_distance(target, recon) + magnitude_weight * magnitude


def svd_factors(emb: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes V x k, decoder d x k) of the rank-k truncated SVD: emb ~ codes @ decoder.T."""
    u, s, vh = torch.linalg.svd(emb.double(), full_matrices=False)
    return (u[:, :k] * s[:k]).float(), vh[:k].T.float().contiguous()


class Autoencoder(nn.Module):
    def __init__(self, d: int, k: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 2 * d
        self.project = nn.Linear(d, k, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, k))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.decoder = nn.Linear(k, d, bias=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x) + self.mlp(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))


def alpha_at(step: int, steps: int) -> float:
    """The magnitude term's exponent: 1 -> 0.1 linearly over the first two thirds of the steps, then 0.1 (the paper's
    code anneals over 20 of its 30 epochs)."""
    return max(0.1, 1.0 - 0.9 * step / max(1, round(2 * steps / 3)))


def train_autoencoder(emb: torch.Tensor, k: int, steps: int = 600, lr: float = 2e-3,
                      magnitude_weight: float = MAGNITUDE_WEIGHT, seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(codes V x k, decoder d x k, loss curve) of the direction-loss autoencoder, started from the SVD solution.
    Full-batch Adam over the rows of `emb`; the curve is the loss at each step's alpha."""
    torch.manual_seed(seed)
    emb = emb.float()
    scale = emb.norm(dim=-1).mean()
    x = emb / scale  # unit-free optimisation; the loss sees the reconstruction in the embedding's own units
    ae = Autoencoder(emb.shape[1], k)
    _, vk = svd_factors(x, k)
    with torch.no_grad():
        ae.project.weight.copy_(vk.T)
        ae.decoder.weight.copy_(vk)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    curve = []
    for step in range(steps):
        recon = ae(x) * scale
        loss = direction_loss(emb, recon, alpha_at(step, steps), magnitude_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        curve.append(loss.item())
    with torch.no_grad():
        return (ae.encode(x) * scale).contiguous(), ae.decoder.weight.detach().clone(), curve


def compress(emb: torch.Tensor, k: int, method: str, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "svd":
        return svd_factors(emb, k)
    if method == "ae":
        codes, decoder, _ = train_autoencoder(emb, k, **kw)
        return codes, decoder
    raise ValueError(f"unknown method {method!r} (ae, svd)")


def reconstruct(codes: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    return codes @ decoder.T


def embedding_matrix(weights: dict, vocab: int) -> torch.Tensor:
    """The checkpoint's V x d token embedding (rebuilt from its factors if it is compressed already)."""
    if EMBEDDING in weights:
        return weights[EMBEDDING][:vocab].float()
    return reconstruct(weights[CODES][:vocab].float(), weights[DECODER].float())


def factorized(cfg, weights: dict, vocab: int, codes: torch.Tensor, decoder: torch.Tensor):
    """(config, whole weights) of the model with the factorized embedding: model.embedding_rank = k, the table
    replaced by `embedding.codes` (padded vocabulary; padding rows zero: never looked up, -inf logits) and
    `embedding.decoder`."""
    cfg = cfg.model_copy(deep=True)
    cfg.model.embedding_rank = codes.shape[1]
    padded = torch.zeros(cfg.model.padded_vocab_size(vocab), codes.shape[1])
    padded[:vocab] = codes
    out = {k: v for k, v in weights.items() if k not in (EMBEDDING, CODES, DECODER)}
    out.update({CODES: padded, DECODER: decoder.float().contiguous()})
    return cfg, out


def reconstruction_metrics(emb: torch.Tensor, recon: torch.Tensor) -> dict:
    cos = F.cosine_similarity(recon, emb, dim=-1)
    return {"cos": cos.mean().item(), "rel_mse": ((recon - emb) ** 2).sum().item() / (emb ** 2).sum().item()}


def sweep(checkpoint, data, ks, steps: int = 600, batches: int = 16, magnitude_weight: float = MAGNITUDE_WEIGHT,
          log=print, trust: bool = False):
    from skiptron.tools.finetune import build_model, checkpoint_weights, single_process_groups, val_loss
    from skiptron.training.loader import read_manifest

    cfg, vocab, weights = checkpoint_weights(checkpoint, trust=trust)
    cfg.model.seq_len = read_manifest(data)["seq_len"]
    emb = embedding_matrix(weights, vocab)
    d = emb.shape[1]
    n_model = sum(v.numel() for v in weights.values())
    rows = []
    with single_process_groups():
        base = val_loss(build_model(cfg.model, vocab, weights), data, batches)
        rows.append({"method": "original", "k": d, "params": vocab * d, "saved": 0, "saved_pct_model": 0.0,
                     "val_loss": base, "val_ppl": math.exp(base), "cos": 1.0, "rel_mse": 0.0})
        for k in ks:
            for method in ("svd", "ae"):
                codes, decoder = compress(emb, k, method, **({"steps": steps, "magnitude_weight": magnitude_weight}
                                                             if method == "ae" else {}))
                params = codes.numel() + decoder.numel()
                small_cfg, small = factorized(cfg, weights, vocab, codes, decoder)
                loss = val_loss(build_model(small_cfg.model, vocab, small), data, batches)
                row = {"method": method, "k": k, "params": params, "saved": vocab * d - params,
                       "saved_pct_model": 100 * (vocab * d - params) / n_model, "val_loss": loss,
                       "val_ppl": math.exp(loss), **reconstruction_metrics(emb, reconstruct(codes, decoder))}
                rows.append(row)
                if log:
                    log(json.dumps(row))
    return rows


def table(rows) -> str:
    lines = ["| method | k | embedding params | saved (% of model) | mean cos | rel. sq. error | val loss | val ppl |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['k']} | {r['params']:,} | {r['saved']:,} ({r['saved_pct_model']:.1f}%) | "
                     f"{r['cos']:.4f} | {r['rel_mse']:.4f} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} |")
    return "\n".join(lines)


def write_compressed(checkpoint, out, k: int, method: str, steps: int = 600,
                     magnitude_weight: float = MAGNITUDE_WEIGHT, trust: bool = False) -> Path:
    """A weights-only checkpoint of the model with the factorized embedding (model.embedding_rank = k)."""
    from skiptron.tools.finetune import checkpoint_weights
    from skiptron.training import checkpoint as ckpt

    checkpoint = ckpt.resolve_checkpoint(checkpoint)
    cfg, vocab, weights = checkpoint_weights(checkpoint, trust=trust)
    if not 1 <= k <= cfg.model.hidden_size:
        raise ValueError(f"--ks: k = {k} must be between 1 and the hidden size {cfg.model.hidden_size}")
    kw = {"steps": steps, "magnitude_weight": magnitude_weight} if method == "ae" else {}
    codes, decoder = compress(embedding_matrix(weights, vocab), k, method, **kw)
    small_cfg, small = factorized(cfg, weights, vocab, codes, decoder)
    tok = checkpoint / "tokenizer.json"
    return ckpt.write_weights_checkpoint(out, small_cfg, small, vocab, tok if tok.is_file() else None)


def build_parser() -> argparse.ArgumentParser:
    from skiptron.tools.convert import CHECKPOINT_HELP
    from skiptron.tools.train import add_trust_argument
    from skiptron.training import verbosity

    p = argparse.ArgumentParser(prog="skiptron-compress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", help="prepared data directory whose val split measures the loss (sweep)")
    p.add_argument("--ks", default="16,32,64,128", help="comma-separated code sizes k")
    p.add_argument("--method", choices=("ae", "svd"), default="ae", help="with --out")
    p.add_argument("--steps", type=int, default=600, help="autoencoder training steps (full batch)")
    p.add_argument("--magnitude-weight", type=float, default=MAGNITUDE_WEIGHT,
                   help=f"weight of the magnitude term (the cosine term's is {COS_WEIGHT})")
    p.add_argument("--batches", type=int, default=16, help="validation micro-batches (of 8)")
    p.add_argument("--out", help="write one compressed checkpoint (first k of --ks) here instead of sweeping")
    p.add_argument("--json", help="also write the sweep rows here")
    add_trust_argument(p)
    verbosity.add_argument(p)
    return p


def main(argv=None) -> int:
    from skiptron.training import checkpoint as ckpt
    from skiptron.training import verbosity

    p = build_parser()
    args = p.parse_args(argv)
    verbosity.configure(args.verbose or None)
    ks = [int(k) for k in args.ks.split(",")]
    if not args.out and not args.data:
        p.error("--data is needed for the sweep")
    try:
        checkpoint = ckpt.resolve_checkpoint(args.checkpoint)
        if args.out:
            print(write_compressed(checkpoint, args.out, ks[0], args.method, args.steps, args.magnitude_weight,
                                   args.trust_checkpoint))
            return 0
        rows = sweep(checkpoint, args.data, ks, args.steps, args.batches, args.magnitude_weight,
                     trust=args.trust_checkpoint)
    except ckpt.CheckpointError as err:
        print(f"skiptron-compress: {err}", file=sys.stderr)
        return 1
    write_json(args.json, rows)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
