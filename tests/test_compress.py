"""Embedding compression (tools/compress.py) and the factorized embedding it produces (model.embedding_rank)."""
import pytest
import torch

from runs import BASE, train_run

from skiptron.tools.compress import (alpha_at, cosine_distance, direction_loss, reconstruct, reconstruction_metrics,
                                     svd_factors, train_autoencoder)


def _embedding(v=400, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -1.5, d)
    return (torch.randn(v, d, generator=g) * spectrum) @ torch.linalg.qr(torch.randn(d, d, generator=g))[0] * 0.05


def test_autoencoder_improves_with_k_and_beats_svd_on_its_loss():
    emb = _embedding()
    losses, svd_losses, cos_ae, cos_svd = [], [], [], []
    for k in (2, 4, 8, 16):
        codes, decoder, curve = train_autoencoder(emb, k, steps=150)
        assert codes.shape == (400, k) and decoder.shape == (32, k)
        assert len(curve) == 150
        recon, svd = reconstruct(codes, decoder), reconstruct(*svd_factors(emb, k))
        losses.append(direction_loss(emb, recon).item())
        svd_losses.append(direction_loss(emb, svd).item())
        cos_ae.append(reconstruction_metrics(emb, recon)["cos"])
        cos_svd.append(reconstruction_metrics(emb, svd)["cos"])
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    # where the code is small the autoencoder beats SVD on its loss and on directions; at k = 16 the SVD is nearly
    # exact on this spectrum and both are within 1e-3 of each other
    assert all(a < s for a, s in zip(losses[:3], svd_losses[:3])), (losses, svd_losses)
    assert all(a > s for a, s in zip(cos_ae[:3], cos_svd[:3])), (cos_ae, cos_svd)
    assert abs(cos_ae[3] - cos_svd[3]) < 1e-3 and abs(losses[3] - svd_losses[3]) < 1e-3


def test_direction_loss_terms_and_schedule():
    emb = _embedding(v=50, d=8)
    assert direction_loss(emb, emb, alpha=1.0).item() < 1e-6
    scaled = 2 * emb  # same directions, wrong magnitudes: only the magnitude term sees it
    assert cosine_distance(emb, scaled).item() < 1e-6 and direction_loss(emb, scaled).item() > 1e-4
    assert alpha_at(0, 300) == 1.0 and alpha_at(200, 300) == pytest.approx(0.1) and alpha_at(299, 300) == 0.1


def test_svd_at_full_rank_is_exact():
    emb = _embedding(v=50, d=8)
    torch.testing.assert_close(reconstruct(*svd_factors(emb, 8)), emb, atol=1e-7, rtol=1e-5)


# -- the factorized embedding in the model -------------------------------------------------------------------------
VOCAB = 250  # padded to 256: padding rows exist, and with TP=2 each rank holds 128 of them


def _model_cfg(rank=None, tie=True):
    from skiptron.training.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=96, seq_len=16,
                       make_vocab_size_divisible_by=64, tie_embeddings=tie, embedding_rank=rank)


def _logits(model, tokens):
    from skiptron.parallel.tensor_parallel import gather_tp

    with torch.no_grad():
        return gather_tp(model.logits(tokens), dim=-1)[..., :VOCAB]


