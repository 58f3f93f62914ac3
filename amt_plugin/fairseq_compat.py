"""fairseq (2024 main, as fairseq-fixed 0.12.3.1) on current torch and numpy.

Two workarounds, applied once when the plugin is imported:

1. Checkpoints on torch >= 2.6, with weights-only unpickling kept on. torch 2.6 made
   `torch.load(..., weights_only=True)` the default; fairseq calls `torch.load` without the
   argument, so its own checkpoints stop loading (`fairseq-validate`, `--restore-file`,
   `from_pretrained`). The common fix, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, turns the
   protection off for every load in the process. Instead we allow-list exactly the
   non-tensor, non-container types a fairseq checkpoint pickles. There is one:
   `argparse.Namespace`: the model config (`cfg["model"]`) of argparse-configured models such
   as RoBERTa and `amt`, and the `args` of checkpoints written by older fairseq (the published
   RoBERTa models among them). Anything else in a checkpoint is still refused
   (tests/e2e/test_checkpoint_loading.py checks both directions on a real checkpoint).

2. `--sample-break-mode eos` on numpy 2: fairseq's data/token_block_dataset.py builds its
   index with `np.compat.long`, and numpy 2 removed `np.compat`. We give numpy back that one
   alias (`np.compat.long` was `np.int64` on every platform fairseq supports) when, and only
   when, numpy lacks it.
"""

import argparse
import types

import numpy as np
import torch

FAIRSEQ_CHECKPOINT_TYPES = [argparse.Namespace]


def allow_fairseq_checkpoints() -> None:
    """Allow-list fairseq's checkpoint types for torch's weights-only loading (idempotent)."""
    if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
        torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_TYPES)


def restore_numpy_compat_long() -> None:
    try:
        np.compat.long  # noqa: B018  (numpy 1.x: present, leave it alone)
    except AttributeError:
        np.compat = types.SimpleNamespace(long=np.int64)


def apply() -> None:
    allow_fairseq_checkpoints()
    restore_numpy_compat_long()
