"""checkpoint/read_ahead.py: the background reader resharding uses keeps to its byte budget, keeps the order and
hands errors to the caller."""
import threading
import time
import weakref

import pytest
import torch

from skiptron.training.checkpoint.read_ahead import read_ahead

KIB = 1024


class _Tracked:
    """Loads item i as a tensor of sizes[i] bytes filled with i, and counts the bytes of loaded tensors alive."""

    def __init__(self, sizes, fail_at=None):
        self.sizes, self.fail_at = sizes, fail_at
        self.alive = self.peak = 0
        self.lock = threading.Lock()
        self.threads = set()

    def _freed(self, size):
        with self.lock:
            self.alive -= size

    def load(self, i):
        self.threads.add(threading.current_thread().name)
        if i == self.fail_at:
            raise OSError(f"shard {i} unreadable")
        size = self.sizes[i]
        tensor = torch.full((size // 4,), float(i))
        with self.lock:
            self.alive += size
            self.peak = max(self.peak, self.alive)
        weakref.finalize(tensor, self._freed, size)
        return tensor


def _consume(values, sleep_s=0.03):
    seen = []
    for value in values:
        time.sleep(sleep_s)  # the caller's work on one item: the reader runs ahead meanwhile
        seen.append(int(value[0]))
        del value
    return seen


def test_read_ahead_fills_its_bucket_and_never_more():
    sizes = [4 * KIB] * 4 + [16 * KIB] + [4 * KIB] * 4  # one item larger than the bucket
    bucket = 12 * KIB
    tracked = _Tracked(sizes)
    items = list(range(len(sizes)))
    assert _consume(read_ahead(items, tracked.load, lambda i: sizes[i], bucket)) == items
    assert tracked.threads == {"skiptron-read-ahead"}
    # bound: max(bucket, largest) waiting + the one the caller holds
    assert tracked.peak <= max(bucket, max(sizes)) + max(sizes), tracked.peak
    assert tracked.peak >= bucket + 4 * KIB, tracked.peak  # it did read ahead, up to the bucket
    assert tracked.alive == 0


def test_bucket_zero_loads_each_item_when_taken_in_the_callers_thread():
    sizes = [4 * KIB] * 5
    tracked = _Tracked(sizes)
    assert _consume(read_ahead(range(5), tracked.load, lambda i: sizes[i], 0), sleep_s=0) == list(range(5))
    assert tracked.threads == {threading.current_thread().name} and tracked.peak == 4 * KIB


def test_a_failed_read_reaches_the_caller_and_an_abandoned_one_stops_the_reader():
    sizes = [4 * KIB] * 8
    tracked = _Tracked(sizes, fail_at=5)
    seen = []
    with pytest.raises(OSError, match="shard 5 unreadable"):
        for value in read_ahead(range(8), tracked.load, lambda i: sizes[i], 64 * KIB):
            seen.append(int(value[0]))
    assert seen == [0, 1, 2, 3, 4]
    values = read_ahead(range(8), _Tracked(sizes).load, lambda i: sizes[i], 8 * KIB)
    assert int(next(values)[0]) == 0
    values.close()  # the caller stops early (an error while applying a parameter)
    assert not [t for t in threading.enumerate() if t.name == "skiptron-read-ahead"]
