"""`skiptron-study isoflop`: does skipping pay? Dense and routed models trained to equal training FLOPs.

    skiptron-study isoflop --dir runs/study --data data/stdlib-v1024 --budgets 1e12,3e12,1e13 [--seeds 2]
                           [--parallel K] [--router NAME="key=value ..."] [--extra-dense 1x32,...]
                           [--dry-run | --measure N | --slurm]
                           [common overrides ...]
    skiptron-study report --dir runs/study

For each training-FLOP budget C the plan takes the dense shapes of `--family` (depth x width) around the budget's
compute-optimal one (the shape whose tokens C / FLOPs-per-token come closest to `--tokens-per-param` x its
non-embedding parameters), and for each `--router` a routed model of the optimum's width with as many more layers as
keep its FLOPs per token equal to the optimum's (the papers' comparison: more parameters at equal compute). Each arm
x seed trains as its own `skiptron-train` run (its own run.dir under --dir/runs, warmup + cosine over its own steps,
steps = C / (FLOPs per token x tokens per step); FLOPs from training/flops.py with routed layers at their rate and
the routers counted). Capacity-mode routers execute exactly their rate; threshold-mode ones are planned at their
target and the table reports the compute the measured rates actually used. Arms are config overrides, so a new
router is a new `--router`, and rerunning the same command with one more `--router` extends a study.

Resume: a rerun of the same command skips the arms whose result is in their run directory, resumes the
half-finished ones from their newest checkpoint (`resume=auto`) and starts the rest. --slurm writes the arms as a
sweep file for launch/slurm/study.sbatch (one array task per arm) and prints the sbatch commands instead of training.
The table (markdown, CSV, JSON) and the isoFLOP PNG are rewritten from whatever results exist after every arm.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from skiptron.training import verbosity
from skiptron.training.config import ConfigError, load_config

DEFAULT_FAMILY = "1x64,2x64,3x64,4x64,4x96,6x96,6x128,8x128,8x192,12x192"
DEFAULT_ROUTERS = (
    ("mod-c0.125",
     "model.skip.enabled=true model.skip.mode=capacity model.skip.layers=every:2 model.skip.target_rate=0.125 "
     "model.skip.kv=active"),
    ("skip-c0.5",
     "model.skip.enabled=true model.skip.mode=capacity model.skip.layers=all model.skip.target_rate=0.5 "
     "model.skip.kv=all"),
)
RESULT_FILE = "result.json"
ARM_FILE = "arm.json"
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        depth, sep, width = text.strip().partition("x")
        if not sep or not depth.isdigit() or not width.isdigit():
            raise argparse.ArgumentTypeError(f"--family: '{text}' is not DEPTHxWIDTH (e.g. 4x128)")
        return cls(int(depth), int(width))


@dataclass
class Arm:
    """One training run of the study: a model at a budget and a seed, as config overrides."""

    budget: float
    name: str
    kind: str  # dense | routed
    layers: int
    hidden: int
    seed: int
    overrides: list[str]
    params: int
    non_embedding_params: int
    flops_per_token: float
    tokens_per_step: int
    steps: int
    warmup: int

    @property
    def run_name(self) -> str:
        return f"{budget_label(self.budget)}-{self.name}-s{self.seed}"

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


def budget_label(budget: float) -> str:
    """1e13, 3e12: how budgets are written in names, tables and the plot."""
    mantissa, exponent = f"{budget:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _router(text: str) -> tuple[str, str]:
    name, sep, overrides = text.partition("=")
    if not sep or not name or "/" in name or not overrides.strip():
        raise argparse.ArgumentTypeError(f"--router {text!r}: expected NAME=\"key=value ...\"")
    return name, overrides


def _budgets(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets {text!r}: expected FLOPs like 1e12,3e12,1e13") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"--budgets {text!r}: needs positive FLOP counts")
    return values


# -- planning ------------------------------------------------------------------------------------------------------
class Planner:
    """Turns budgets, a family of shapes and routers into arms; model sizes come from the config and the real model."""

    def __init__(self, args):
        self.args = args
        self.common = [f"data.path={args.data}", f"model.seq_len={args.seq_len}",
                       f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.batch}",
                       *args.overrides]
        base = load_config(args.config, self.common)
        self.vocab = base.model.vocab_size or _data_vocab(args.data)
        self.padded_vocab = base.model.padded_vocab_size(self.vocab)
        self.tokens_per_step = args.batch * args.seq_len
        self._sizes: dict[tuple, tuple[int, int, float]] = {}

    def shape_overrides(self, shape: Shape) -> list[str]:
        if shape.hidden % self.args.head_dim:
            raise ConfigError(f"--family: width {shape.hidden} is not a multiple of --head-dim {self.args.head_dim}")
        return [f"model.num_layers={shape.layers}", f"model.hidden_size={shape.hidden}",
                f"model.num_heads={shape.hidden // self.args.head_dim}"]

    def size(self, overrides: list[str]) -> tuple[int, int, float]:
        """(parameters, non-embedding parameters, training FLOPs per token) of a model's overrides."""
        key = tuple(overrides)
        if key not in self._sizes:
            from skiptron.tools.bench_quality import parameter_count

            os.environ.setdefault("SKIPTRON_BENCH_PORT", str(_free_port()))  # studies side by side
            from skiptron.training.flops import config_flops_per_token

            cfg = load_config(self.args.config, self.common + overrides)
            params = parameter_count(self.args.config, self.common + overrides, self.vocab)
            embedding = self.padded_vocab * (cfg.model.embedding_rank or cfg.model.hidden_size)
            if not cfg.model.tie_embeddings:
                embedding *= 2
            self._sizes[key] = (params, params - embedding, config_flops_per_token(cfg.model, self.padded_vocab))
        return self._sizes[key]

    def optimum(self, budget: float, family: list[Shape]) -> int:
        """Index of the family's shape whose tokens per non-embedding parameter at this budget is nearest the target."""
        def distance(shape: Shape) -> float:
            _, non_embedding, flops = self.size(self.shape_overrides(shape))
            return abs(math.log(budget / flops / non_embedding / self.args.tokens_per_param))
        return min(range(len(family)), key=lambda i: distance(family[i]))

    def routed_depth(self, width: int, router: list[str], target_flops: float, min_layers: int) -> int:
        """The depth at which a routed model of this width has the FLOPs per token closest to the dense target."""
        best, best_gap = min_layers, math.inf
        for layers in range(min_layers, 8 * min_layers + 1):
            try:
                _, _, flops = self.size(self.shape_overrides(Shape(layers, width)) + router)
            except ConfigError:  # e.g. every:K routes none of too few layers
                continue
            gap = abs(flops - target_flops)
            if gap < best_gap:
                best, best_gap = layers, gap
            if flops > target_flops:
                break
        return best

    def arms(self) -> list[Arm]:
        args, family = self.args, sorted(self.args.family, key=lambda s: self.size(self.shape_overrides(s))[0])
        models: list[tuple[float, str, str, Shape, list[str]]] = []
        for budget in args.budgets:
            opt = self.optimum(budget, family)
            low = max(0, min(opt - args.dense_arms // 2, len(family) - args.dense_arms))
            outside = [s for s in args.extra_dense if s not in family[low:low + args.dense_arms]]
            for shape in family[low:low + args.dense_arms] + outside:
                models.append((budget, f"dense-{shape.layers}x{shape.hidden}", "dense", shape, []))
            _, _, dense_flops = self.size(self.shape_overrides(family[opt]))
            for name, router in args.router:
                router = router.split()
                depth = self.routed_depth(family[opt].hidden, router, dense_flops, family[opt].layers)
                shape = Shape(depth, family[opt].hidden)
                models.append((budget, f"{name}-{depth}x{shape.hidden}", "routed", shape, router))
        arms = []
        for seed in range(args.seeds):  # every arm's first seed before any second one: a stopped study has a table
            for budget, name, kind, shape, extra in models:
                model = self.shape_overrides(shape) + extra
                params, non_embedding, flops = self.size(model)
                steps = max(1, round(budget / (flops * self.tokens_per_step)))
                arms.append(Arm(budget, name, kind, shape.layers, shape.hidden, args.seed + seed, model, params,
                                non_embedding, flops, self.tokens_per_step, steps,
                                max(1, round(args.warmup_fraction * steps))))
        return arms

    def train_overrides(self, arm: Arm, run_dir: Path) -> list[str]:
        """Everything `skiptron-train` is given for an arm (on top of --config)."""
        interval = max(1, math.ceil(arm.steps / self.args.checkpoints)) if self.args.checkpoints else 0
        return [*self.common, *arm.overrides, f"train.max_steps={arm.steps}", f"train.seed={arm.seed}",
                f"optimizer.lr={self.args.lr}", f"optimizer.min_lr={self.args.lr * self.args.min_lr_ratio}",
                f"optimizer.warmup_steps={arm.warmup}", "eval.interval=0", f"eval.batches={self.args.eval_batches}",
                f"checkpoint.interval={interval}", "checkpoint.save_at_end=false", "logging.tensorboard=false",
                "logging.progress=plain", f"logging.print_every={max(1, arm.steps // 10)}", "resume=auto",
                f"run.dir={run_dir}"]


def _data_vocab(data: str) -> int:
    manifest = Path(data) / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"data.path: no manifest.json in {data} (prepare it with `skiptron-data prepare`)")
    return json.loads(manifest.read_text())["vocab_size"]


# -- results -------------------------------------------------------------------------------------------------------
def arm_result(arm: Arm, run_dir: Path, config: str, padded_vocab: int) -> dict | None:
    """The finished arm's result from its run directory (result.json, else a complete metrics.jsonl), None if it
    has not finished. Compute actually spent is summed from the per-step measured execution rates."""
    cached = run_dir / RESULT_FILE
    if cached.is_file():
        return json.loads(cached.read_text())
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    from skiptron.training.flops import config_flops_per_token
    from skiptron.training.metrics import read_metrics

    records = {r["step"]: r for r in read_metrics(run_dir) if "step" in r and "loss" in r}
    last = records.get(arm.steps)
    if last is None or last.get("val_loss") is None or len(records) < arm.steps:
        return None
    model = load_config(run_dir / "config.yaml").model
    spent, rates = 0.0, []
    for step in range(1, arm.steps + 1):
        layer_rates = {int(k.rsplit("/L", 1)[1]): v for k, v in records[step].items() if k.startswith("skip/rate/L")}
        spent += config_flops_per_token(model, padded_vocab, layer_rates) * arm.tokens_per_step
        if layer_rates:
            rates.append(sum(layer_rates.values()) / len(layer_rates))
    result = {"run": arm.run_name, "val_loss": last["val_loss"], "final_train_loss": last["loss"],
              "flops_spent": spent, "flops_per_token_measured": spent / arm.tokens,
              "exec_rate": statistics.fmean(rates) if rates else 1.0,
              "train_time_s": sum(records[s].get("step_time_s", 0.0) for s in range(1, arm.steps + 1))}
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(cached)
    return result


def summarize(arms: list[Arm], results: dict[str, dict]) -> list[dict]:
    """One row per (budget, arm) over its finished seeds: val loss mean and sample standard deviation."""
    rows: dict[tuple, dict] = {}
    for arm in arms:
        row = rows.setdefault((arm.budget, arm.name), {
            "budget": arm.budget, "arm": arm.name, "kind": arm.kind, "layers": arm.layers, "hidden": arm.hidden,
            "params": arm.params, "non_embedding_params": arm.non_embedding_params,
            "flops_per_token": arm.flops_per_token, "tokens": arm.tokens, "steps": arm.steps, "losses": [],
            "spent": [], "seeds_planned": 0, "val_loss_by_seed": {}})
        row["seeds_planned"] += 1
        if arm.run_name in results:
            row["losses"].append(results[arm.run_name]["val_loss"])
            row["val_loss_by_seed"][str(arm.seed)] = results[arm.run_name]["val_loss"]
            row["spent"].append(results[arm.run_name]["flops_spent"])
    out = []
    for row in rows.values():
        losses = row.pop("losses")
        spent = row.pop("spent")
        row["seeds_done"] = len(losses)
        row["val_loss_mean"] = statistics.fmean(losses) if losses else None
        row["val_loss_std"] = statistics.stdev(losses) if len(losses) > 1 else None
        row["val_losses"] = losses
        row["flops_spent_ratio"] = statistics.fmean(spent) / row["budget"] if spent else None
        out.append(row)
    return sorted(out, key=lambda r: (r["budget"], r["kind"] != "dense", r["params"]))


def gaps(rows: list[dict]) -> list[dict]:
    """Routed minus best dense (lowest mean val loss) per budget. Two spreads: unpaired, the std of the difference of
    the two means (sqrt(std_r^2 + std_d^2)); paired, the mean and std of the per-seed differences (a seed fixes the
    data order, which both arms share, so most of the seed-to-seed variation cancels)."""
    out = []
    for budget in sorted({r["budget"] for r in rows}):
        here = [r for r in rows if r["budget"] == budget and r["val_loss_mean"] is not None]
        dense = [r for r in here if r["kind"] == "dense"]
        if not dense:
            continue
        best = min(dense, key=lambda r: r["val_loss_mean"])
        for r in here:
            if r["kind"] != "routed":
                continue
            spread = math.sqrt((r["val_loss_std"] or 0.0) ** 2 + (best["val_loss_std"] or 0.0) ** 2)
            seeds = sorted(set(r["val_loss_by_seed"]) & set(best["val_loss_by_seed"]))
            paired = [r["val_loss_by_seed"][s] - best["val_loss_by_seed"][s] for s in seeds]
            out.append({"budget": budget, "routed": r["arm"], "best_dense": best["arm"],
                        "gap": r["val_loss_mean"] - best["val_loss_mean"], "spread": spread,
                        "paired_gap": statistics.fmean(paired) if paired else None,
                        "paired_std": statistics.stdev(paired) if len(paired) > 1 else None,
                        "paired_seeds": len(paired)})
    return out


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def write_report(out: Path, rows: list[dict], gap_rows: list[dict]) -> dict[str, Path]:
    """table.md, results.csv, results.json and isoflop.png in `out`; returns their paths."""
    lines = ["| budget | arm | layers x width | params | non-emb. params | FLOPs/token | tokens | steps | "
             "val loss (mean +- std) | seeds | compute used / budget |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        loss = "-" if r["val_loss_mean"] is None else (
            f"{r['val_loss_mean']:.4f} +- {_fmt(r['val_loss_std'], '.4f')}")
        lines.append(f"| {budget_label(r['budget'])} | {r['arm']} | {r['layers']} x {r['hidden']} | "
                     f"{r['params'] / 1e6:.3f}M | {r['non_embedding_params'] / 1e6:.3f}M | "
                     f"{r['flops_per_token'] / 1e6:.2f}M | {r['tokens'] / 1e6:.2f}M | {r['steps']} | {loss} | "
                     f"{r['seeds_done']}/{r['seeds_planned']} | {_fmt(r['flops_spent_ratio'], '.3f')} |")
    if gap_rows:
        lines += ["", "| budget | routed arm | best dense arm | routed - best dense val loss (+- unpaired std) | "
                  "same-seed differences: mean +- std (seeds) |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {budget_label(g['budget'])} | {g['routed']} | {g['best_dense']} | {g['gap']:+.4f} +- "
                  f"{g['spread']:.4f} | {_fmt(g['paired_gap'], '+.4f')} +- {_fmt(g['paired_std'], '.4f')} "
                  f"({g['paired_seeds']}) |" for g in gap_rows]
    paths = {"table": out / "table.md", "csv": out / "results.csv", "json": out / "results.json",
             "png": out / "isoflop.png"}
    paths["table"].write_text("\n".join(lines) + "\n")
    columns = [k for k in rows[0] if k not in ("val_losses", "val_loss_by_seed")] if rows else []
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(json.dumps({"rows": rows, "gaps": gap_rows}, indent=2))
    plot_isoflop(rows, paths["png"])
    return paths


def plot_isoflop(rows: list[dict], path: Path) -> None:
    """Validation loss vs parameters, one colour per budget: dense arms joined by a line, routed arms as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(9.5, 5))
    budgets = sorted({r["budget"] for r in rows})
    colours = plt.get_cmap("viridis")(
        [0.1 + 0.75 * i / max(1, len(budgets) - 1) for i in range(len(budgets))])
    markers = ["^", "s", "D", "v", "P", "X", "*"]
    routed_names = sorted({r["arm"].rsplit("-", 1)[0] for r in rows if r["kind"] == "routed"})
    for budget, colour in zip(budgets, colours):
        done = [r for r in rows if r["budget"] == budget and r["val_loss_mean"] is not None]
        dense = sorted((r for r in done if r["kind"] == "dense"), key=lambda r: r["params"])
        if dense:
            ax.errorbar([r["params"] for r in dense], [r["val_loss_mean"] for r in dense],
                        yerr=[r["val_loss_std"] or 0.0 for r in dense], color=colour, marker="o", capsize=3,
                        label=f"dense, {budget_label(budget)} FLOPs")
        for r in (r for r in done if r["kind"] == "routed"):
            marker = markers[routed_names.index(r["arm"].rsplit("-", 1)[0]) % len(markers)]
            ax.errorbar([r["params"]], [r["val_loss_mean"]], yerr=[r["val_loss_std"] or 0.0], color=colour,
                        marker=marker, markersize=9, markeredgecolor="black", capsize=3, linestyle="none")
    for name, marker in zip(routed_names, markers):
        ax.plot([], [], marker=marker, color="grey", markeredgecolor="black", linestyle="none",
                label=f"routed: {name}")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1e6:.3g}M"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("parameters")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("isoFLOP curves: dense vs routed at equal training FLOPs")
    ax.grid(True, which="both", alpha=0.3)
    if rows:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- running -------------------------------------------------------------------------------------------------------
class Runner:
    """Trains arms as `skiptron-train` processes (K at a time); SIGTERM/SIGINT is passed on to them (each saves a
    checkpoint at its next step and exits 75), so a stopped study resumes where it was."""

    def __init__(self, config: str, nproc: int, verbose: bool):
        self.config, self.nproc, self.verbose = config, nproc, verbose
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False

    def command(self, overrides: list[str]) -> list[str]:
        train = [*(["--verbose"] if self.verbose else []), "--config", self.config, *overrides]
        if self.nproc == 1:  # one process: no launcher needed (parallel/launch.py picks a free port)
            return [sys.executable, "-m", "skiptron.tools.train", *train]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
                "-m", "skiptron.tools.train", *train]

    def train(self, overrides: list[str], log_path: Path) -> int:
        with log_path.open("a") as log, self.lock:
            if self.stopping:
                return 75
            proc = subprocess.Popen(self.command(overrides), stdout=log, stderr=subprocess.STDOUT, env=_child_env())
            self.procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.procs.discard(proc)

    def stop(self, signum, _frame) -> None:
        with self.lock:
            self.stopping = True
            for proc in self.procs:
                proc.send_signal(signal.SIGTERM)


# the planner's own one-process world (parameter counts) must not leak into the runs it starts
_WORLD_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _WORLD_KEYS}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_study(args) -> int:
    planner = Planner(args)
    arms = planner.arms()
    root = Path(args.dir)
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for arm in arms:
        spec = json.dumps(asdict(arm), indent=2, sort_keys=True)
        saved = runs / arm.run_name / ARM_FILE
        if saved.is_file() and saved.read_text() != spec:
            raise ConfigError(f"{saved}: this arm was planned differently before (the family, data, batch or "
                              f"overrides changed); use another --dir or remove {saved.parent}")
    (root / PLAN_FILE).write_text(json.dumps({"config": args.config, "padded_vocab": planner.padded_vocab,
                                              "arms": [asdict(a) for a in arms]}, indent=2))
    if args.dry_run or args.slurm or args.measure:
        _print_plan(arms, args)
        if args.slurm:
            return write_slurm(root, planner, arms, args)
        return measure(root, planner, arms, args) if args.measure else 0

    results: dict[str, dict] = {}
    pending = []
    for arm in arms:
        result = arm_result(arm, runs / arm.run_name, args.config, planner.padded_vocab)
        if result is not None:
            results[arm.run_name] = result
        else:
            pending.append(arm)
    print(f"study {root}: {len(arms)} runs, {len(results)} finished, {len(pending)} to train "
          f"({sum(1 for a in pending if (runs / a.run_name / 'checkpoints').is_dir())} resume from a checkpoint)",
          flush=True)
    report(root, arms, results)
    runner = Runner(args.config, args.nproc, args.verbose)
    previous = {s: signal.signal(s, runner.stop) for s in (signal.SIGTERM, signal.SIGINT)}
    failed: list[str] = []
    done_lock = threading.Lock()

    def train_arm(arm: Arm) -> None:
        run_dir = runs / arm.run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ARM_FILE).write_text(json.dumps(asdict(arm), indent=2, sort_keys=True))
        start = time.monotonic()
        rc = runner.train(planner.train_overrides(arm, run_dir), run_dir / "train.log")
        result = arm_result(arm, run_dir, args.config, planner.padded_vocab) if rc == 0 else None
        with done_lock:
            if result is None:
                if not runner.stopping:
                    failed.append(arm.run_name)
                    print(f"FAILED {arm.run_name} (exit {rc}); its log: {run_dir / 'train.log'}", flush=True)
                return
            results[arm.run_name] = result
            print(f"done {arm.run_name}: val loss {result['val_loss']:.4f} | {arm.steps} steps | "
                  f"{arm.tokens / 1e6:.2f}M tokens | {time.monotonic() - start:.0f}s | "
                  f"{len(results)}/{len(arms)} runs", flush=True)
            report(root, arms, results)

    try:
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            list(pool.map(train_arm, pending))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    paths = report(root, arms, results)
    print(f"table: {paths['table']}\nplot:  {paths['png']}", flush=True)
    if runner.stopping:
        print("stopped: rerun the same command to resume", flush=True)
        return 75
    return 1 if failed else 0


def report(root: Path, arms: list[Arm], results: dict[str, dict]) -> dict[str, Path]:
    rows = summarize(arms, results)
    return write_report(root, rows, gaps(rows))


def load_plan(root: Path) -> tuple[dict, list[Arm]]:
    plan_file = root / PLAN_FILE
    if not plan_file.is_file():
        raise ConfigError(f"--dir: no {PLAN_FILE} in {root}; run `skiptron-study isoflop --dir {root} ...` first")
    plan = json.loads(plan_file.read_text())
    return plan, [Arm(**a) for a in plan["arms"]]


def report_command(args) -> int:
    root = Path(args.dir)
    plan, arms = load_plan(root)
    results = {}
    for arm in arms:
        result = arm_result(arm, root / "runs" / arm.run_name, plan["config"], plan["padded_vocab"])
        if result is not None:
            results[arm.run_name] = result
    paths = report(root, arms, results)
    print(paths["table"].read_text())
    print(f"{len(results)}/{len(arms)} runs finished\ntable: {paths['table']}\nplot:  {paths['png']}")
    return 0


def _print_plan(arms: list[Arm], args) -> None:
    total = sum(a.steps * a.tokens_per_step * a.flops_per_token for a in arms)
    print(f"{len(arms)} runs ({args.seeds} seeds), {total:.3g} training FLOPs in all")
    for arm in arms:
        if arm.seed == args.seed:
            print(f"  {budget_label(arm.budget):>6} {arm.name:22s} {arm.params / 1e6:7.3f}M params "
                  f"{arm.flops_per_token / 1e6:7.2f}M FLOPs/token {arm.steps:6d} steps {arm.tokens / 1e6:7.2f}M tokens")
    if args.flops_per_s:
        print(f"at {args.flops_per_s:.3g} FLOP/s: {total / args.flops_per_s / 60:.1f} minutes of training "
              f"(plus start-up per run)")


def measure(root: Path, planner: Planner, arms: list[Arm], args) -> int:
    """Train each distinct model of the plan for --measure steps and predict the study's wall time from the
    measured step times (and the start-up time of a run)."""
    runner = Runner(args.config, args.nproc, args.verbose)
    seen: dict[tuple, dict] = {}
    for arm in arms:
        key = tuple(arm.overrides)
        if key in seen:
            continue
        run_dir = root / "measure" / arm.name
        probe = Arm(**{**asdict(arm), "steps": args.measure, "warmup": 1})
        overrides = planner.train_overrides(probe, run_dir) + ["resume=none", "checkpoint.interval=0",
                                                               "eval.batches=1"]
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        rc = runner.train(overrides, run_dir / "train.log")
        wall = time.monotonic() - start
        if rc != 0:
            print(f"measure {arm.name}: exit {rc}, see {run_dir / 'train.log'}")
            return 1
        from skiptron.training.metrics import read_metrics

        steps = [r["step_time_s"] for r in read_metrics(run_dir) if "step_time_s" in r]
        step_s = statistics.median(steps[2:] or steps)
        seen[key] = {"step_s": step_s, "startup_s": max(0.0, wall - sum(steps))}
        print(f"measure {arm.name:22s} {step_s * 1e3:7.1f} ms/step "
              f"({arm.flops_per_token * arm.tokens_per_step / step_s / 1e9:6.2f} GFLOP/s) start-up "
              f"{seen[key]['startup_s']:.0f}s", flush=True)
    total = sum(a.steps * seen[tuple(a.overrides)]["step_s"] + seen[tuple(a.overrides)]["startup_s"] for a in arms)
    print(f"predicted study time: {total / 60:.1f} minutes sequential, about {total / 60 / args.parallel:.1f} with "
          f"--parallel {args.parallel} if the cores allow")
    for budget in args.budgets:
        part = sum(a.steps * seen[tuple(a.overrides)]["step_s"] + seen[tuple(a.overrides)]["startup_s"]
                   for a in arms if a.budget == budget)
        print(f"  {budget_label(budget)}: {part / 60:.1f} minutes")
    return 0


def write_slurm(root: Path, planner: Planner, arms: list[Arm], args) -> int:
    """One line of overrides per arm (launch/slurm/study.sbatch's array task i trains line i+1) and the commands."""
    sweep = root / "sweep.txt"
    lines = []
    for arm in arms:
        run_dir = (root / "runs" / arm.run_name).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ARM_FILE).write_text(json.dumps(asdict(arm), indent=2, sort_keys=True))
        lines.append(" ".join(planner.train_overrides(arm, run_dir)))
    sweep.write_text("\n".join(lines) + "\n")
    sbatch = Path(__file__).resolve().parents[1] / "launch" / "slurm" / "study.sbatch"
    if not sbatch.is_file():
        sbatch = Path("launch/slurm/study.sbatch")
    print(f"sweep: {sweep} ({len(lines)} runs)\nsubmit from the repository root:\n"
          f"  JOB=$(sbatch --parsable --array=0-{len(lines) - 1}%{args.parallel} -N 1 --ntasks-per-node={args.nproc} "
          f"--export=ALL,SKIPTRON_SWEEP={sweep.resolve()} {sbatch} --config {args.config})\n"
          f"  sbatch --dependency=afterany:$JOB --wrap 'skiptron-study report --dir {root.resolve()}'")
    return 0


# -- command line --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skiptron-study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    iso = sub.add_parser("isoflop", help="plan, train (or resume) and tabulate an isoFLOP study",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    iso.add_argument("--dir", required=True, help="study directory: plan, one run directory per arm, table and PNG")
    iso.add_argument("--data", required=True, help="prepared data directory (skiptron-data prepare)")
    iso.add_argument("--budgets", type=_budgets, required=True, help="training FLOPs per run, e.g. 1e12,3e12,1e13")
    iso.add_argument("--config", default="tiny", help="base config (YAML or preset; default: %(default)s)")
    iso.add_argument("--family", type=lambda t: [Shape.parse(s) for s in t.split(",")], default=DEFAULT_FAMILY,
                     help="dense shapes DEPTHxWIDTH, comma separated (default: %(default)s)")
    iso.add_argument("--head-dim", type=int, default=32, help="attention head width; heads = width / head dim")
    iso.add_argument("--dense-arms", type=int, default=3, help="dense shapes per budget around the optimum")
    iso.add_argument("--extra-dense", type=lambda t: [Shape.parse(s) for s in t.split(",") if s], default="",
                     help="dense shapes DEPTHxWIDTH trained at every budget besides those around the optimum (where "
                          "the isoFLOP minimum lies outside the family's window)")
    iso.add_argument("--tokens-per-param", type=float, default=20.0,
                     help="tokens per non-embedding parameter that defines a budget's optimum (default: %(default)s)")
    iso.add_argument("--router", type=_router, action="append",
                     help='a routed arm NAME="key=value ..." (repeatable), besides the default ones: ' +
                          ", ".join(f'{n}="{o}"' for n, o in DEFAULT_ROUTERS))
    iso.add_argument("--no-default-routers", action="store_true",
                     help="only the --router arms, not the default MoD-style and all-layer capacity routers")
    iso.add_argument("--seeds", type=int, default=2, help="seeds per arm (default: %(default)s)")
    iso.add_argument("--seed", type=int, default=1, help="first seed (train.seed)")
    iso.add_argument("--seq-len", type=int, default=128, help="model.seq_len (default: %(default)s)")
    iso.add_argument("--batch", type=int, default=16, help="sequences per step, train.global_batch_size")
    iso.add_argument("--micro-batch", type=int, default=16, help="train.micro_batch_size per process")
    iso.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    iso.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    iso.add_argument("--warmup-fraction", type=float, default=0.1, help="warmup steps as a fraction of the run")
    iso.add_argument("--eval-batches", type=int, default=16, help="validation micro-batches at the end of each run")
    iso.add_argument("--checkpoints", type=int, default=3, help="checkpoints per run, what a resume starts from")
    iso.add_argument("--nproc", type=int, default=1, help="processes per run (DP under torchrun when > 1)")
    iso.add_argument("--parallel", type=int, default=1, help="runs trained at the same time")
    mode = iso.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    mode.add_argument("--measure", type=int, metavar="STEPS",
                      help="time STEPS steps of each model and predict the study's wall time")
    mode.add_argument("--slurm", action="store_true", help="write the SLURM sweep and print the sbatch commands")
    iso.add_argument("--flops-per-s", type=float, help="with --dry-run: predict the training time at this rate "
                                                       "(e.g. 0.4 x 989e12 for an H100 at 40%% MFU)")
    iso.add_argument("overrides", nargs="*", help="common config overrides for every arm (after the options)")
    verbosity.add_argument(iso)
    rep = sub.add_parser("report", help="rewrite the table and PNG of a study directory from its finished runs")
    rep.add_argument("--dir", required=True, help="study directory")
    verbosity.add_argument(rep)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    verbosity.configure(args.verbose or None)
    try:
        if args.command == "report":
            return report_command(args)
        args.router = ([] if args.no_default_routers else list(DEFAULT_ROUTERS)) + (args.router or [])
        names = [name for name, _ in args.router]
        if len(set(names)) != len(names):
            raise ConfigError(f"--router: names must be distinct, got {names}")
        for name in (n for n in ("seeds", "parallel", "nproc", "dense_arms") if getattr(args, n) < 1):
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1")
        return run_study(args)
    except ConfigError as err:
        print(f"skiptron-study: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
