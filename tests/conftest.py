import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from distributed import DistPool  # noqa: E402


@pytest.fixture(scope="session")
def pools():
    """Lazily created process pools by world size, shared by the whole session."""
    created: dict[int, DistPool] = {}

    def get(world_size: int) -> DistPool:
        if world_size not in created:
            created[world_size] = DistPool(world_size)
        return created[world_size]

    yield get
    for pool in created.values():
        pool.close(force=not pool.healthy)


@pytest.fixture
def pool2(pools):
    return pools(2)


@pytest.fixture
def pool4(pools):
    return pools(4)
