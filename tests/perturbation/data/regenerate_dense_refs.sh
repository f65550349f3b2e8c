#!/usr/bin/env bash
# Recompute tests/perturbation/data/dense_refs.pt: the dense minimisations of Eq. 2 that the
# perturbation tests compare against (tests/perturbation/conftest.py, StoredDense). Runs every
# perturbation test (slow ones included) with the file removed, so each reference is computed
# afresh by scipy L-BFGS + Newton, and stores the ones the session used.
set -euo pipefail
cd "$(dirname "$0")/../../.."
rm -f tests/perturbation/data/dense_refs.pt
NCL_WRITE_DENSE_REFS=1 OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider \
    -W "ignore:a dense reference is not stored" tests/perturbation
ls -l tests/perturbation/data/dense_refs.pt
