"""Data-parallel token balancing: the plan's properties, and exactness of balance -> f -> restore on real gloo ranks."""
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distributed import one_tensor_gather
from skiptron.parallel.balance import balance, plan_moves, plan_targets, plan_transfers, rank_splits, shed_tokens

COUNTS = st.lists(st.integers(0, 10**5), min_size=1, max_size=64)


# ------------------------------------------------------------------------------------------------------------- plan
def _least_moves(counts):
    q, r = divmod(sum(counts), len(counts))
    above = [c - q for c in counts if c > q]
    return sum(above) - min(r, len(above))


@settings(max_examples=300, deadline=None)
@given(COUNTS)
def test_plan_properties(counts):
    world = len(counts)
    original = list(counts)
    S = plan_transfers(counts)
    assert len(S) == world and all(len(row) == world for row in S)
    assert all(S[i][i] == 0 for i in range(world))
    assert all(v >= 0 for row in S for v in row)
    sent = [sum(row) for row in S]
    received = [sum(S[i][j] for i in range(world)) for j in range(world)]
    after = [c - s + r for c, s, r in zip(counts, sent, received)]
    total = sum(counts)
    assert sum(after) == total
    lo, hi = total // world, -(-total // world)
    assert all(lo <= a <= hi for a in after)
    assert after == plan_targets(counts)
    # only over-loaded ranks send, only under-loaded ranks receive, nobody does both
    for i, c in enumerate(counts):
        if sent[i]:
            assert c * world > total and not received[i]
        if received[i]:
            assert c * world < total
    assert sum(sent) == _least_moves(counts)
    nonzero = sum(1 for row in S for v in row if v)
    assert nonzero <= max(0, sum(1 for s in sent if s) + sum(1 for r in received if r) - 1)
    # pure and deterministic, whatever the sequence type
    assert plan_transfers(tuple(counts)) == S
    assert plan_transfers(torch.tensor(counts).tolist()) == S
    assert counts == original  # input untouched


@settings(max_examples=100, deadline=None)
@given(COUNTS)
def test_moves_match_matrix(counts):
    S = plan_transfers(counts)
    moves = plan_moves(counts)
    assert all(n > 0 for _, _, n in moves)
    assert moves == sorted(moves)
    dense = {(i, j): S[i][j] for i in range(len(S)) for j in range(len(S)) if S[i][j]}
    assert {(i, j): n for i, j, n in moves} == dense


@settings(max_examples=100, deadline=None)
@given(COUNTS)
def test_each_rank_computes_its_own_row_and_column_of_the_plan(counts):
    S = plan_transfers(counts)
    for rank in range(len(counts)):
        send, recv = rank_splits(counts, rank)
        assert send == S[rank] and recv == [row[rank] for row in S]


def test_plan_known_cases():
    assert plan_transfers([6, 2, 1, 3]) == [[0, 1, 2, 0], [0] * 4, [0] * 4, [0] * 4]
    assert plan_transfers([3, 4]) == [[0, 0], [0, 0]]          # already within one: nothing moves
    assert plan_targets([10, 0, 0, 0]) == [3, 3, 2, 2]          # remainder: over-loaded first, then lowest ranks
    assert plan_targets([0, 0, 0, 10]) == [3, 2, 2, 3]
    assert plan_transfers([0, 0, 0]) == [[0] * 3] * 3
    assert plan_transfers([5]) == [[0]]
    assert plan_moves([]) == [] and plan_targets([]) == [] and shed_tokens([]) == 0
    with pytest.raises(ValueError):
        plan_transfers([1, -1])


def test_plan_is_fast_for_thousands_of_ranks():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 10**5, (8192,), generator=g).tolist()
    t = time.perf_counter()
    moves = plan_moves(counts)
    assert time.perf_counter() - t < 0.5
    assert sum(n for *_, n in moves) == _least_moves(counts)
    t = time.perf_counter()
    plan_transfers(counts[:2048])
    assert time.perf_counter() - t < 2.0


def test_single_process_is_a_no_op():
    x = torch.randn(5, 3, requires_grad=True)
    bt = balance(x)
    assert bt.tokens is x
    y = bt.tokens * 2
    assert bt.restore(y) is y
    assert bt.stats.tokens_moved == 0 and bt.stats.imbalance_before == 1.0 and bt.stats.bytes_moved == 0


