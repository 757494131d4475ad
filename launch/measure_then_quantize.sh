#!/usr/bin/env bash
# Measure on N ranks -> merge -> quantize on M ranks, for one unmodified script. See measure_then_quantize.py.
#
#   launch/measure_then_quantize.sh --measure-config measure.json --quantize-config quant.json \
#       --measure-ranks 2 --quantize-ranks 1 [--launcher deepspeed|mpirun] your_script.py [its args...]
#
# Uses $PYTHON if set, else the python on PATH (activate the venv that has ds_quant and deepspeed).
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/measure_then_quantize.py" "$@"
