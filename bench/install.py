"""A normal (non-editable) install of this checkout in a throwaway venv: what users run.

The test setup's editable install adds an import hook to every interpreter start, and
`python -m bridge` from a checkout compiles nothing ahead; neither is what `pip install .`
gives a user, so the producer figures are measured on this instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def normal_install(work: Path) -> Path:
    """`pip install .` (with its dependencies) into a new venv under work; its python."""
    source = work / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("bridge", "exporter"):
        # A copy, so the build's build/ and *.egg-info stay out of the checkout.
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = work / "venv"
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", str(source)],
        check=True,
        timeout=900,
        stdout=subprocess.DEVNULL,
    )
    return python
