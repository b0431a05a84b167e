"""Checkpoints: exact resume, stop on a signal, resharding, atomic saves under SIGKILL, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import BASE, signal_at_step

CKPT = ["train.max_steps=20", "optimizer.warmup_steps=3", "checkpoint.keep=0"]


def _train(overrides, data, run_dir, stop_at=None):
    """Train (resuming per `resume`, default auto); rank 0 sends itself SIGUSR1 during step `stop_at`."""
    import torch.distributed as dist

    from skiptron.training.config import load_config
    from skiptron.training.metrics import read_metrics
    from skiptron.training.trainer import Trainer
    from skiptron.training.weights import full_state_dict

    cfg = load_config(None, BASE + CKPT + [f"data.path={data}", f"run.dir={run_dir}"] + overrides)
    trainer = Trainer.setup(cfg)
    start = trainer.progress.step
    gathers_start = trainer.extra_state["balancer_gathers"].state_dict()
    if stop_at:
        signal_at_step(trainer, stop_at)
    trainer.run()
    weights = full_state_dict(trainer.engine.module)
    dist.barrier()
    losses = {m["step"]: m["loss"] for m in read_metrics(run_dir)} if dist.get_rank() == 0 else None
    return {"losses": losses, "weights": weights, "start": start, "step": trainer.progress.step,
            "samples": trainer.progress.consumed_samples, "stopped_by": trainer.stopped_by,
            "gathers_start": gathers_start, "gathers_end": trainer.extra_state["balancer_gathers"].state_dict()}


def _same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("layout", [
    ["zero.stage=1"], ["zero.stage=3"], ["parallel.tp=2", "zero.stage=1"], ["parallel.tp=2", "zero.stage=3"],
    ["model.skip.enabled=true", "zero.stage=1"],
    ["model.block=srupp", "model.srupp.attention_every=2", "parallel.tp=2", "zero.stage=1"],
], ids=["dp2-z1", "dp2-z3", "tp2-z1", "tp2-z3", "routed-dp2-z1", "srupp-tp2-z1"])
def test_exact_resume_after_signal(pool2, tiny_data, tmp_path, layout):
    """20 steps == 10 steps, stopped by SIGUSR1 on one rank, + resume + 10 steps: bitwise equal losses and weights."""
    full = pool2.run(_train, layout, tiny_data, tmp_path / "full")
    first = pool2.run(_train, layout, tiny_data, tmp_path / "cut", stop_at=10)
    assert [r["stopped_by"] for r in first] == [signal.SIGUSR1] * 2 and first[0]["step"] == 10
    assert (tmp_path / "cut/checkpoints/latest").read_text() == "step00000010"
    second = pool2.run(_train, layout, tiny_data, tmp_path / "cut")
    assert second[0]["start"] == 10 and second[0]["step"] == 20
    assert second[0]["samples"] == 20 * 4  # data position: consumed samples of the global stream
    assert second[0]["losses"] == full[0]["losses"]  # steps 1..10 from the first run, 11..20 from the resumed one
    for rank in range(2):
        _same_weights(second[rank]["weights"], full[rank]["weights"])
        # the balancer's count gathers resume where they stood (even loads: off, where a fresh start gathers)
        assert second[rank]["gathers_start"] == first[rank]["gathers_end"], (second[rank], first[rank])
    if "model.skip.enabled=true" in layout:
        assert first[0]["gathers_end"] and not any(first[0]["gathers_end"].values()), first[0]["gathers_end"]


@pytest.mark.parametrize("before, after", [
    (["parallel.tp=2", "zero.stage=2"], ["parallel.tp=1", "zero.stage=1", "checkpoint.reshard_bucket_mb=1"]),
    (["zero.stage=2"], ["zero.stage=1", "checkpoint.reshard_bucket_mb=0"]),
    (["zero.stage=3"], ["parallel.tp=2", "zero.stage=0"]),
], ids=["tp2dp1-to-tp1dp2-read-ahead", "zero2-to-zero1-no-read-ahead", "zero3dp2-to-tp2zero0"])
def test_resume_under_another_layout(pool2, tiny_data, tmp_path, before, after):
    """A checkpoint resharded to a new layout continues the original trajectory (weights and Adam moments), read
    ahead in a background thread (a 1 MB bucket, smaller than the embedding), one parameter at a time in the caller
    (bucket 0) or as the host's cores decide (the default)."""
    full = pool2.run(_train, before, tiny_data, tmp_path / "full")
    pool2.run(_train, before, tiny_data, tmp_path / "cut", stop_at=10)
    resumed = pool2.run(_train, after, tiny_data, tmp_path / "cut")
    assert resumed[0]["start"] == 10
    ref, got = full[0]["losses"], resumed[0]["losses"]
    assert abs(got[11] - ref[11]) < 1e-5  # the next step's loss: the weights came over exactly
    torch.testing.assert_close(torch.tensor([got[s] for s in range(11, 21)]),
                               torch.tensor([ref[s] for s in range(11, 21)]), atol=1e-4, rtol=0)
    _same_weights(resumed[0]["weights"], full[0]["weights"], atol=1e-4)


