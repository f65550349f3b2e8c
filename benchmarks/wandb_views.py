"""Cost of the callback's end-of-run W&B views on the default job (offline W&B).

Runs ``nclightning fit --config digits_mlp.yaml`` twice in this process, in a temporary
folder, with W&B offline: once as configured (``log_figures=False``: line charts, per-class
tables, the snapshot artifact) and once with ``log_figures=True`` (the report's figures
too). Prints, per run, the total wall time and the time spent in the views at the end of
the run (``NeuralCollapseCallback._end_outputs``), the only W&B work besides each probe's
scalars.

    python benchmarks/wandb_views.py
"""

from __future__ import annotations

import os
import tempfile
import time

from nclightning.callbacks import NeuralCollapseCallback
from nclightning.cli import main as cli


def run(log_figures: bool) -> tuple[float, float]:
    """``(total seconds, seconds in the end-of-run views)`` of one default job."""
    spent: list[float] = []
    end = NeuralCollapseCallback._end_outputs

    def timed(self, trainer):
        self.log_figures = log_figures  # the option, set where it is read
        t = time.perf_counter()
        end(self, trainer)
        spent.append(time.perf_counter() - t)

    NeuralCollapseCallback._end_outputs = timed
    cwd = os.getcwd()
    os.chdir(tempfile.mkdtemp(prefix="nclightning-wandb-views-"))
    try:
        t = time.perf_counter()
        assert (
            cli(["fit", "--config", "digits_mlp.yaml", "--trainer.enable_progress_bar", "false"])
            == 0
        )
        total = time.perf_counter() - t
    finally:
        os.chdir(cwd)
        NeuralCollapseCallback._end_outputs = end
    return total, sum(spent)


def main() -> None:
    os.environ["WANDB_MODE"] = "offline"
    results = {figures: run(figures) for figures in (False, True)}
    for figures, (total, views) in results.items():
        print(
            f"log_figures={figures!s:5}: default job {total:6.1f} s, end-of-run W&B views "
            f"{views:5.2f} s ({views / total:5.1%} of the run)"
        )


if __name__ == "__main__":
    main()