# ------------------------------------------------------------------------------------------------ distributed helpers
def _f(hidden=16, out=24, dtype=torch.float64):
    torch.manual_seed(1234)  # identical weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(hidden, out), torch.nn.GELU()).to(dtype)


def _local_and_balanced(counts, seed, dtype):
    """f applied locally and through balance -> f -> restore; returns outputs, input and weight grads of both."""
    import torch.distributed as dist

    rank = dist.get_rank()
    n = counts[rank]
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn(n, 16, generator=g, dtype=dtype)
    w = torch.randn(n, 24, generator=g, dtype=dtype)  # a per-token loss weighting, so gradients differ per token
    results = {}
    for mode in ("local", "balanced"):
        f = _f(dtype=dtype)
        xi = x.clone().requires_grad_(True)
        if mode == "local":
            y = f(xi)
            loads = None
            stats = None
        else:
            bt = balance(xi)
            y = bt.restore(f(bt.tokens))
            loads = bt.num_tokens
            stats = bt.stats
        (y * w).sum().backward()
        grads = [p.grad.clone() for p in f.parameters()]
        for gr in grads:
            dist.all_reduce(gr)  # the DP gradient reduction
        results[mode] = (y.detach(), xi.grad.clone(), grads, loads, stats)
    return results


def _check_exact(results, counts, tol, rtol=0.0):
    total, world = sum(counts), len(counts)
    loads = []
    for rank, res in enumerate(results):
        y0, gx0, gw0, _, _ = res["local"]
        y1, gx1, gw1, load, stats = res["balanced"]
        assert y1.shape == y0.shape == (counts[rank], 24)
        torch.testing.assert_close(y1, y0, atol=tol, rtol=rtol)
        torch.testing.assert_close(gx1, gx0, atol=tol, rtol=rtol)
        for a, b in zip(gw1, gw0):
            torch.testing.assert_close(a, b, atol=tol, rtol=rtol)
        loads.append(load)
    assert sum(loads) == total
    assert all(total // world <= m <= -(-total // world) for m in loads)
    assert loads == loads_after_from_plan(counts)


def loads_after_from_plan(counts):
    S = plan_transfers(counts)
    return [c - sum(S[i]) + sum(S[j][i] for j in range(len(S))) for i, c in enumerate(counts)]


def _skewed(world, seed):
    g = torch.Generator().manual_seed(seed)
    heavy = torch.randint(0, world, (1,), generator=g).item()
    counts = [int(torch.randint(0, 60, (1,), generator=g)) for _ in range(world)]
    counts[heavy] = int(torch.randint(400, 900, (1,), generator=g))
    return counts


# -------------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("counts", [
    _skewed(4, 0), _skewed(4, 1), [900, 100, 0, 37], [0, 0, 0, 5], [2, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0],
    [10, 10, 11, 10],
])
def test_exact_pool4(pool4, counts):
    _check_exact(pool4.run(_local_and_balanced, counts, 7, torch.float64), counts, 1e-6)


@pytest.mark.parametrize("counts", [[1000, 3], [0, 7], [90, 10], [1, 0], [4, 4]])
def test_exact_pool2(pool2, counts):
    _check_exact(pool2.run(_local_and_balanced, counts, 3, torch.float64), counts, 1e-6)


