"""Import an entrypoint script (``jobs/*.py``, not a package module) by its path, once per test session."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=None)
def load_script(relative_path: str):
    """The module of ``ROOT / relative_path`` (e.g. ``"jobs/cluster.py"``)."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(f"_agc_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
