#!/bin/sh
# On a machine with a GPU, in one go: the GPU paths against the CPU ones (tests/test_cuda.py),
# then the GPU benchmarks, in the order given (default: end_to_end decode pretrain_step), each
# section written to BENCHMARKS.md as soon as it is measured. The benchmarks run even if a
# test fails; the exit status is non-zero if either did. PYTHON names the interpreter (make
# gpu-check passes the project's .venv).
PY=$(command -v "${PYTHON:-python3}") || { echo "gpu_check: no ${PYTHON:-python3}" >&2; exit 2; }
case $PY in /*) ;; *) PY=$(pwd)/$PY ;; esac
cd "$(dirname "$0")/.." || exit 2
"$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' ||
    { echo "gpu_check: torch sees no CUDA GPU here; nothing to check" >&2; exit 2; }
[ $# -eq 0 ] && set -- end_to_end decode pretrain_step
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
tests=$?
"$PY" -m bench.run --only "$@" --out BENCHMARKS.md
benches=$?
[ "$tests" -eq 0 ] && [ "$benches" -eq 0 ]