# -- a finished run with several checkpoints, for the file-level tests ----------------------------------------------
def _router_offsets(overrides, data, run_dir, train=True):
    """Set up (resuming per `resume`) and train on this rank; the routers' controller offsets afterwards, by name."""
    import torch.distributed as dist

    from skiptron.training.config import load_config
    from skiptron.training.trainer import Trainer

    cfg = load_config(None, BASE + [f"data.path={data}", f"run.dir={run_dir}"] + overrides)
    trainer = Trainer.setup(cfg)
    if train:
        trainer.run()
    dist.barrier()
    return {n: b.clone() for n, b in trainer.engine.module.named_buffers() if n.endswith("router.offset")}


def test_weights_only_checkpoint_keeps_routing_controllers(pool2, tiny_data, tmp_path):
    """A weights-only checkpoint (what from-hf, compress and finetune merge write) carries the routers' controller
    offsets: a run started from it routes exactly as the trained model did."""
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.config import load_config
    from skiptron.training.masking import read_base_weights

    routed = ["model.skip.enabled=true", "model.skip.target_rate=0.3", "train.max_steps=6",
              "checkpoint.save_at_end=true"]
    trained = pool2.run(_router_offsets, routed, tiny_data, tmp_path / "run")[0]
    assert trained and all(v.abs().item() > 0 for v in trained.values())  # the controller moved them
    src = ckpt.find_resumable(tmp_path / "run/checkpoints", log=None)
    weights = read_base_weights(src)
    ckpt.write_weights_checkpoint(tmp_path / "weights", load_config(src / "config.yaml"), weights,
                                  ckpt.read_meta(src)["vocab_size"])
    loaded = pool2.run(_router_offsets, routed + [f"resume={tmp_path / 'weights'}"], tiny_data, tmp_path / "again",
                       train=False)[0]
    assert loaded.keys() == trained.keys()
    for name in trained:
        assert torch.equal(loaded[name], trained[name]), name


