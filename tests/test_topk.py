"""parallel/topk.py: the group-wide top-k of capacity routing, by all_gather or by radix selection, is the same
exact split (ties to the lower global index) as a stable sort of the concatenated scores."""
import torch

CASES = {
    "distinct": (lambda g: torch.rand(4, 96, generator=g), (1, 100, 384, 767, 768)),
    # few distinct values: most of the k-th value's ties straddle the two ranks
    "tied": (lambda g: torch.randint(0, 5, (4, 96), generator=g).float() / 4, (1, 200, 384, 500)),
    "signed": (lambda g: torch.cat([torch.randn(380, generator=g), torch.tensor([0.0, -0.0, float("inf"),
                                                                                  -float("inf")])]), (0, 2, 383, 384)),
}


def _reference(everything: torch.Tensor, k: int, world: int):
    chosen = torch.zeros(everything.numel(), dtype=torch.bool)
    chosen[torch.argsort(-everything.flatten(), stable=True)[:k]] = True
    return chosen.view(world, -1)


def _splits():
    import torch.distributed as dist

    from skiptron.parallel.syncs import host_reads
    from skiptron.parallel.topk import start_top_k

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, (make, ks) in CASES.items():
        scores = make(torch.Generator().manual_seed(rank))
        for k in ks:
            for method in ("gather", "select"):
                with host_reads() as reads:  # a GPU's host never waits for the split
                    mask, counts = start_top_k(scores, k, dist.group.WORLD, method).wait()
                out[name, k, method] = (scores, mask, counts, list(reads))
    return out, world


def test_selection_and_gather_give_the_sorted_split_on_every_rank(pool2):
    results = pool2.run(_splits)
    world = results[0][1]
    for key in results[0][0]:
        name, k, method = key
        everything = torch.stack([r[0][key][0].flatten() for r in results])
        expected = _reference(everything, k, world)
        for rank, (out, _) in enumerate(results):
            _, mask, counts, reads = out[key]
            assert torch.equal(mask.flatten(), expected[rank]), key
            assert counts.tolist() == expected.sum(1).tolist(), key
            assert reads == [], (key, reads)


def test_sortable_keys_order_floats_as_their_values():
    from skiptron.parallel.topk import sortable_keys

    x = torch.cat([torch.randn(1000) * 1e3, torch.tensor([0.0, -0.0, 1e-45, -1e-45, float("inf"), -float("inf"),
                                                          3.4e38, -3.4e38])])
    keys = sortable_keys(x)
    assert keys.min() >= 0 and keys.max() < 2**32
    order = torch.argsort(keys, stable=True)
    assert torch.all(x[order][1:] >= x[order][:-1])
    assert sortable_keys(torch.tensor([-0.0])) < sortable_keys(torch.tensor([0.0]))


def test_one_rank_is_a_plain_top_k():
    from skiptron.parallel.topk import start_top_k

    scores = torch.tensor([[0.5, 0.9, 0.5], [0.1, 0.9, 0.7]])
    mask, counts = start_top_k(scores, 3).wait()
    assert counts is None
    assert mask.tolist() == [[False, True, False], [False, True, True]]


def _capacity_losses_with(gather_max):
    from skiptron.parallel import topk

    from test_routing import _loss_and_grads

    saved, topk.GATHER_MAX = topk.GATHER_MAX, gather_max
    try:
        return _loss_and_grads(1, 0, "layer", "all", mode="capacity")
    finally:
        topk.GATHER_MAX = saved


def test_capacity_routing_by_selection_equals_by_gather(pool2):
    """A capacity-routed model at DP=2 with the balancer on: radix selection (as at scale) and the all_gather give
    the same decisions, so the same loss and gradients."""
    gathered = pool2.run(_capacity_losses_with, 1 << 30)
    selected = pool2.run(_capacity_losses_with, 0)
    for by_gather, by_selection in zip(gathered, selected):
        assert by_gather[2] == by_selection[2] and by_gather[2]['tokens_moved'] > 0  # the same counts, exchanged
        torch.testing.assert_close(by_selection[0], by_gather[0], atol=0, rtol=0)
        for name, grad in by_gather[1].items():
            torch.testing.assert_close(by_selection[1][name], grad, atol=0, rtol=0)
