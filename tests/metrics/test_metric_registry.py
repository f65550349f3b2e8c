"""The metric registry (``nclightning.metrics.names.REGISTRY``) is complete and true.

One entry per metric: its formula exists (and takes the inputs the entry says it needs), its
independent reference in ``tests/metrics/conftest.py`` computes it, its reference test exists,
the figure it names is drawn, and the README's and docs/science.md's metric tables have a row
for it. The key tuples every layer uses are derived from it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

from nclightning.metrics import names
from nclightning.metrics.names import REGISTRY, SPECS

ROOT = Path(__file__).resolve().parents[2]
NEEDS = {"scatter", "class_ss", "norm_sums", "classifier", "predictions", "train_means", "ood_mean"}
IDS = [s.name for s in REGISTRY]


def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def _strings(node: ast.AST) -> set[str]:
    constants = [n for n in ast.walk(node) if isinstance(n, ast.Constant)]
    return {n.value for n in constants if isinstance(n.value, str)}


def _table_rows(text: str, header: str) -> list[str]:
    """The rows of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_key_tuples_are_derived_from_the_registry():
    assert names.METRIC_KEYS == tuple(IDS)
    assert len(set(IDS)) == len(IDS)
    assert names.CLASSIFIER_KEYS == tuple(s.name for s in REGISTRY if "classifier" in s.needs)
    assert names.NCC_KEYS == tuple(s.name for s in REGISTRY if "predictions" in s.needs)
    assert names.OOD_KEYS == tuple(s.name for s in REGISTRY if "ood_mean" in s.needs)
    assert names.SCALE_KEYS == tuple(s.name for s in REGISTRY if s.scale)
    assert all(names.DESCRIPTIONS[s.name] == s.description for s in REGISTRY)


@pytest.mark.parametrize("name", IDS)
def test_formula_exists_and_takes_what_the_entry_needs(name):
    spec = SPECS[name]
    assert set(spec.needs) <= NEEDS, spec.needs
    assert spec.description and spec.nan_rule
    formula = _resolve(spec.formula)
    assert callable(formula)
    if inspect.isfunction(formula):  # the NCC metrics are a class: predictions, means
        params = inspect.signature(formula).parameters
        assert ("weight" in params) == ("classifier" in spec.needs), params
        assert ("ood_mean" in params) == ("ood_mean" in spec.needs), params


@pytest.mark.parametrize("name", IDS)
def test_reference_and_reference_test_exist(name):
    spec = SPECS[name]
    references = _functions(ROOT / "tests" / "metrics" / "conftest.py")
    assert spec.reference in references, f"{spec.reference} not in tests/metrics/conftest.py"
    if spec.reference != "reference_nc4":  # NCC references return the mismatch fraction itself
        assert name in _strings(references[spec.reference]), (
            f"{spec.reference} does not compute {name!r}"
        )
    path, _, test = spec.reference_test.partition("::")
    assert test in _functions(ROOT / path), f"{spec.reference_test} does not exist"


@pytest.mark.parametrize("name", IDS)
def test_figure_is_drawn(name):
    prefix = SPECS[name].figure.split("{")[0]
    source = (ROOT / "nclightning" / "record" / "figures.py").read_text()
    assert re.search(r'f"' + re.escape(prefix) + r"\{", source), SPECS[name].figure


@pytest.mark.parametrize("name", IDS)
def test_readme_and_science_tables_have_a_row(name):
    readme = _table_rows((ROOT / "README.md").read_text(), "| measure | what it tells you")
    science = _table_rows(
        (ROOT / "docs" / "science.md").read_text(), "| measure | the question it answers"
    )
    for where, rows in (("README.md", readme), ("docs/science.md", science)):
        assert any(f"`{name}`" in row.split("|")[1] for row in rows), f"no {where} row: {name}"
