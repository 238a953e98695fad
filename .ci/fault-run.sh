#!/usr/bin/env bash
# The bounded randomised fault run of issues 4 and 15 (a minute): random SIGKILLs, SIGSTOPs, failed
# respawns, timeouts, exceptions, task KeyboardInterrupt/SystemExit, unpicklable results, full
# shared memory, cancelled run() bursts and slow or raising inputs
# and retries over many maps; exits 1 if any task is lost, wrong, or a process leaks.
set -euo pipefail
python -m orchestra_nb.testing.fault_run --seconds "${FAULT_RUN_SECONDS:-60}" --seed "${FAULT_RUN_SEED:-$RANDOM}"
