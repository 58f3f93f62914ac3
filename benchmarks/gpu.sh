#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a CUDA build of torch and no network:
#
#   benchmarks/gpu.sh OUTDIR [gpu_throughput.py options]
#
# If fairseq does not import, it is installed with its four pure-Python dependencies from the
# wheels in wheels/ (fetch them beforehand, on a machine with network, with
# scripts/download_wheels.sh) into a temporary directory put on PYTHONPATH. Then, the
# measurements first: benchmarks/gpu_throughput.py with the options given (default:
# --numerics --profile --time-budget 360, i.e. the throughput table, where a step's time goes
# and the bf16-against-fp32 curves, the decisive rows first), benchmarks/predictor_step.py at
# base shape (60 s at most); then the unit tests (150 s at most: this Python and torch, every
# strategy and the compiled paths on CUDA). Under 10 minutes in all on an H100. Everything
# lands in OUTDIR as it is measured. The corpus is kept in $TMPDIR, so a second call on the
# machine reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu.sh OUTDIR [gpu_throughput.py options]}
shift
mkdir -p "$out"
python=${PYTHON:-python3}

if ! "$python" -c "import fairseq" 2>/dev/null; then
    site=$(mktemp -d)
    ls wheels/*.whl >/dev/null 2>&1 || {
        echo "fairseq is not installed and wheels/ has no wheels: run scripts/download_wheels.sh" >&2
        exit 2
    }
    "$python" -m pip install --quiet --no-index --no-deps --target "$site" wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$python" -c "import sys, torch, fairseq; print(sys.version.split()[0], torch.__version__, fairseq.__version__)"
    "$python" -c "from torch.utils._triton import has_triton; print('triton (for --torch-compile):', has_triton())"
} | tee "$out/machine.txt"
# no options: everything that fits in 360 s, most decisive first (see gpu_throughput.py);
# or choose, e.g. --rows fp16 --numerics --time-budget 400 for what a first run had to skip
[ $# -gt 0 ] || set -- --numerics --profile --time-budget 360
"$python" benchmarks/gpu_throughput.py --json "$out/gpu.json" \
    --corpus-dir "${TMPDIR:-/tmp}/amt-gpu-corpus" "$@" \
    2> "$out/gpu-runs.log" | tee "$out/gpu.md"
# the predictor alone against fairseq's RobertaEncoder, same weights
if "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    timeout 60 "$python" benchmarks/predictor_step.py --arch amt_base --batch 32 \
        2>> "$out/gpu-runs.log" | tee -a "$out/predictor.md" || true
fi
# last, within what is left: a failing or unfinished test is reported in unit-tests.txt
timeout 150 "$python" -m pytest -q -p no:logging tests/unit 2>&1 | tee "$out/unit-tests.txt" \
    | tail -3 || true
