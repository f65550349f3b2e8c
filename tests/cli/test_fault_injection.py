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
def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path, seed, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--kills", "3", "--max-epochs", "30", "--seed", str(seed), "--workdir", str(tmp_path)]
    rc = module.main(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("killed") == 3 and "PASS" in out
    # what the report draws of the killed and resumed run is the uninterrupted run's record
    from drawn import assert_metrics_figure, capture, logged_curves

    from nclightning.commands import report

    figures = capture(monkeypatch)
    run = tmp_path / "killed" / module.RUN
    assert report.main([str(run), "--out", str(tmp_path / "report")]) == 0
    assert "dropped" not in capsys.readouterr().err
    logged = logged_curves(tmp_path / "reference" / module.RUN / "metrics.csv", "train")
    assert [x for x, _ in logged["penultimate"]["nc1"]] == [float(e) for e in range(0, 31, 5)]
    assert assert_metrics_figure(figures["metrics_train"], logged) == 2 * 6 - 1
