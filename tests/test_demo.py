"""The README's demo command runs and prints the report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_prints_the_report():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")], capture_output=True, text=True,
                         timeout=300, check=True)
    assert "block_sparse" in out.stdout and "low_rank" in out.stdout
    assert "relative error" in out.stdout


def test_readme_names_the_scripts_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/demo" in readme and "scripts/test" in readme and "scripts/test" in ci
