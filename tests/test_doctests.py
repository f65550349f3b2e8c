"""The docstring examples of the public entry points run, and each entry point has one.

Each example is a doctest (``Example:`` section) on small deterministic tensors; they run here
in a temporary working directory (nothing is written into the checkout), with the thread
setting and :mod:`nclightning.runtime`'s bookkeeping restored afterwards (the
``configure_threads`` example applies a thread count).
"""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from nclightning import runtime

# (module, public name): every entry point the README and docs/ARCHITECTURE.md present.
ENTRY_POINTS = [
    ("nclightning.metrics.statistics", "ClassStatistics"),
    ("nclightning.metrics.collapse", "collapse_metrics"),
    ("nclightning.perturbation.solver", "solve"),
    ("nclightning.perturbation.pair", "fit_pair"),
    ("nclightning.callbacks.neural_collapse", "NeuralCollapseCallback"),
    ("nclightning.loggers.csv_logger", "CSVLogger"),
    ("nclightning.loggers.wandb_logger", "WandbLogger"),
    ("nclightning.runtime", "configure_threads"),
]


def _doctests(module_name: str, name: str) -> list[doctest.DocTest]:
    obj = getattr(importlib.import_module(module_name), name)
    finder = doctest.DocTestFinder(recurse=False)
    return [t for t in finder.find(obj, name, globs={}) if t.examples]


@pytest.mark.parametrize(("module_name", "name"), ENTRY_POINTS, ids=[n for _, n in ENTRY_POINTS])
def test_entry_point_example_runs(module_name, name, tmp_path, monkeypatch):
    tests = _doctests(module_name, name)
    assert tests, f"{module_name}.{name} has no docstring example"
    assert "Example:" in tests[0].docstring
    monkeypatch.chdir(tmp_path)
    if name == "WandbLogger":  # Lightning's logger adopts a W&B run an earlier test left open
        import wandb

        wandb.finish()
    saved = (torch.get_num_threads(), runtime._THREADS_AT_IMPORT, runtime._EXPORTED)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    try:
        for test in tests:
            runner.run(test)
    finally:
        torch.set_num_threads(saved[0])
        runtime._THREADS_AT_IMPORT, runtime._EXPORTED = saved[1], saved[2]
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
    assert list(tmp_path.iterdir()) == [], "an example wrote into the working directory"
