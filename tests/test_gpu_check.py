"""skiptron-gpu-check: the CPU rehearsal (`--device cpu --quick`) passes, and failures are named in the exit."""
import json
import os
import subprocess
import sys


def test_gpu_check_cpu_quick_passes(tmp_path):
    """Every check runs through its real entry point at toy size (trainer, benchmarks, converter, torchrun)."""
    out = tmp_path / "check"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "skiptron.tools.gpu_check", "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert {r["status"] for r in rows.values()} <= {"ok", "skip"}
    ran = {name for name, r in rows.items() if r["status"] == "ok"}
    assert {"dense tiny", "routed tiny", "srupp kernel", "resume", "reshard bf16", "hf export", "sdpa",
            "world dp2 balanced"} <= ran, rows.keys()
    assert set(rows["routed tiny"]["numbers"]["ratio_vs_dense"]) == {
        "dense", "routed kv=all", "routed kv=active", "routed threshold kv=all", "routed threshold kv=active"}
    routed = rows["routed tiny"]["numbers"]
    for name, (low, high) in routed["overhead_vs_flops_median_of_rounds_95"].items():
        rounds = routed["overhead_vs_flops_per_round"][name]
        assert 0 < low <= high and len(rounds) == 1 and low == high == rounds[0], name  # --quick: one round
    assert rows["sdpa"]["numbers"]["kernels"]["dense"]  # the dense path always runs an SDPA kernel
    reads = rows["host reads"]["numbers"]
    assert reads["dense"]["reads"] == [] and all(len(v["reads"]) == v["routed_layers"] > 0
                                                 for n, v in reads.items() if n != "dense"), reads
    assert {"vs llama", "decode", "fused loss", "capacity top-k", "host reads"} <= ran and rows["vs llama compiled"]["status"] == "skip"
    loss = rows["fused loss"]["numbers"]
    assert 0 < loss["fused_peak_bytes"] < loss["whole_peak_bytes"]
    assert rows["vs llama"]["numbers"]["skiptron"]["step_peak_bytes"] > 0
    low, high = rows["vs llama"]["numbers"]["ratio_llama_median_of_rounds_95"]
    assert 0 < low <= rows["vs llama"]["numbers"]["ratio_llama_median_of_rounds"] <= high
    for batch in ("batch1", "batch8"):
        assert set(rows["decode"]["numbers"][batch]["tokens_per_s"]) == {
            "dense", "routed sigmoid kv=all", "routed sigmoid kv=active", "routed gumbel", "mod (every 2nd layer)"}
    assert "all checks passed" in done.stdout


def test_summary_names_the_failures():
    from skiptron.tools.gpu_check import Row, summarize

    table, code = summarize([Row("dense 125m", "ok", "fine"), Row("resume", "FAIL", "losses DIFFER"),
                             Row("pp2", "skip", "one device")])
    assert code == 1 and table.splitlines()[-1] == "FAILED: resume"
    assert summarize([Row("sdpa", "ok")])[1] == 0
