"""training_examples/*.py imported in-process: scripts, not part of the package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "training_examples"


def load_example(name: str) -> ModuleType:
    """A fresh import of ``training_examples/<name>.py`` (fresh: a script's module-level caches start empty),
    registered in ``sys.modules`` since dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
