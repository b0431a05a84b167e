"""The checkpoint package's exceptions, imported by every other module of it."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file or key."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint file holding pickled objects that loading would have to run as code."""
