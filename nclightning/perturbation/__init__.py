"""The perturbation model of Tirer, Huang & Niles-Weed (ICML 2023), docs/science.md §2-5, §7.

Pure tensor maths (float64), no Lightning import. Features are rows (``[N, d]``); docs/science.md
writes them as columns.

* :func:`solve` (§2): minimiser of Eq. 2 from class moments (or raw features).
* :func:`fit_pair` (§7): the model fitted to a pair of layers, scale free: the coupling whose
  ``H*`` reproduces one metric of ``H`` (:data:`FIT_METRICS`, ``nc1_tilde`` by default) or a
  fixed one, predicted metrics of ``H*``, residuals against the measured ``H``.
* :func:`ufm_minimizer` (§4, Theorem 2.1).
* :func:`central_path_loss`, :func:`central_path_flow` (§3, Eq. 4, Theorem 3.1).
* :func:`perturbation_operator`, :func:`operator_blocks`, :func:`block_singular_values`,
  :func:`theorem_spectrum` (§5, Theorems 4.1-4.2, Eq. 5).
"""

from nclightning.perturbation._scale import NORMALIZATIONS, ufm_scale
from nclightning.perturbation.central_path import (
    FlowTrajectory,
    central_path_flow,
    central_path_loss,
    optimal_classifier,
)
from nclightning.perturbation.fit import DEFAULT_COUPLING_RANGE
from nclightning.perturbation.operator import (
    block_singular_values,
    class_order,
    eq5_relative_error,
    operator_blocks,
    perturbation_operator,
    theorem_spectrum,
)
from nclightning.perturbation.pair import (
    BASELINES,
    DEFAULT_NORMALIZATION,
    FIT_METRICS,
    LINEARISATION_TOLERANCE,
    PERTURBATIVE_FACTOR,
    RESIDUAL_KEYS,
    STATUSES,
    PairFit,
    fit_pair,
    linearisation_error,
)
from nclightning.perturbation.solver import (
    DEFAULT_TOL,
    ConvergenceWarning,
    SolveResult,
    objective,
    solve,
)
from nclightning.perturbation.ufm import ufm_minimizer

__all__ = [
    "BASELINES",
    "DEFAULT_COUPLING_RANGE",
    "DEFAULT_NORMALIZATION",
    "DEFAULT_TOL",
    "FIT_METRICS",
    "LINEARISATION_TOLERANCE",
    "NORMALIZATIONS",
    "PERTURBATIVE_FACTOR",
    "RESIDUAL_KEYS",
    "STATUSES",
    "ConvergenceWarning",
    "FlowTrajectory",
    "PairFit",
    "SolveResult",
    "block_singular_values",
    "central_path_flow",
    "central_path_loss",
    "class_order",
    "eq5_relative_error",
    "fit_pair",
    "linearisation_error",
    "objective",
    "operator_blocks",
    "optimal_classifier",
    "perturbation_operator",
    "solve",
    "theorem_spectrum",
    "ufm_minimizer",
    "ufm_scale",
]