def test_exact_float32(pool4):
    counts = [700, 30, 0, 90]
    # fp32 rounding: weight grads sum ~800 terms in another order
    _check_exact(pool4.run(_local_and_balanced, counts, 11, torch.float32), counts, 1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- several tensors, order
def _multi(counts):
    """Hidden (bf16), a scale (fp32, 1-D), token ids (int64) and a mask (bool) moved together; order and grads."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    n = counts[rank]
    g = torch.Generator().manual_seed(rank)
    h = torch.randn(n, 3, 5, generator=g).to(torch.bfloat16).requires_grad_(True)
    s = torch.rand(n, generator=g).requires_grad_(True)
    ids = rank * 10**6 + torch.arange(n)
    mask = ids % 3 == 0
    bt = balance([h, s, ids, mask])
    hb, sb, idb, mb = bt.tokens
    # which tokens this rank computes: its first kept tokens, then the last surplus tokens of the senders by rank
    expect = list(range(rank * 10**6, rank * 10**6 + n - bt.stats.tokens_sent))
    offsets = {i: counts[i] - sum(plan_transfers(counts)[i]) for i in range(world)}
    for src, dst, k in plan_moves(counts):
        if dst == rank:
            expect += list(range(src * 10**6 + offsets[src], src * 10**6 + offsets[src] + k))
        offsets[src] += k
    assert idb.tolist() == expect and mb.tolist() == [i % 3 == 0 for i in expect]
    assert hb.dtype == torch.bfloat16 and sb.dtype == torch.float32 and hb.shape[1:] == (3, 5)
    out_h, out_s, out_ids = bt.restore([hb.float() * sb[:, None, None], sb * 2, idb])
    assert out_ids.tolist() == ids.tolist()
    ref = h.detach().float() * s.detach()[:, None, None]
    torch.testing.assert_close(out_h.detach(), ref)
    torch.testing.assert_close(out_s.detach(), s.detach() * 2)
    (out_h.sum() + (out_s ** 2).sum()).backward()
    torch.testing.assert_close(h.grad.float(), s.detach()[:, None, None].expand(n, 3, 5).to(torch.bfloat16).float())
    torch.testing.assert_close(s.grad, h.detach().float().sum((1, 2)) + 8 * s.detach())
    return bt.stats


@pytest.mark.parametrize("counts", [[13, 0, 1, 2], [1, 0, 0, 0], [0, 0, 0, 9]])
def test_several_tensors_and_token_order(pool4, counts):
    pool4.run(_multi, counts)


# ------------------------------------------------------------------------------------------- collectives and stats
def _count_collectives(counts):
    import torch.distributed as dist

    calls = []
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_to_all_single", "all_reduce",
                                                         one_tensor_gather(), "broadcast", "barrier")}

    def wrap(name):
        def fn(*a, **k):
            calls.append(name)
            return originals[name](*a, **k)
        return fn

    for name in originals:
        setattr(dist, name, wrap(name))
    try:
        n = counts[dist.get_rank()]
        x = torch.randn(n, 8, requires_grad=True)
        scale = torch.ones(n, dtype=torch.float64, requires_grad=True)
        bt = balance([x, scale])
        after_balance = list(calls)
        h, sc = bt.tokens
        out, out_scale = bt.restore([h * 3, sc])
        after_restore = list(calls)
        (out.sum() + out_scale.sum()).backward()
        after_backward = list(calls)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return bt.stats, after_balance, after_restore, after_backward


def test_stats_and_collectives_known_case(pool4):
    counts = [6, 2, 1, 3]
    results = pool4.run(_count_collectives, counts)
    for rank, (stats, after_balance, after_restore, after_backward) in enumerate(results):
        assert after_balance == [one_tensor_gather(), "all_to_all_single"]
        assert after_restore == after_balance + ["all_to_all_single"]
        assert after_backward == after_restore + ["all_to_all_single"] * 2
        assert stats.imbalance_before == pytest.approx(2.0)
        assert stats.imbalance_after == pytest.approx(1.0)
        assert stats.tokens_moved == 3
        assert counts[rank] - stats.tokens_sent + stats.tokens_received == 3
        # rank 0 sends its last 3 tokens (1 to rank 1, 2 to rank 2): 3 * (8 * 4 + 8) bytes
        assert stats.bytes_moved == (3 * 40 if rank == 0 else 0)
        assert stats.tokens_sent == [3, 0, 0, 0][rank]
        assert stats.tokens_received == [0, 1, 2, 0][rank]


def test_balanced_counts_make_no_exchange(pool4):
    for stats, after_balance, after_restore, after_backward in pool4.run(_count_collectives, [2, 3, 2, 3]):
        assert after_backward == [one_tensor_gather()]
        assert stats.tokens_moved == 0 and stats.imbalance_before == pytest.approx(1.2)
        assert stats.imbalance_after == stats.imbalance_before
    for stats, *_ in pool4.run(_count_collectives, [0, 0, 0, 0]):
        assert stats.tokens_moved == 0 and stats.imbalance_before == 1.0 == stats.imbalance_after


def _singleton_group():
    import torch.distributed as dist

    rank = dist.get_rank()
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # collective: every rank makes every group
    originals = {name: getattr(dist, name) for name in ("all_gather", one_tensor_gather(), "all_to_all_single")}

    def forbidden(*a, **k):
        raise AssertionError("a group of size 1 must not communicate")

    for name in originals:
        setattr(dist, name, forbidden)
    try:
        x = torch.randn(rank * 3, 4, requires_grad=True)
        bt = balance(x, group=groups[rank])
        out = bt.restore(bt.tokens * 2)
        out.sum().backward()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    assert bt.tokens is x and torch.equal(x.grad, torch.full_like(x, 2.0))
    return bt.stats.tokens_moved


def test_group_of_one_is_a_no_op(pool2):
    assert pool2.run(_singleton_group) == [0, 0]


def _torch_all_to_all_single_autograd():
    """torch.distributed.nn.functional.all_to_all_single on gloo with unequal splits (what _Exchange mirrors)."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.nn.functional import all_to_all_single

    rank = dist.get_rank()
    send = [[0, 3], [1, 0]][rank]
    recv = [[0, 1], [3, 0]][rank]
    x = torch.arange(sum(send), dtype=torch.float32).add(10 * rank).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        y = all_to_all_single(torch.empty(sum(recv)), x, recv, send)
    (y * (rank + 1)).sum().backward()
    return y.tolist(), x.grad.tolist()


def test_torch_autograd_all_to_all_on_gloo_unequal_splits(pool2):
    (y0, g0), (y1, g1) = pool2.run(_torch_all_to_all_single_autograd)
    assert y0 == [10.0] and y1 == [0.0, 1.0, 2.0]
    assert g0 == [2.0, 2.0, 2.0] and g1 == [1.0]


def _no_grad(counts):
    import torch.distributed as dist

    x = torch.randn(counts[dist.get_rank()], 4)
    with torch.no_grad():
        bt = balance(x)
        out = bt.restore(bt.tokens + 1)
    torch.testing.assert_close(out, x + 1)
    # inputs without grad, weights with grad: only the way back is differentiable
    lin = torch.nn.Linear(4, 4)
    bt = balance(x)
    bt.restore(lin(bt.tokens)).sum().backward()
    return bt.num_tokens, lin.weight.grad.sum().item()


def test_no_grad_and_weight_only_grad(pool4):
    results = pool4.run(_no_grad, [9, 0, 2, 1])
    assert [m for m, _ in results] == [3, 3, 3, 3]


def test_balance_takes_known_counts_and_refuses_ones_that_do_not_match_its_rows():
    x = torch.randn(5, 3)
    assert balance(x, counts=(5,)).num_tokens == 5
    with pytest.raises(ValueError, match="rank 0 has 5 rows"):
        balance(x, counts=(4,))


def test_shed_tokens_is_what_the_most_loaded_rank_drops():
    assert shed_tokens([6, 2, 1, 3]) == 3  # targets 3, 3, 3, 3
    assert shed_tokens([5, 5, 3]) == 0  # targets 5, 4, 4: moving a token would not shorten the slowest rank
    assert shed_tokens([7, 7]) == 0 and shed_tokens([]) == 0


def _exchanges_at(min_tokens):
    import torch.distributed as dist

    n = [6, 2, 1, 3][dist.get_rank()]
    x = torch.randn(n, 8, requires_grad=True)
    bt = balance(x, min_tokens=min_tokens)
    out = bt.restore(bt.tokens * 2)
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    return bt.stats.tokens_moved, bt.num_tokens


def test_min_tokens_exchanges_only_when_the_most_loaded_rank_sheds_that_many(pool4):
    """Counts 6, 2, 1, 3: the most loaded rank sheds 3 tokens; every rank decides alike from the gathered counts."""
    assert pool4.run(_exchanges_at, 3) == [(3, 3)] * 4
    assert pool4.run(_exchanges_at, 4) == [(0, 6), (0, 2), (0, 1), (0, 3)]
    with pytest.raises(ValueError, match="min_tokens must be >= 0"):
        balance(torch.zeros(3, 2), min_tokens=-1)