def _factorized_model(tp: int, tie: bool):
    """(logits of the original model, of the k = d identity-decoder model holding its table as codes; logits, loss
    and whole gradients of a random rank-16 model) under TP = tp."""
    from skiptron.parallel.state import init_model_parallel
    from skiptron.parallel.tensor_parallel import full_tensor
    from skiptron.tools.compress import factorized
    from skiptron.training.config import Config
    from skiptron.training.masking import load_whole_weights
    from skiptron.training.model import GPT
    from skiptron.training.weights import full_state_dict

    init_model_parallel(tp, 1, torch.device("cpu"))
    tokens = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    original = GPT(_model_cfg(tie=tie), VOCAB, tp)
    weights = full_state_dict(original)
    cfg, identity = factorized(Config(model=_model_cfg(tie=tie)), weights, VOCAB,
                               weights["embedding.tokens.weight"][:VOCAB], torch.eye(64))
    assert cfg.model.embedding_rank == 64
    same = GPT(cfg.model, VOCAB, tp)
    load_whole_weights(same, identity)
    torch.manual_seed(0)
    model = GPT(_model_cfg(16, tie), VOCAB, tp)
    loss = model(tokens)
    loss.backward()
    grads = {n: full_tensor(p, p.grad) for n, p in model.named_parameters()}
    return (_logits(original, tokens[:, :-1]), _logits(same, tokens[:, :-1]), _logits(model, tokens[:, :-1]),
            loss.detach(), grads)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_factorized_embedding_identity_decoder_and_tp2_equals_tp1(pool2, tie):
    ref = pool2.run(_factorized_model, 1, tie)[0]
    original, same, logits, loss, grads = ref
    torch.testing.assert_close(same, original, atol=1e-5, rtol=0)  # k = d, identity decoder: the original model
    assert {"embedding.codes", "embedding.decoder"} <= grads.keys() and "embedding.tokens.weight" not in grads
    assert grads["embedding.codes"].shape == (256, 16) and grads["embedding.decoder"].shape == (64, 16)
    assert grads["embedding.decoder"].abs().sum() > 0 and grads["embedding.codes"][:VOCAB].abs().sum() > 0
    for got in pool2.run(_factorized_model, 2, tie):
        torch.testing.assert_close(got[0], original, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1], original, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[2], logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[3], loss, atol=1e-5, rtol=0)
        assert got[4].keys() == grads.keys()
        for name, grad in got[4].items():
            torch.testing.assert_close(grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_config_refuses_a_rank_above_hidden():
    from skiptron.training.config import ConfigError, load_config

    assert load_config(None, ["model.hidden_size=64", "model.embedding_rank=64"]).model.embedding_rank == 64
    with pytest.raises(ConfigError, match="model.embedding_rank: 65 is larger than model.hidden_size 64"):
        load_config(None, ["model.hidden_size=64", "model.embedding_rank=65"])
    with pytest.raises(ConfigError, match="model.embedding_rank"):
        load_config(None, ["model.embedding_rank=0"])


def _base_checkpoint(data, out):
    """A random BASE model as a weights-only checkpoint; returns its logits on fixed tokens and its vocab."""
    from skiptron.parallel import state
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.config import load_config
    from skiptron.training.loader import read_manifest
    from skiptron.training.model import GPT
    from skiptron.training.weights import full_state_dict

    state.init_model_parallel(1, 1, torch.device("cpu"))
    vocab = read_manifest(data)["vocab_size"]
    cfg = load_config(None, BASE + [f"data.path={data}"])
    torch.manual_seed(3)
    ckpt.write_weights_checkpoint(out, cfg, full_state_dict(GPT(cfg.model, vocab, 1)), vocab)
    return vocab


def _compressed_logits(base, out, tokens):
    """Logits of the compressed checkpoint's model, and of the original architecture with the table replaced by
    codes @ decoder.T; parameter counts of both checkpoints."""
    from skiptron.tools.compress import EMBEDDING
    from skiptron.tools.finetune import build_model, checkpoint_weights

    cfg, vocab, small = checkpoint_weights(out)
    base_cfg, _, weights = checkpoint_weights(base)
    full = dict(weights)
    full[EMBEDDING] = full[EMBEDDING].clone()
    full[EMBEDDING][:vocab] = reconstruct(small["embedding.codes"][:vocab], small["embedding.decoder"])
    with torch.no_grad():
        a = build_model(cfg.model, vocab, small).logits(tokens)[..., :vocab]
        b = build_model(base_cfg.model, vocab, full).logits(tokens)[..., :vocab]
    count = lambda w: sum(v.numel() for v in w.values())
    return cfg.model.embedding_rank, sorted(k for k in small if k.startswith("embedding.")), a, b, count(small), \
        count(weights)


def _finetune_saved(data, run_dir, base, layout):
    """Four steps of full finetuning from the compressed checkpoint under `layout`, saved; the losses, the saved
    checkpoint's layout record of the codes and whole weights, and the trainer's whole weights."""
    import torch.distributed as dist

    from skiptron.training import checkpoint as ckpt

    losses, weights = train_run(["model.embedding_rank=16", f"finetune.base={base}", "train.max_steps=4",
                                 "checkpoint.save_at_end=true", "launch.health_check=false"] + layout, data, run_dir,
                                finetune=True)
    dist.barrier()
    path = ckpt.find_resumable(run_dir / "checkpoints", log=None)
    meta = ckpt.read_meta(path)
    saved, _, _, _ = ckpt.read_full_state(path, with_optimizer=False)
    return losses, meta["params"]["embedding.codes"], {k: v.detach() for k, v in saved.items()}, weights


def test_compress_out_writes_a_smaller_model_that_trains_under_tp2_like_dp2(pools, tiny_data, tmp_path):
    from skiptron.tools.compress import main
    from skiptron.tools.finetune import single_process_groups

    base, out = tmp_path / "base", tmp_path / "small"
    vocab = pools(1).run(_base_checkpoint, tiny_data, base)[0]
    assert main(["--checkpoint", str(base), "--ks", "16", "--method", "ae", "--steps", "30", "--out", str(out)]) == 0
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with single_process_groups():
        rank, names, a, b, n_small, n_base = _compressed_logits(base, out, tokens)
    assert rank == 16 and names == ["embedding.codes", "embedding.decoder"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # the factorized model computes codes @ decoder.T
    assert n_base - n_small == 320 * 64 - (320 * 16 + 64 * 16)  # padded V x d -> padded V x k + d x k
    dp = pools(2).run(_finetune_saved, tiny_data, tmp_path / "dp2", out, ["zero.stage=1"])[0]
    losses, layout, saved, trained = pools(2).run(_finetune_saved, tiny_data, tmp_path / "tp2", out,
                                                  ["parallel.tp=2", "zero.stage=3"])[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(dp[0]), atol=1e-5, rtol=0)  # TP=2 ZeRO-3 == DP=2
    assert losses[-1] < losses[0]
    assert layout["partition_dim"] == 0 and layout["shape"] == [320, 16] and layout["vocab_padding"] == 320 - vocab
    assert saved.keys() == trained.keys() == dp[3].keys()
    for name in saved:  # the TP=2 checkpoint joins back to the whole weights the trainer held, those of DP=2
        torch.testing.assert_close(saved[name], trained[name], atol=0, rtol=0, msg=name)
        torch.testing.assert_close(saved[name], dp[3][name], atol=1e-4, rtol=1e-4, msg=name)
