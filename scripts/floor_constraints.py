#!/usr/bin/env python
"""Print a pip constraints file that pins every dependency of pyproject.toml to its floor.

``>=X`` becomes ``==X`` for the runtime dependencies and the ``test`` extra, so the floors the project
promises are installed and tested as they are (scripts/test_floors.sh); ``torch`` keeps the CPU wheel
the main environment uses.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
KEEP = {"torch": "torch==2.13.0"}  # the local CPU wheel; an older torch would pull CUDA builds


def floors(pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    pins = []
    for req in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)\s*", req)
        if not match:
            raise SystemExit(f"error: cannot read a floor from {req!r}: write it as 'name>=version'.")
        name, version = match.groups()
        pins.append(KEEP.get(name.lower(), f"{name}=={version}"))
    return pins


if __name__ == "__main__":
    sys.stdout.write("\n".join(floors()) + "\n")
