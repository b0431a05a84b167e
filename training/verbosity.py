"""Third-party start-up noise: off by default, back with `--verbose` or `SKIPTRON_LOG=debug`.

megatron-core warns that Transformer Engine and Apex are missing (several times per rank and command), torch and
DeepSpeed emit deprecation warnings about each other, DeepSpeed logs its accelerator choice and prints a line when it
loads its CPU communication op. None of it is actionable for a skiptron user, and under a launcher it is multiplied
by the number of ranks. `configure` runs once per process, before megatron-core or DeepSpeed are imported (the
`skiptron.tools` package calls it on import, so every console script does): it filters the warnings those packages
raise and DeepSpeed's log records below ERROR. skiptron's own warnings and every error stay visible.

Verbose mode exports `SKIPTRON_LOG=debug`, so the processes a run starts (data workers, a launcher's ranks started
from this environment) are verbose too; `parallel/launch.py` reads it to let every rank, not only rank 0, announce
itself.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings

ENV = "SKIPTRON_LOG"
DEBUG = "debug"
# Modules whose warnings are noise to a skiptron user (module regexes as `warnings.filterwarnings` takes them).
QUIET_MODULES = (r"megatron(\..*)?", r"deepspeed(\..*)?", r"transformer_engine(\..*)?", r"apex(\..*)?")
# torch's deprecation warnings are raised on behalf of its callers (DeepSpeed, megatron-core) and attributed to torch.
QUIET_DEPRECATIONS = (r"torch(\..*)?",)
DEEPSPEED_LOGGER = "DeepSpeed"


class _BelowError(logging.Filter):
    """Drops log records below ERROR (a logger's own filter survives the level its package sets at import)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_FILTER = _BelowError()


def is_verbose() -> bool:
    return os.environ.get(ENV, "").lower() == DEBUG


def configure(verbose: bool | None = None) -> bool:
    """Quiet third-party noise unless `verbose` (None: decided by SKIPTRON_LOG). Idempotent; returns verbose."""
    if verbose is None:
        verbose = is_verbose()
    ds_logger = logging.getLogger(DEEPSPEED_LOGGER)
    ours = [(module, Warning) for module in QUIET_MODULES] + [
        (module, category) for module in QUIET_DEPRECATIONS for category in (DeprecationWarning, FutureWarning)]
    # drop the filters an earlier call installed (a later --verbose wins), then install them again if quiet
    warnings.filters[:] = [f for f in warnings.filters
                           if not (f[0] == "ignore" and f[3] is not None and (f[3].pattern, f[2]) in ours)]
    if verbose:
        os.environ[ENV] = DEBUG
        ds_logger.removeFilter(_FILTER)
        return True
    for module, category in ours:
        warnings.filterwarnings("ignore", category=category, module=module)
    ds_logger.addFilter(_FILTER)
    return False


def requested_on_command_line(argv: list[str] | None = None) -> bool | None:
    """True when `--verbose` is among the arguments, else None (SKIPTRON_LOG decides)."""
    return True if "--verbose" in (sys.argv[1:] if argv is None else argv) else None


def add_argument(parser) -> None:
    """The `--verbose` option every console script takes."""
    parser.add_argument("--verbose", action="store_true",
                        help=f"show third-party warnings and logs (megatron-core, DeepSpeed, torch); same as {ENV}=debug")


@contextlib.contextmanager
def third_party_stdout():
    """Swallow what a third-party call prints to stdout (e.g. DeepSpeed's 'deepspeed_shm_comm_op built successfully'
    on every rank), unless verbose. Loggers keep the stream they were created with, so their output is unaffected."""
    if is_verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
