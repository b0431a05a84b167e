"""Where a tool's `--json` asks, its result as JSON: one writer, so every tool writes the same way."""
from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | None, result) -> None:
    """`result` as indented JSON at `path`; nothing when `path` is None. Values JSON lacks (paths, dtypes) are
    written as their str."""
    if path:
        Path(path).write_text(json.dumps(result, indent=2, default=str))
