"""Embedding compression (tools/compress.py): the direction-loss autoencoder and the SVD baseline."""
import torch

from skiptron.tools.compress import (direction_loss, reconstruct, reconstruction_metrics, svd_factors,
                                     train_autoencoder, with_embedding)


def _embedding(v=400, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -1.5, d)
    return (torch.randn(v, d, generator=g) * spectrum) @ torch.linalg.qr(torch.randn(d, d, generator=g))[0]


def test_autoencoder_improves_with_k_and_keeps_directions_better_than_svd():
    emb = _embedding()
    losses, cos_ae, cos_svd = [], [], []
    for k in (2, 4, 8, 16):
        codes, decoder, curve = train_autoencoder(emb, k, steps=150)
        assert codes.shape == (400, k) and decoder.shape == (32, k)
        assert curve[-1] < curve[0]  # training lowers the direction loss from the SVD start
        recon = reconstruct(codes, decoder)
        losses.append(direction_loss(emb, recon).item())
        cos_ae.append(reconstruction_metrics(emb, recon)["cos"])
        cos_svd.append(reconstruction_metrics(emb, reconstruct(*svd_factors(emb, k)))["cos"])
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert all(a > s for a, s in zip(cos_ae, cos_svd)), (cos_ae, cos_svd)


def test_svd_at_full_rank_is_exact():
    emb = _embedding(v=50, d=8)
    torch.testing.assert_close(reconstruct(*svd_factors(emb, 8)), emb, atol=1e-5, rtol=1e-5)


def _identity_decoder_logits():
    from skiptron.tools.finetune import build_model
    from skiptron.parallel import state
    from skiptron.training.config import load_config
    from skiptron.training.model import GPT
    from skiptron.training.weights import full_state_dict

    state.init_model_parallel(1, 1, torch.device("cpu"))
    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_len=16",
                             "model.make_vocab_size_divisible_by=64"])
    vocab = 250  # padded to 256: the padding rows stay as they are
    torch.manual_seed(0)
    weights = full_state_dict(GPT(cfg.model, vocab, 1))
    emb = weights["embedding.tokens.weight"][:vocab]
    compressed = with_embedding(weights, vocab, emb.clone(), torch.eye(64))
    tokens = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        a = build_model(cfg.model, vocab, weights).logits(tokens)
        b = build_model(cfg.model, vocab, compressed).logits(tokens)
    return torch.equal(a, b), torch.equal(compressed["embedding.tokens.weight"], weights["embedding.tokens.weight"])


def test_identity_decoder_at_k_equal_d_gives_the_original_logits(pools):
    same_logits, same_weight = pools(1).run(_identity_decoder_logits)[0]
    assert same_weight and same_logits
