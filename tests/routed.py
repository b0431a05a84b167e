"""The small routed GPT that the routing and router tests build on real process groups."""
import torch

VOCAB = 64


def routed_model(tp, balance=0, **skip):
    """2 layers of width 64, every `model.skip` key from `skip`; the same weights on every rank and layout."""
    from skiptron.parallel.state import init_model_parallel
    from skiptron.training.config import ModelConfig
    from skiptron.training.model import GPT

    init_model_parallel(tp, 1, torch.device("cpu"))
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=128, seq_len=32,
                      make_vocab_size_divisible_by=8, skip={"enabled": True, **skip})
    return GPT(cfg, VOCAB, tp, balance=balance)
