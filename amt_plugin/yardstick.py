"""The comparable yardstick: fixed-mask loss against a context-free reference.

Losses under each run's own masks are not comparable (a masker that picks hard tokens has a
higher loss by design), so validation also scores the predictor on a *fixed* uniformly random
mask (`masking.fixed_mask`: 15%, seeded per sample id, the same positions in every run), with
every scored position's input replaced by `<mask>`. The predictor then sees nothing of the
token it predicts, only its context, and the best a model without context can do there is the
token distribution itself. The reference is therefore exact and cheap: the unigram model of the
training split over the same dictionary (fairseq's dictionary counts are the training split's),
add-one smoothed over the maskable types,

    ref(t) = -log2 (count(t) + 1) / (sum_u count(u) + |maskable types|),

scored on the same positions. `fixed_mask_below_ref` = reference - loss, in bits: how much
the predictor learned from context. Zero or less means it learned none (the "unigram plateau").

Everything is reported overall and per frequency bucket of the dictionary (the 100 most frequent
types, the next 900, the rest).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from fairseq import metrics
from torch import Tensor

from . import masking

# Frequency buckets, by the type's rank in the dictionary's counts (0 = most frequent)
BUCKETS = {"top100": (0, 100), "next900": (100, 1000), "rest": (1000, None)}


def frequency_rank(counts: Tensor, is_special: Tensor) -> Tensor:
    """(V,) rank of every type by its count, most frequent 0; special symbols rank last."""
    c = counts.double().masked_fill(is_special, -1.0)
    order = c.argsort(descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank


def unigram_nll(counts: Tensor, is_special: Tensor) -> Tensor:
    """(V,) -ln p(t) under the add-one unigram model of the maskable types (nats; +inf for
    special symbols, which are never scored)."""
    c = counts.double().masked_fill(is_special, 0.0) + (~is_special).double()
    nll = c.sum().log() - c.log()
    return nll.masked_fill(is_special, math.inf).float()


@torch.no_grad()
def score(model, tokens: Tensor, candidates: Tensor, sample_ids: Tensor, mask_prob: float,
          seed: int, mask_idx: int, freq_rank: Tensor, ref_nll: Tensor) -> dict[str, Tensor]:
    """Sums for one batch: the predictor's and the reference's loss (nats) and the predictor's
    correct guesses on the fixed mask, overall and per bucket."""
    mask = masking.fixed_mask(tokens, candidates, sample_ids, mask_prob, seed)  # (B, T)
    corrupted = tokens.masked_fill(mask, mask_idx)
    logits = model(corrupted, masked_tokens=mask)[0].float()  # (M, V)
    targets = tokens[mask]  # (M,)
    nll = F.cross_entropy(logits, targets, reduction="none")  # (M,) nats
    ref = ref_nll[targets]  # (M,) nats
    correct = logits.argmax(-1) == targets
    out = {"fixed_n": targets.numel(), "fixed_nll": nll.sum(), "fixed_ref": ref.sum(),
           "fixed_correct": correct.sum()}
    rank = freq_rank[targets]
    for name, (lo, hi) in BUCKETS.items():
        inside = (rank >= lo) & (rank < hi) if hi is not None else rank >= lo
        out[f"fixed_n_{name}"] = inside.sum()
        out[f"fixed_nll_{name}"] = (nll * inside).sum()
        out[f"fixed_ref_{name}"] = (ref * inside).sum()
        out[f"fixed_correct_{name}"] = (correct & inside).sum()
    return out


def log_metrics(sums: dict[str, float]) -> None:
    """Logs fixed_mask_{loss,ref_loss,below_ref,acc}[_BUCKET] (bits) from `score`'s sums."""
    fixed_n = sums.get("fixed_n", 0.0)
    if fixed_n <= 0:
        return
    for suffix, n in [("", fixed_n)] + [(f"_{b}", sums.get(f"fixed_n_{b}", 0.0))
                                        for b in BUCKETS]:
        if suffix:
            metrics.log_scalar(f"fixed_mask_share{suffix}", n / fixed_n, fixed_n, round=4)
        if n <= 0:
            continue
        loss = sums[f"fixed_nll{suffix}"] / n / math.log(2)
        ref = sums[f"fixed_ref{suffix}"] / n / math.log(2)
        metrics.log_scalar(f"fixed_mask_loss{suffix}", loss, n, round=3)
        metrics.log_scalar(f"fixed_mask_ref_loss{suffix}", ref, n, round=3)
        metrics.log_scalar(f"fixed_mask_below_ref{suffix}", ref - loss, n, round=3)
        metrics.log_scalar(f"fixed_mask_acc{suffix}", sums[f"fixed_correct{suffix}"] / n, n,
                           round=4)
