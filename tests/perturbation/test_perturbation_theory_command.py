"""``nclightning theory spectrum|flow`` writes valid, non-trivial PNGs (docs/science.md §3, §5)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import image

from nclightning.cli import main as cli_main
from nclightning.commands.theory import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_colours=5):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    img = image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    colours = np.unique(img[..., :3].reshape(-1, 3).round(2), axis=0)
    assert len(colours) >= min_colours  # curves, not a blank canvas
    assert float(img[..., :3].std()) > 0.05


def test_spectrum_command(tmp_path, capsys):
    out = tmp_path / "fig1.png"
    assert cli_main(["theory", "spectrum", "--out", str(out), "--lambda-H", "0.05", "0.2"]) == 0
    _check_png(out)
    text = capsys.readouterr().out
    assert "beta=100" in text and "K=4" in text and "d=10" in text and "n=10" in text
    # the printed deviation from the table is O(beta^-2) for the exact operator
    devs = [float(line.split("=")[2].split()[0]) for line in text.splitlines() if "max |" in line]
    assert len(devs) == 2 and all(0 < v < 1e-4 for v in devs)


def test_flow_command(tmp_path, capsys):
    out = tmp_path / "flow.png"
    rc = main(["flow", "--out", str(out), "--lambda-H", "0.05", "0.3", "--points", "41"])
    assert rc == 0
    _check_png(out)
    assert capsys.readouterr().out.count("strictly decreasing: yes") == 2


def test_theory_requires_a_subcommand():
    with pytest.raises(SystemExit):
        main([])