@pytest.fixture(scope="module")
def saved_run(pools, tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("saved")
    pools(2).run(_train, ["train.max_steps=6", "checkpoint.interval=2"], tiny_data, run)
    return run / "checkpoints"


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "checkpoints"
    shutil.copytree(src, dst)
    return dst


def test_layout_of_a_checkpoint(saved_run):
    from skiptron.training import checkpoint as ckpt

    assert [p.name for p in ckpt.list_checkpoints(saved_run)] == ["step00000006", "step00000004", "step00000002"]
    assert (saved_run / "latest").read_text() == "step00000006"
    path = saved_run / "step00000006"
    ckpt.verify(path)
    meta = ckpt.read_meta(path)
    assert meta["step"] == 6 and meta["consumed_samples"] == 24 and meta["layout"]["dp"] == 2
    assert meta["params"]["embedding.tokens.weight"]["vocab_padding"] == 320 - meta["vocab_size"]
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert {"rank00000.pt", "rank00001.pt", "trainer.json", "config.yaml", "tokenizer.json"} <= files.keys()
    assert not any(p.name.startswith(".tmp-") for p in saved_run.iterdir())


@pytest.mark.parametrize("damage", ["truncate", "missing", "flip"])
def test_auto_resume_skips_a_damaged_checkpoint(saved_run, tmp_path, damage):
    from skiptron.training import checkpoint as ckpt

    root = _copy(saved_run, tmp_path)
    victim = root / "step00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:1000])
    elif damage == "missing":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    messages = []
    assert ckpt.find_resumable(root, log=messages.append) == root / "step00000004"
    assert str(victim) in messages[0]
    with pytest.raises(ckpt.CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        ckpt.verify(root / "step00000006")


def test_resume_hashes_only_the_checkpoints_it_tries(saved_run, tmp_path, monkeypatch):
    """Choosing a checkpoint reads the manifests and sizes of all, but hashes only the newest (and, when the newest
    is corrupt, the next one): not every checkpoint retention kept."""
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.checkpoint import files

    root = _copy(saved_run, tmp_path)
    hashed = []
    real = files._sha256
    monkeypatch.setattr(files, "_sha256", lambda path, *a: hashed.append(path.parent.name) or real(path, *a))
    assert len(ckpt.list_checkpoints(root)) == 3
    assert ckpt.find_resumable(root, log=None) == root / "step00000006"
    assert set(hashed) == {"step00000006"}
    victim = root / "step00000006" / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    hashed.clear()
    assert ckpt.find_resumable(root, log=None) == root / "step00000004"
    assert set(hashed) == {"step00000006", "step00000004"}


def test_refuses_newer_format_and_other_models(saved_run, tmp_path, tiny_data):
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.config import load_config

    root = _copy(saved_run, tmp_path)
    path = root / "step00000006"
    meta = ckpt.read_meta(path)
    cfg = load_config(None, BASE + [f"data.path={tiny_data}", "model.hidden_size=128", "model.num_layers=3"])
    with pytest.raises(ckpt.CheckpointError, match=r"model.hidden_size: checkpoint 64, config 128.*model.num_layers"):
        ckpt.check_compatible(path, meta, cfg, meta["vocab_size"])
    (path / "trainer.json").write_text(json.dumps({**meta, "version": ckpt.FORMAT_VERSION + 1}))
    with pytest.raises(ckpt.CheckpointError, match=r"trainer.json has checkpoint format version 2"):
        ckpt.read_meta(path)


def test_checkpoint_argument_takes_a_run_dir_the_checkpoints_folder_or_latest(saved_run, tmp_path, capsys):
    """--checkpoint (and resume=, finetune.base=) name a checkpoint directly, through the `latest` file, by its
    checkpoints folder or by the run directory; the last two take the newest complete checkpoint."""
    from skiptron.tools.convert import main as convert
    from skiptron.training import checkpoint as ckpt

    run = saved_run.parent
    newest = saved_run / "step00000006"
    for form in (newest, saved_run / "latest", saved_run, run):
        assert ckpt.resolve_checkpoint(form) == newest, form
    assert ckpt.resolve_checkpoint(saved_run / "step00000002") == saved_run / "step00000002"
    root = _copy(saved_run, tmp_path / "run")
    (root.parent / "config.yaml").write_text((run / "config.yaml").read_text())
    victim = root / "step00000006" / "rank00001.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    messages = []
    assert ckpt.resolve_checkpoint(root.parent, log=messages.append) == root / "step00000004"
    assert str(victim) in messages[0]
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint under .*empty/checkpoints"):
        ckpt.resolve_checkpoint((tmp_path / "empty" / "checkpoints").mkdir(parents=True) or tmp_path / "empty")
    with pytest.raises(ckpt.CheckpointError, match="is a file"):
        ckpt.resolve_checkpoint(run / "config.yaml")
    # the command line: a run directory where today's tools wanted the step directory
    assert convert(["consolidate", "--checkpoint", str(run), "--out", str(tmp_path / "from_run.pt")]) == 0
    assert convert(["consolidate", "--checkpoint", str(newest), "--out", str(tmp_path / "direct.pt")]) == 0
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("from_run.pt", "direct.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert convert(["consolidate", "--checkpoint", str(root / "latest"), "--out", str(tmp_path / "x.pt")]) == 1
    assert f"{victim} has 100 bytes" in capsys.readouterr().err  # `latest` names step 6, whose file is truncated


class _RunsCode:
    """Pickles as a call of os.system: loading the file with plain torch.load would touch `target`."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def _plant(root: Path, name: str, target: Path) -> Path:
    """Replace step 6's file `name` by a pickle that would run code, with a manifest that agrees (size, sha256)."""
    import hashlib

    path = root / "step00000006"
    torch.save({"module": _RunsCode(target), "rng": _RunsCode(target)}, path / name)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"size": (path / name).stat().st_size,
                               "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _resume_error(overrides, data, run_dir):
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.config import load_config
    from skiptron.training.trainer import Trainer

    try:
        Trainer.setup(load_config(None, BASE + CKPT + [f"data.path={data}", f"run.dir={run_dir}"] + overrides))
    except ckpt.UntrustedCheckpointError as err:
        return str(err)
    return None


def test_a_checkpoint_file_that_would_run_code_is_refused(saved_run, pool2, tiny_data, tmp_path, capsys):
    """A pickle payload (os.system) in DeepSpeed's model states or in our rank file: skiptron-convert and a resume
    refuse it by name and nothing runs; --trust-checkpoint is the explicit way to load it anyway."""
    from skiptron.tools.convert import main as convert

    sentinel = tmp_path / "pwned"
    models = _plant(_copy(saved_run, tmp_path / "a"), "mp_rank_00_model_states.pt", sentinel)
    assert convert(["consolidate", "--checkpoint", str(models), "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    assert f"{models / 'mp_rank_00_model_states.pt'} holds pickled code references (posix.system)" in err, err
    assert "--trust-checkpoint" in err and not sentinel.exists()
    ranks = _plant(_copy(saved_run, tmp_path / "b"), "rank00001.pt", sentinel)
    for path, name in ((models, "mp_rank_00_model_states.pt"), (ranks, "rank00001.pt")):
        messages = pool2.run(_resume_error, [f"resume={path}"], tiny_data, tmp_path / "resumed")
        assert any(m and f"{path / name} holds pickled code references" in m for m in messages), messages
        assert not sentinel.exists()
    with pytest.raises(Exception):  # trusted: the payload runs, and the file is no checkpoint at all
        convert(["consolidate", "--checkpoint", str(models), "--out", str(tmp_path / "x.pt"), "--trust-checkpoint"])
    assert sentinel.exists()


def test_cli_resume_with_another_model_names_the_differing_keys(saved_run, tiny_data, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29719",
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "-m", "skiptron.tools.train", "--config", "tiny", *BASE,
                          f"data.path={tiny_data}", f"run.dir={run}", f"resume={saved_run.parent}",
                          "model.num_layers=3", "model.norm_eps=1e-6", "launch.health_check=false"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    line, = [line for line in out.stderr.splitlines() if "checkpoint error" in line]
    assert line.startswith(f"skiptron-train: checkpoint error: {saved_run / 'step00000006'} was saved from a "
                           f"different model; differing keys: "), line
    assert "model.norm_eps: checkpoint 1e-05, config 1e-06; model.num_layers: checkpoint 2, config 3" in line, line


def test_retention(saved_run, tmp_path):
    from skiptron.training import checkpoint as ckpt

    root = _copy(saved_run, tmp_path)
    removed = ckpt.apply_retention(root, keep=1, keep_every=4)
    assert [p.name for p in removed] == ["step00000002"]
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step00000006", "step00000004"]


def test_consolidate_agrees_with_deepspeed_zero_to_fp32(saved_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from skiptron.training import checkpoint as ckpt

    path = saved_run / "step00000006"
    weights, moments, step, _ = ckpt.read_full_state(path)
    reference = get_fp32_state_dict_from_zero_checkpoint(str(saved_run), tag=path.name)
    assert step == 6 and set(moments) == set(weights)
    for name, value in weights.items():
        assert torch.equal(value, reference[name].float()), name


# -- asynchronous saves ---------------------------------------------------------------------------------------------
def test_host_snapshot_is_a_copy_that_keeps_views_and_writes_the_same_file(tmp_path):
    """What an asynchronous save writes is the state at the snapshot: a later in-place change of the live state does
    not reach it, views of one storage stay views of one copy, and the file is byte for byte the synchronous one."""
    from skiptron.training.checkpoint.staging import HostStaging, nonfinite_entries

    flat = torch.arange(12, dtype=torch.float32)
    weight = torch.nn.Parameter(torch.randn(3, 4))
    state = {"flat": flat, "views": [flat[:6].view(2, 3), flat[6:]], "weight": weight, "step": 7,
             "scaler": {"scale": 2.0}, "half": torch.ones(3, dtype=torch.bfloat16)}
    (tmp_path / "live").mkdir()
    (tmp_path / "snap").mkdir()
    torch.save(state, tmp_path / "live/s.pt")
    snap = HostStaging().snapshot(state)
    with torch.no_grad():
        flat.add_(100)
        weight.mul_(0)
    state["scaler"]["scale"] = 4.0
    torch.save(snap, tmp_path / "snap/s.pt")
    assert (tmp_path / "snap/s.pt").read_bytes() == (tmp_path / "live/s.pt").read_bytes()
    loaded = torch.load(tmp_path / "snap/s.pt")
    assert loaded["views"][1].untyped_storage().data_ptr() == loaded["flat"].untyped_storage().data_ptr()
    assert isinstance(loaded["weight"], torch.nn.Parameter) and loaded["scaler"]["scale"] == 2.0
    assert nonfinite_entries({"a": {"b": torch.tensor([1.0, float("nan")])}, "c": [torch.ones(2)],
                              "d": torch.tensor([1, 2])}, "f.pt") == ["f.pt:a/b"]


ASYNC = ["checkpoint.async_save=true"]


def test_async_save_taken_mid_run_resumes_exactly(pool2, tiny_data, tmp_path):
    """Asynchronous saves at steps 5, 10, 15 while training goes on (ZeRO-3, DP=2): resuming from step 10 continues
    bitwise as the uninterrupted run did, and every checkpoint is complete and verified."""
    from skiptron.training import checkpoint as ckpt

    layout = ["zero.stage=3", "checkpoint.interval=5"]
    full = pool2.run(_train, layout + ASYNC, tiny_data, tmp_path / "full")
    root = tmp_path / "full/checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step00000020", "step00000015", "step00000010",
                                                            "step00000005"]
    for path in ckpt.list_checkpoints(root):
        ckpt.verify(path)
    resumed = pool2.run(_train, layout + [f"resume={root / 'step00000010'}"], tiny_data, tmp_path / "resumed")
    assert resumed[0]["start"] == 10
    assert {s: resumed[0]["losses"][s] for s in range(11, 21)} == {s: full[0]["losses"][s] for s in range(11, 21)}
    for rank in range(2):
        _same_weights(resumed[rank]["weights"], full[rank]["weights"])


# -- SIGKILL at any moment of a save ------------------------------------------------------------------------------
CHILD = r"""
import os, resource, signal, sys
from pathlib import Path
from skiptron.training import checkpoint as ckpt
from skiptron.training.config import load_config
from skiptron.training.trainer import Trainer

phase, overrides = sys.argv[1], sys.argv[2:]
# let the save of step 2 finish, die inside the save of step 4
target = {"rank-file": "_torch_save", "manifest": "_write_manifest", "publish": "_publish",
          "retention": "apply_retention", "disk-full": "save"}[phase]
owner = ckpt if target == "save" else ckpt.store  # where the trainer, and save(), look the name up
real = getattr(owner, target)

def saving(args):  # the step being saved, from what is written (an async save writes while the trainer steps on)
    if target == "save":
        return trainer.progress.step
    if target == "apply_retention":  # after the publish of the step it follows
        return 4 if (Path(args[0]) / "step00000004").is_dir() else 2
    return 4 if "step00000004" in str(args[1] if target == "_torch_save" else args[0]) else 2

def wrapper(*args, **kwargs):
    if saving(args) == 4:
        if phase == "disk-full":  # the disk fills up between two saves: writes past 64 KiB fail (the shards of
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # step 4, not DeepSpeed's 38 KiB recovery script)
            resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
            return real(*args, **kwargs)
        if phase == "rank-file":  # a torn file: partly written, then killed
            with open(args[1], "wb") as f:
                f.write(b"partial")
        elif phase == "publish":  # the directory renamed, `latest` not yet updated
            real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

setattr(owner, target, wrapper)
trainer = Trainer.setup(load_config(None, overrides))
trainer.run()
"""


@pytest.mark.parametrize("mode", [[], ASYNC], ids=["sync", "async"])
def test_sigkill_during_save_keeps_previous_checkpoint(pools, tiny_data, tmp_path, mode):
    """SIGKILL in each phase of the save of step 4 (for an asynchronous save: on its background thread, while the run
    waits for it at the end): `latest` names a complete checkpoint, and resume continues from it."""
    from skiptron.training import checkpoint as ckpt

    phases = ["rank-file", "manifest", "publish", "retention"]
    procs = {}
    for i, phase in enumerate(phases):
        run = tmp_path / phase
        env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(29710 + i + 5 * bool(mode)), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        args = BASE + ["train.max_steps=4", "checkpoint.interval=2", "checkpoint.keep=1",
                       f"data.path={tiny_data}", f"run.dir={run}"] + mode
        procs[phase] = subprocess.Popen([sys.executable, "-c", CHILD, phase, *args], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for phase, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == -signal.SIGKILL, f"{phase}: rc {proc.returncode}\n{out[-3000:]}"
        root = tmp_path / phase / "checkpoints"
        latest = (root / "latest").read_text()
        ckpt.verify(root / latest)  # the `latest` pointer always names a complete checkpoint
        found = ckpt.find_resumable(root, log=None)
        expected = "step00000004" if phase in ("publish", "retention") else "step00000002"
        assert found.name == expected, phase
        weights, _, step, _ = ckpt.read_full_state(found)
        assert step == int(expected[4:]) and all(torch.isfinite(w).all() for w in weights.values())
    # and a real resume from one of them continues
    res = pools(1).run(_train, ["train.max_steps=4", "checkpoint.interval=2"], tiny_data, tmp_path / "manifest")
    assert res[0]["start"] == 2 and res[0]["step"] == 4
    # one history: the killed attempt's steps 3-4 (past the checkpoint it resumed from) were superseded
    steps = [json.loads(line)["step"] for line in (tmp_path / "manifest" / "metrics.jsonl").read_text().splitlines()]
    superseded = (tmp_path / "manifest" / "metrics-superseded.jsonl").read_text().splitlines()
    assert steps == [1, 2, 3, 4] and [json.loads(line)["step"] for line in superseded] == [3, 4]


@pytest.mark.parametrize("mode", [[], ASYNC], ids=["sync", "async"])
def test_disk_full_during_save_names_the_file_and_keeps_previous_checkpoint(tiny_data, tmp_path, mode):
    """A write that fails mid-save (here: RLIMIT_FSIZE, as a full disk would) stops the run with an error naming the
    file; nothing of the failed save is published and the previous checkpoint stays `latest` and loadable. An
    asynchronous save's failure is raised where the run waits for it (here: at the end)."""
    from skiptron.training import checkpoint as ckpt

    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29720 + bool(mode)), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    args = BASE + ["train.max_steps=4", "checkpoint.interval=2", "checkpoint.keep=1", f"data.path={tiny_data}",
                   f"run.dir={tmp_path}"] + mode
    proc = subprocess.run([sys.executable, "-c", CHILD, "disk-full", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    root = tmp_path / "checkpoints"
    assert f"CheckpointError: could not write {root}/.tmp-step00000004/" in out, out[-3000:]
    assert (root / "latest").read_text() == "step00000002"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step00000002"]
    ckpt.verify(root / "step00000002")
    assert ckpt.find_resumable(root, log=None).name == "step00000002"


@pytest.mark.parametrize("mode", [[], ASYNC], ids=["sync", "async"])
def test_cli_exits_with_distinct_code_on_sigterm(tiny_data, tmp_path, mode):
    """SIGTERM to one torchrun worker: both save the same step and exit with EXIT_PREEMPTED (an asynchronous save,
    with saves every 2 steps in flight, is published before they exit)."""
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.signals import EXIT_PREEMPTED

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(29633 + bool(mode)), "-m", "skiptron.tools.train", "--config", "tiny", *BASE, f"data.path={tiny_data}",
           f"run.dir={run}", "train.max_steps=100000", "logging.print_every=1",
           *(mode + ["checkpoint.interval=2"] if mode else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    import time

    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[-1]), signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and f"exitcode  : {EXIT_PREEMPTED}" in out, out[-3000:]
    found = ckpt.find_resumable(run / "checkpoints", log=None)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert found.name == f"step{steps[-1]:08d}" and (run / "checkpoints/latest").read_text() == found.name


# -- pipeline-parallel checkpoints ----------------------------------------------------------------------------------
def _weights_after_resume(overrides, data, ckpt_dir):
    """Whole weights right after resuming from `ckpt_dir` (no step taken)."""
    from skiptron.training.config import load_config
    from skiptron.training.trainer import Trainer
    from skiptron.training.weights import full_state_dict

    trainer = Trainer.setup(load_config(None, BASE + [f"data.path={data}", f"resume={ckpt_dir}"] + overrides))
    return full_state_dict(trainer.engine.module)


def test_pipeline_checkpoint_converts_and_loads(pools, tiny_data, tmp_path):
    """A (2,2,1) ZeRO-0 checkpoint (DeepSpeed's per-layer files, optimizer state in the per-stage model files):
    `consolidate` gives the trained weights bitwise, with Adam moments for every parameter; `to-hf` exports it;
    `from-hf --tp 2 --pp 2` brings that back as a checkpoint that loads under (1,2,2) with the same weights."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from skiptron.tools.convert import main
    from skiptron.training import checkpoint as ckpt

    layout = ["parallel.tp=2", "parallel.pp=2", "zero.stage=0", "train.micro_batch_size=1"]
    run = pools(4).run(_train, layout + ["train.max_steps=3", "checkpoint.save_at_end=true"], tiny_data,
                       tmp_path / "run")[0]
    path = tmp_path / "run/checkpoints/step00000003"
    weights = run["weights"]
    assert ckpt.read_meta(path)["params"].keys() == weights.keys()  # GPT's names, gathered from both stages
    full, moments, step, _ = ckpt.read_full_state(path)
    assert step == 3 and moments.keys() == weights.keys()
    assert all(m["exp_avg_sq"].abs().sum() > 0 for m in moments.values())
    assert main(["consolidate", "--checkpoint", str(path), "--out", str(tmp_path / "full.pt")]) == 0
    consolidated = torch.load(tmp_path / "full.pt")
    _same_weights(consolidated, weights)
    _same_weights(full, weights)

    hf = tmp_path / "hf"
    assert main(["to-hf", "--checkpoint", str(path), "--out", str(hf)]) == 0
    exported, vocab = load_file(str(hf / "model.safetensors")), ckpt.read_meta(path)["vocab_size"]
    assert torch.equal(exported["model.embed_tokens.weight"], weights["embedding.tokens.weight"][:vocab])
    v = weights["blocks.1.attn.qkv.weight"].chunk(3)[2]  # blocks.1 lives on the second stage
    assert torch.equal(exported["model.layers.1.self_attn.v_proj.weight"], v)
    assert type(transformers.AutoModelForCausalLM.from_pretrained(hf)).__name__ == "LlamaForCausalLM"

    back = tmp_path / "from-hf"
    assert main(["from-hf", "--hf", str(hf), "--out", str(back), "--tp", "2", "--pp", "2",
                 "--vocab-multiple", "64"]) == 0
    loaded = pools(4).run(_weights_after_resume, ["parallel.pp=2", "train.micro_batch_size=1"], tiny_data, back)[0]
    assert loaded.keys() == weights.keys()
    for name, value in weights.items():
        rows = vocab if name == "embedding.tokens.weight" else None  # from-hf pads the vocabulary with zeros
        assert torch.equal(loaded[name][:rows], value[:rows]), name


def test_released_file_pages_leave_the_rss_and_allocated_memory_alone(tmp_path):
    """What resharding does after reading each shard: the pages of a memory-mapped checkpoint file leave the RSS and
    are read again from the file when touched; memory that is not a file mapping is never released."""
    from skiptron.training.memory import _status_bytes, release_file_pages

    t = torch.randn(2 * 2**20)  # 8 MiB
    torch.save({"t": t}, tmp_path / "f.pt")
    mapped = torch.load(tmp_path / "f.pt", mmap=True)["t"]
    before = _status_bytes("RssFile")
    assert torch.equal(mapped, t)  # every page touched
    touched = _status_bytes("RssFile")
    released = release_file_pages([mapped])
    assert touched - before > 6 * 2**20 and released > 7 * 2**20, (before, touched, released)
    assert touched - _status_bytes("RssFile") > 6 * 2**20
    assert torch.equal(mapped, t)
    own = t.clone()
    assert release_file_pages([own]) == 0 and torch.equal(own, t)


def test_resharding_streams_one_parameter_at_a_time(pool2, tiny_data, tmp_path):
    """Reading a TP=2 checkpoint for another layout holds one parameter's whole weight and moments at a time (and
    the shard cut from them), not the model: measured on what the resharding code allocates (the files are
    memory-mapped, so only the tensors it assembles count), on an 8-layer model whose largest parameter is a small
    part of its state."""
    from skiptron.parallel.tensor_parallel import split_tp
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.memory import AllocationMeter

    run = ["parallel.tp=2", "zero.stage=1", "model.num_layers=8", "train.max_steps=2", "checkpoint.save_at_end=true"]
    pool2.run(_train, run, tiny_data, tmp_path / "run")
    path = tmp_path / "run/checkpoints/step00000002"
    params = ckpt.read_meta(path)["params"]
    sizes = {name: 4 * torch.Size(info["shape"]).numel() for name, info in params.items()}
    whole_state = 3 * sum(sizes.values())  # fp32 weights + two Adam moments
    with AllocationMeter() as meter:
        weights, moments, step, _ = ckpt.read_full_state(path)
        for name in list(weights):  # as apply_full_state goes: the weight's shard, then the moments'
            info = params[name]
            for value in [weights.pop(name), *moments[name].values()]:
                if info["partition_dim"] is not None:
                    split_tp(value, info["partition_dim"], info["stride"], 2, 1)
                del value
    assert step == 2 and len(moments) == len(params)
    largest = max(sizes.values())
    assert meter.largest <= largest
    assert meter.peak <= 4 * largest, (meter.peak, largest)  # weight + 2 moments + one shard or join in flight
    assert meter.peak < whole_state / 4, (meter.peak, whole_state)
