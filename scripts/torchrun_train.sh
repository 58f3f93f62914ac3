#!/usr/bin/env bash
# Run fairseq-train under torchrun (one process per GPU, or per CPU rank with gloo).
#
#   torchrun --nproc-per-node 8 --no-python scripts/torchrun_train.sh DATA --user-dir amt_plugin ...
#   torchrun --nnodes 2 --node-rank $N --master-addr HOST --nproc-per-node 8 --no-python \
#     scripts/torchrun_train.sh DATA ...
#
# fairseq infers a process's rank from the device count when it is started by torchrun
# (rank % torch.cuda.device_count()), which breaks on CPU and on partial GPU sets. torchrun
# already exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT: this passes them
# to fairseq explicitly and lets fairseq initialise the process group from the environment.
#
# FAIRSEQ_TRAIN, if set, is the command run instead of fairseq-train (a wrapper that takes
# fairseq-train's arguments).
set -euo pipefail
: "${RANK:?run me under torchrun}" "${WORLD_SIZE:?}" "${LOCAL_RANK:?}"
read -ra train <<< "${FAIRSEQ_TRAIN:-fairseq-train}"
exec "${train[@]}" "$@" \
  --distributed-world-size "$WORLD_SIZE" --distributed-rank "$RANK" \
  --device-id "$LOCAL_RANK" --distributed-init-method env:// --distributed-no-spawn
