#!/usr/bin/env bash
# AMT end to end: corpus -> BPE -> binarize -> AMT pretraining -> export -> GLUE -> results.
#
#   ./run.sh                               the embedded default: PTB, amt_tiny, offline proxy tasks
#   ./run.sh --compare random              the same with random masking, side by side
#   ./run.sh --config amt_small --corpus wikitext-103 --download-glue --glue-update-scale 0.1
#   ./run.sh --help                        every option
#
# Uses .venv/ when it exists (scripts/setup.sh makes it). Every stage writes under --out
# (default runs/default), is skipped when done, and pretraining resumes from its checkpoint.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$root/.venv/bin/python" ]; then
  export PATH="$root/.venv/bin:$PATH"
fi
exec python "$root/scripts/pipeline.py" "$@"
