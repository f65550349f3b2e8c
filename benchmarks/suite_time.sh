#!/usr/bin/env bash
# The test suite's time, for the README: runs pytest (default: the fast suite, -m 'not slow')
# with the 25 slowest tests listed, then prints its wall time, the CPU time of pytest and the
# processes it started (user + sys), and the machine's load average before and after.
#
# The suite runs one test at a time on one intra-op thread (tests/conftest.py), so on a quiet
# machine its wall time is about its CPU time (a little less: the DDP tests' two processes
# overlap); under load the wall time grows and the CPU time does not, so the CPU time is the
# number to quote from a busy machine.
#
#   benchmarks/suite_time.sh                 # python -m pytest -m 'not slow'
#   benchmarks/suite_time.sh tests/metrics   # any pytest arguments replace the default
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(-m "not slow")
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
TIMEFORMAT='suite_time: wall %R s, cpu %U s user + %S s sys'
status=0
time python -m pytest -q -p no:cacheprovider --durations=25 "${args[@]}" || status=$?
echo "suite_time: load average before ${load_before}, after $(cut -d' ' -f1-3 /proc/loadavg)" \
    "on $(nproc) CPUs; pytest arguments: ${args[*]}"
exit "$status"
