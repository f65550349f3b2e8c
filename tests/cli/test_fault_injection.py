"""SIGKILL at random moments, resume each time: every file loads, metrics.csv as uninterrupted.

Runs ``benchmarks/fault_injection.py`` on a 30-epoch default job (``slow``: about a minute
on 2 cores; the script runs the full 150-epoch job by default).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fault_injection.py"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])  # others: python benchmarks/fault_injection.py --seed N
def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path, seed, capsys):
    spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--kills", "3", "--max-epochs", "30", "--seed", str(seed), "--workdir", str(tmp_path)]
    rc = module.main(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("killed") == 3 and "PASS" in out
