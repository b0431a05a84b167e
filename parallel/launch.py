"""Who this process is in a launch, and a rendezvous that fails with names instead of hanging.

Every launcher (torchrun, SLURM's `srun`, `mpirun`) describes the job in its own environment variables. `discover()`
turns them into one `LaunchInfo` (rank, world size, local rank, rendezvous address), so all launch paths end in the
same `skiptron-train` with the same `env://`-style variables exported. The master address always comes from the
launcher or the scheduler (torchrun's MASTER_ADDR, the first host of SLURM's host list, rank 0's host name broadcast
over MPI) or from the user; never from `hostname -I` or a guessed network interface, which picks the wrong network on
multi-homed cluster nodes. A SLURM job derives its port from the job id, so concurrent jobs sharing a node do not
collide and every rank computes the same port without talking to the others.

`rendezvous()` replaces a bare `init_process_group` wait: each rank signs in at the master's store, and a rank that
never arrives (or a master nobody can reach) fails every waiting rank within `launch.rendezvous_timeout_s` with the
missing ranks and hosts named.

`python -m skiptron.parallel.launch exports` prints `export MASTER_ADDR=... MASTER_PORT=...` for a SLURM batch
script, so the shell scripts use this same logic instead of re-implementing it.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 20000
_MPI_SIZE_KEYS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


class LaunchError(RuntimeError):
    """A launch that cannot work: the message names the ranks, hosts or variables involved."""


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str  # torchrun | env | mpi | slurm | single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    host: str  # this process's node (SLURM node name or host name), for messages

    def export(self) -> None:
        """Publish the launch as torch's env:// variables, for DeepSpeed and anything else reading them."""
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                          LOCAL_WORLD_SIZE=str(self.local_world_size), MASTER_ADDR=self.master_addr,
                          MASTER_PORT=str(self.master_port))

    def describe(self) -> str:
        return (f"[launch] rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}) on "
                f"{self.host} via {self.launcher}: rendezvous at {self.master_addr}:{self.master_port}")


