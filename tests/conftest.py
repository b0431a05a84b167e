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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small byte-tokenized corpus: a few standard-library modules."""
    import sysconfig
    from pathlib import Path

    from skiptron.training.shards import prepare

    src = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["textwrap.py", "string.py", "colorsys.py", "bisect.py", "shlex.py", "fnmatch.py", "glob.py"]:
        (src / f"{name}.txt").write_text((stdlib / name).read_text())
    out = tmp_path_factory.mktemp("data")
    prepare(out, inputs=[src], tokenizer="bytes", seq_len=32, samples_per_shard=256, val_fraction=0.15)
    return out
