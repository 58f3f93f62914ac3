#!/usr/bin/env bash
# Wheels for a GPU machine without network that has Python 3.12 and a CUDA torch but not
# fairseq: fairseq-fixed and its pure-Python dependencies (about 21 MB), into wheels/
# (git-ignored). benchmarks/gpu.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
"$python" -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d wheels \
    fairseq-fixed==0.12.3.1 hydra-core==1.3.2 omegaconf==2.3.0 bitarray
# omegaconf 2.3 needs antlr 4.9, published only as a source archive: build its (pure-Python)
# wheel here
"$python" -m pip wheel --no-deps -w wheels antlr4-python3-runtime==4.9.3
ls -l wheels
