"""The masker's objective: its reward and its REINFORCE loss. Pure torch, no fairseq.

Per sequence b of the batch, over the positions S_b the masker chose:

    r_b      = mean CE of the predictor on S_b, detached (`adversarial_reward`)
    L_masker = -1/B' sum_b (r_b - rbar_b) log pi(S_b) - beta * 1/B' sum_b H_b  (`reinforce_loss`)

rbar_b is the leave-one-out mean reward of the batch's other acting sequences, or, where a
sequence acts alone, a running mean of past rewards (`running_mean`); H_b the entropy of the
masker's softmax over b's units; B' the sequences where the masker chose something. A new
objective is a new reward function here, composed in `masker_objective`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def adversarial_reward(loss_grid: Tensor, by_masker: Tensor) -> tuple[Tensor, Tensor]:
    """r_b: the predictor's mean loss (detached, per position in loss_grid (B, T)) on the
    positions the masker chose, by_masker (B, T); and which rows chose any (B,)."""
    n_by_masker = by_masker.sum(dim=1)  # (B,)
    reward = (loss_grid * by_masker).sum(dim=1) / n_by_masker.clamp(min=1)
    return reward, n_by_masker > 0


def masker_objective(loss_grid: Tensor, by_masker: Tensor, selected: Tensor, tokens: Tensor,
                     log_prob: Tensor, entropy: Tensor, reward_mean: Tensor,
                     entropy_weight: float, vocab_size: int) -> tuple[Tensor, Tensor, dict]:
    """The masker's REINFORCE loss from the predictor's detached loss per position,
    loss_grid (B, T), over the positions it chose (by_masker; `selected`: its units); the
    running mean of rewards updated with this batch (reward_mean: NaN while there is none);
    and the logged sums. No host reads and no generator: torch.compile traces all of it."""
    reward, acted = adversarial_reward(loss_grid, by_masker)  # (B,), (B,)
    loss = reinforce_loss(reward, log_prob, entropy, acted, entropy_weight, reward_mean)
    # collapse diagnostic: distinct types among the masker's picks in this batch
    picks_per_type = torch.zeros(vocab_size, dtype=torch.int32, device=tokens.device)
    picks_per_type.scatter_add_(0, tokens.flatten(), selected.flatten().int())
    logs = {
        "masker_loss": loss.detach() * tokens.size(0),
        "masker_reward": (reward * acted).sum(),
        "masker_acted": acted.sum(),
        "masker_entropy": entropy.detach().sum(),
        "masker_picks": selected.sum(),
        "masker_distinct": (picks_per_type > 0).sum(),
    }
    return loss, running_mean(reward_mean, reward, acted), logs


def reinforce_loss(
    reward: Tensor,
    log_prob: Tensor,
    entropy: Tensor,
    acted: Tensor,
    entropy_weight: float,
    fallback_baseline: Tensor | None = None,
) -> Tensor:
    """The masker's loss: -mean (r - baseline) * log pi(S) - beta * mean H.

    reward (B,) detached, log_prob (B,), entropy (B,), acted (B,) bool: which rows count.
    The baseline of a row is the mean reward of the other acting rows (leave-one-out). When
    a row acts alone it has no such baseline: it takes `fallback_baseline` (a scalar tensor,
    the running mean of past rewards) if given, else it gives no policy gradient.
    """
    reward = reward.detach().float()
    n = acted.sum().clamp(min=1)
    total = (reward * acted).sum()
    baseline = (total - reward) / (n - 1).clamp(min=1)  # (B,)
    has_baseline = acted & (n > 1)
    if fallback_baseline is not None:  # NaN until some batch had an acting row
        fallback = fallback_baseline.to(baseline)
        alone = acted & (n == 1) & ~fallback.isnan()
        baseline = torch.where(alone, fallback, baseline)
        has_baseline = has_baseline | alone
    advantage = torch.where(has_baseline, reward - baseline, torch.zeros_like(reward))
    policy = -(advantage * log_prob).sum() / n
    return policy - entropy_weight * (entropy * acted).sum() / n


def running_mean(previous: Tensor | None, reward: Tensor, acted: Tensor,
                 decay: float = 0.9) -> Tensor:
    """Exponential moving average of the acting rows' mean reward, on the device (no sync).
    A batch where no row acted leaves it unchanged; the first batch starts it."""
    reward = reward.detach().float()
    n = acted.sum()
    mean = (reward * acted).sum() / n.clamp(min=1)
    if previous is None:  # NaN: no running mean yet
        previous = torch.full_like(mean, float("nan"))
    updated = torch.where(previous.isnan(), mean, decay * previous + (1 - decay) * mean)
    return torch.where(n > 0, updated, previous)
