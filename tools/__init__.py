"""Command-line programs. Importing the package quiets third-party start-up noise (training/verbosity.py) before any
tool imports megatron-core or DeepSpeed; `--verbose` on the command line or SKIPTRON_LOG=debug keeps it."""
from skiptron.training import verbosity

verbosity.configure(verbosity.requested_on_command_line())