# -- SLURM's compact formats ----------------------------------------------------------------------------------
def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list (`gpu[01-03,07],login1`) as names, in the scheduler's order (= `scontrol show
    hostnames`), without calling scontrol from every rank."""
    hosts = []
    for prefix, ranges, suffix in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?([^,\[]*)", hostlist):
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """`SLURM_TASKS_PER_NODE` (`2(x3),1`) as one count per node."""
    counts = []
    for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec):
        counts += [int(count)] * int(repeat or 1)
    return counts


def port_from_job_id(job_id: str | int) -> int:
    """A port every rank of a SLURM job computes alike, different for jobs that may share a node."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def node_address(name: str) -> str:
    """An address for a SLURM node name: the name itself when it resolves, else the node's `NodeAddr` from
    scontrol (node names need not be DNS names, e.g. the local rehearsal cluster's node1/node2)."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except socket.gaierror:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", name, "-o"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise LaunchError(f"SLURM node {name} does not resolve and scontrol could not be asked ({err}); "
                          f"set MASTER_ADDR") from None
    match = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    if not match:
        raise LaunchError(f"SLURM node {name} does not resolve and scontrol shows no NodeAddr for it; set MASTER_ADDR")
    return match.group(1)


# -- discovery per launcher -----------------------------------------------------------------------------------
def _int(env, *keys, default=None) -> int:
    for key in keys:
        if env.get(key):
            return int(env[key])
    if default is None:
        raise LaunchError(f"none of {', '.join(keys)} is set")
    return default


def _from_env(env, launcher: str) -> LaunchInfo:
    """torchrun, or a launcher that already exported torch's env:// variables."""
    world = _int(env, "WORLD_SIZE")
    return LaunchInfo(launcher, _int(env, "RANK"), world, _int(env, "LOCAL_RANK", default=0),
                      _int(env, "LOCAL_WORLD_SIZE", default=world), env.get("MASTER_ADDR", "127.0.0.1"),
                      _int(env, "MASTER_PORT", default=29500), env.get("SLURMD_NODENAME") or socket.gethostname())


def slurm_rendezvous(env) -> tuple[str, int]:
    """MASTER_ADDR/MASTER_PORT when given, else the job's first host and a port from the job id."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not env.get("MASTER_ADDR") and not nodelist:
        raise LaunchError("no SLURM_JOB_NODELIST (not inside a SLURM job?): set MASTER_ADDR")
    if not env.get("MASTER_PORT") and not env.get("SLURM_JOB_ID"):
        raise LaunchError("no SLURM_JOB_ID (not inside a SLURM job?): set MASTER_PORT")
    master = env.get("MASTER_ADDR") or node_address(expand_hostlist(nodelist)[0])
    return master, int(env.get("MASTER_PORT") or port_from_job_id(env["SLURM_JOB_ID"]))


def _from_slurm(env) -> LaunchInfo:
    """One task per GPU started by `srun`: ranks from SLURM_PROCID, the master from the step's first host."""
    master, port = slurm_rendezvous(env)
    per_node = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
    node = _int(env, "SLURM_NODEID", default=0)
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    return LaunchInfo("slurm", _int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", default=0),
                      per_node[node] if node < len(per_node) else 1, master, port,
                      env.get("SLURMD_NODENAME") or socket.gethostname())


def _from_mpi(env) -> LaunchInfo:
    """`mpirun` (OpenMPI, MPICH, Intel MPI): ranks and node-local ranks from mpi4py; rank 0 picks the rendezvous
    (MASTER_ADDR/MASTER_PORT if given, else its host name and a port free on it) and broadcasts it, so no rank guesses
    an address. (DeepSpeed's own MPI discovery uses `hostname -I`, which we avoid.)"""
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError("launched by mpirun but mpi4py is not installed: pip install 'skiptron[mpi]' "
                          "(or mpi4py built against the same MPI as mpirun)") from None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    host = socket.gethostname()
    rendezvous = None
    if comm.Get_rank() == 0:
        rendezvous = (env.get("MASTER_ADDR") or host, int(env.get("MASTER_PORT") or _free_port()))
    master, port = comm.bcast(rendezvous, root=0)
    info = LaunchInfo("mpi", comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(), master, port, host)
    local.Free()
    return info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def detect_launcher(env=None) -> str:
    """Which launcher started this process. torchrun first (it may run inside SLURM or MPI jobs), then explicit
    env:// variables, then MPI (mpirun inside a SLURM allocation also sees the allocation's SLURM_* variables), then
    a SLURM step."""
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    if env.get("RANK") and env.get("WORLD_SIZE"):
        return "env"
    if any(env.get(k) for k in _MPI_SIZE_KEYS):
        return "mpi"
    if env.get("SLURM_PROCID") and (env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")):
        return "slurm"
    return "single"


def output_is_forwarded(env=None) -> bool:
    """Whether mpirun or srun forwards this rank's output. OpenMPI gives each rank a pseudo-terminal even when the
    user's own output is a pipe or a file, so "stdout is a terminal" says nothing about where the text ends up."""
    env = os.environ if env is None else env
    return any(env.get(k) for k in _MPI_SIZE_KEYS) or bool(env.get("SLURM_STEP_ID") and not env.get("SLURM_PTY_PORT"))


def discover(env=None) -> LaunchInfo:
    """This process's place in the launch, from the launcher's environment (collective under MPI: call on all
    ranks, once; `current()` caches it)."""
    env = os.environ if env is None else env
    launcher = detect_launcher(env)
    if launcher in ("torchrun", "env"):
        return _from_env(env, launcher)
    if launcher == "mpi":
        return _from_mpi(env)
    if launcher == "slurm":
        return _from_slurm(env)
    return LaunchInfo("single", 0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"),
                      int(env.get("MASTER_PORT") or _free_port()), socket.gethostname())


_CURRENT: LaunchInfo | None = None


def current() -> LaunchInfo:
    """`discover()` for this process, computed once (MPI discovery is a collective)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = discover()
    return _CURRENT


# -- rendezvous -----------------------------------------------------------------------------------------------
def rendezvous(info: LaunchInfo, timeout_s: float):
    """Connect to (or, on rank 0, host) the rendezvous store and wait until every rank has signed in.

    Fails within `timeout_s` on every waiting rank, naming the master address if it cannot be reached and the
    missing ranks (and the hosts that did arrive) if some never sign in. Returns the store for
    `init_process_group(store=...)`."""
    import torch.distributed as dist

    # torchrun's agent already hosts a store at MASTER_ADDR:MASTER_PORT; its workers are all clients.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    is_server = info.rank == 0 and not agent_store
    try:
        store = dist.TCPStore(info.master_addr, info.master_port, is_master=is_server, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as err:  # DistNetworkError / RuntimeError, by torch version
        what = "could not listen on" if is_server else "could not reach the master at"
        raise LaunchError(f"rank {info.rank} on {info.host}: {what} {info.master_addr}:{info.master_port} within "
                          f"{timeout_s:.0f}s ({str(err).splitlines()[0]}); check MASTER_ADDR/MASTER_PORT, that rank 0 "
                          f"started, and that the port is open between nodes") from None
    prefix = f"skiptron/rollcall/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/" \
             f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store.set(f"{prefix}/rank{info.rank}", info.host)
    arrived = store.add(f"{prefix}/count", 1)
    deadline = time.monotonic() + timeout_s
    while arrived < info.world_size:
        if time.monotonic() > deadline:
            raise LaunchError(_missing_message(store, prefix, info, timeout_s))
        time.sleep(0.2)
        arrived = store.add(f"{prefix}/count", 0)
    # The process group's own keys under this attempt's prefix: torchrun's agent store outlives a restart, and gloo
    # would otherwise connect to the dead workers' addresses left there by the previous attempt.
    return dist.PrefixStore(f"{prefix}/pg", store)


def _missing_message(store, prefix: str, info: LaunchInfo, timeout_s: float) -> str:
    present = {r for r in range(info.world_size) if store.check([f"{prefix}/rank{r}"])}
    missing = [r for r in range(info.world_size) if r not in present]
    hosts = sorted({store.get(f"{prefix}/rank{r}").decode() for r in present})
    msg = (f"rendezvous at {info.master_addr}:{info.master_port} timed out after {timeout_s:.0f}s "
           f"(launch.rendezvous_timeout_s): {len(present)} of {info.world_size} ranks arrived; "
           f"missing ranks: {_ranges(missing)}; hosts that arrived: {', '.join(hosts)}")
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if nodelist:
        silent = [h for h in expand_hostlist(nodelist) if h not in hosts]
        if silent:
            msg += f"; allocated hosts with no rank: {', '.join(silent)}"
    return msg


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (a thousand missing ranks stay one line)."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def init_process_group(backend: str, timeout_s: float, rendezvous_timeout_s: float) -> LaunchInfo:
    """Discover the launch, log it (every rank), export it, and create the default process group."""
    import torch.distributed as dist

    info = current()
    if info.rank == 0 or os.environ.get("SKIPTRON_LOG", "").lower() == "debug":  # see training/verbosity.py
        print(info.describe(), file=sys.stderr, flush=True)
    info.export()
    store = rendezvous(info, rendezvous_timeout_s)
    dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return info


def main(argv=None) -> int:
    """`python -m skiptron.parallel.launch exports`: the rendezvous variables for a batch script."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["exports"]:
        print("usage: python -m skiptron.parallel.launch exports", file=sys.stderr)
        return 2
    try:
        addr, port = slurm_rendezvous(os.environ)
    except LaunchError as err:
        print(f"skiptron launch: {err}", file=sys.stderr)
        return 1
    print(f"export MASTER_ADDR={addr} MASTER_PORT={port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
