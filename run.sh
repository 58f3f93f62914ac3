#!/usr/bin/env bash
# AMT end to end: corpus -> SentencePiece BPE -> binarize -> AMT pretraining -> evaluation.
#
#   ./run.sh                          the embedded default: Penn Treebank, amt_tiny, CPU, minutes
#   ./run.sh --arch amt_small --max-update 20000 --out runs/small
#   ./run.sh --corpus DIR             DIR holds train.txt, valid.txt, test.txt (one line each)
#   ./run.sh -- --masker-lr 3e-4      everything after -- goes to fairseq-train
#
# Every stage writes into --out and is skipped when its output exists; pretraining resumes from
# its last checkpoint. Defaults can also come from the environment (AMT_OUT, AMT_ARCH, ...).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$root/.venv/bin/python" ]; then
  export PATH="$root/.venv/bin:$PATH"
fi

out=${AMT_OUT:-runs/default}
corpus=${AMT_CORPUS:-ptb}
vocab_size=${AMT_VOCAB_SIZE:-8000}
arch=${AMT_ARCH:-amt_tiny}
strategy=${AMT_MASKING_STRATEGY:-learned}
max_update=${AMT_MAX_UPDATE:-600}
tokens_per_sample=${AMT_TOKENS_PER_SAMPLE:-128}
batch_size=${AMT_BATCH_SIZE:-32}
lr=${AMT_LR:-5e-4}
masker_lr=${AMT_MASKER_LR:-1e-3}
masker_warmup=${AMT_MASKER_WARMUP_UPDATES:-200}
device_flags=()

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "run.sh: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --corpus) corpus=$2; shift 2 ;;
    --vocab-size) vocab_size=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    --masking-strategy) strategy=$2; shift 2 ;;
    --max-update) max_update=$2; shift 2 ;;
    --cpu) device_flags+=(--cpu); shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (see ./run.sh --help; fairseq-train options go after --)" ;;
  esac
done
extra_train_args=("$@")
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  device_flags=(--cpu)
fi

banner() { printf '\n=== %s\n' "$*"; }
mkdir -p "$out" 2>/dev/null && [ -w "$out" ] || die "output directory '$out' is not writable"

# 1. corpus ----------------------------------------------------------------------------------
text="$out/text"
if [ ! -s "$text/test.txt" ]; then
  banner "corpus: $corpus -> $text"
  if [ "$corpus" = ptb ]; then
    python "$root/scripts/prepare_corpus.py" ptb "$text.partial"
  else
    for split in train valid test; do
      [ -s "$corpus/$split.txt" ] || die "corpus '$corpus' has no non-empty $split.txt"
    done
    mkdir -p "$text.partial" && cp "$corpus"/{train,valid,test}.txt "$text.partial/"
  fi
  rm -rf "$text" && mv "$text.partial" "$text"
else
  banner "corpus: $text exists, skipped"
fi

# 2. BPE --------------------------------------------------------------------------------------
bpe="$out/bpe"
if [ ! -s "$bpe/test.bpe" ]; then
  banner "BPE: SentencePiece, $vocab_size pieces -> $bpe"
  mkdir -p "$bpe"
  python "$root/scripts/spm_bpe.py" train --input "$text/train.txt" \
    --model-prefix "$bpe/spm" --vocab-size "$vocab_size"
  python "$root/scripts/spm_bpe.py" encode --model "$bpe/spm.model" \
    "$text/train.txt" "$bpe/train.bpe" "$text/valid.txt" "$bpe/valid.bpe" \
    "$text/test.txt" "$bpe/test.bpe"
else
  banner "BPE: $bpe exists, skipped"
fi

# 3. binarize ---------------------------------------------------------------------------------
bin="$out/bin"
if [ ! -s "$bin/test.idx" ]; then
  banner "binarize: fairseq-preprocess -> $bin"
  rm -rf "$bin.partial"
  fairseq-preprocess --only-source --trainpref "$bpe/train.bpe" --validpref "$bpe/valid.bpe" \
    --testpref "$bpe/test.bpe" --destdir "$bin.partial" --workers "$(nproc)"
  rm -rf "$bin" && mv "$bin.partial" "$bin"
else
  banner "binarize: $bin exists, skipped"
fi

# 4. pretrain ---------------------------------------------------------------------------------
ckpt="$out/checkpoints"
banner "pretrain: $arch, $strategy masking, $max_update updates -> $ckpt (resumes if present)"
fairseq-train "$bin" --user-dir "$root/amt_plugin" \
  --task adversarial_masked_lm --criterion adversarial_masked_lm --arch "$arch" \
  --masking-strategy "$strategy" --masker-warmup-updates "$masker_warmup" \
  --optimizer amt_adam --lr "$lr" --masker-lr "$masker_lr" --weight-decay 0.01 \
  --adam-betas '(0.9,0.98)' --adam-eps 1e-6 --clip-norm 1.0 \
  --lr-scheduler polynomial_decay --warmup-updates $((max_update / 10)) \
  --total-num-update "$max_update" --max-update "$max_update" \
  --tokens-per-sample "$tokens_per_sample" --sample-break-mode complete \
  --batch-size "$batch_size" --skip-invalid-size-inputs-valid-test \
  --save-dir "$ckpt" --save-interval-updates 200 --keep-interval-updates 1 --no-epoch-checkpoints \
  --log-format simple --log-interval 50 --tensorboard-logdir "$out/tensorboard" \
  --seed 1 --num-workers 0 "${device_flags[@]}" "${extra_train_args[@]}"

# 5. evaluate ---------------------------------------------------------------------------------
banner "evaluate: fairseq-validate on $ckpt/checkpoint_last.pt (valid, test)"
fairseq-validate "$bin" --user-dir "$root/amt_plugin" --path "$ckpt/checkpoint_last.pt" \
  --task adversarial_masked_lm --criterion adversarial_masked_lm --valid-subset valid,test \
  --batch-size "$batch_size" --skip-invalid-size-inputs-valid-test "${device_flags[@]}" \
  2>&1 | tee "$out/validate.log" | grep -E '\| (valid|test) \|' || true
echo "run.sh: done; logs and checkpoints in $out"
