#!/bin/sh
# On a machine with a GPU, in one go: the GPU paths against the CPU ones (tests/test_cuda.py),
# then the GPU benchmarks, whose sections replace their GPU rows in BENCHMARKS.md.
# PYTHON names the interpreter (make gpu-check passes the project's .venv).
set -e
PY=${PYTHON:-python3}
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
"$PY" -m bench.run --only pretrain_step decode end_to_end --out BENCHMARKS.md
