"""Which positions get masked, and how: pure torch, no fairseq.

Everything here works on a padded batch `tokens (B, T)` and a boolean `candidates (B, T)`
(True = this position may be masked; never pad, bos, eos or other special symbols).

- `budget`: exactly `k = max(1, round(mask_prob * n))` units per sequence of `n` candidates.
- `true_positions`: where the mask is, without a host-device sync when its size is known.
- `symbol_starts_word`, `word_starts` / `from_word_start`: whole-word mode, where the unit is
  a word and a chosen word masks all of its pieces.
- `uniform_select`: `k` units uniformly without replacement (fairseq's random masking).
- `gumbel_top_k`: `k` units without replacement from softmax(logits / temperature), plus the
  exact Plackett-Luce log-probability of the ordered draw (the masker's policy gradient).
- `span_select`, `frequency_logits`: the SpanBERT-style and inverse-frequency baselines;
  `adaptive_weights`, `update_type_accuracy`: the adaptive one (types the predictor misses).
- `choose`: all of the above as one call: which positions a batch masks, by strategy.
- `corrupt`: the 80/10/10 rule of BERT / fairseq's `masked_lm` (<mask> / random / unchanged).
- `fixed_mask`: the comparable yardstick, a uniform mask fixed per sample id (scored with
  every chosen position replaced by <mask>, see the criterion).

Randomness always comes from an explicit `torch.Generator`, so a draw is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Stands in for -inf on positions that cannot be drawn. A finite value keeps logcumsumexp and its
# gradient free of inf - inf = nan; exp(NEG_INF - x) is exactly 0 in float32 for any sane logit.
NEG_INF = -1e9


def candidate_mask(tokens: Tensor, special_ids: Tensor) -> Tensor:
    """Positions that may be masked. tokens (B, T) -> (B, T) bool.

    special_ids: 1-D tensor of token ids that are never masked (pad, bos, eos, unk, <mask>, ...).
    """
    return ~torch.isin(tokens, special_ids.to(tokens.device))


def budget(n_units: Tensor, mask_prob: float) -> Tensor:
    """Units to mask per sequence: max(1, round(mask_prob * n)), and 0 where n == 0.

    n_units (B,) long -> k (B,) long. `round` is half-to-even, like Python's.
    """
    k = torch.round(n_units.double() * mask_prob).long().clamp(min=1)
    return torch.minimum(k, n_units)


def linear_schedule(start: float, end: float, step: int, first: int, last: int) -> float:
    """`start` until update `first`, then linearly to `end` at update `last`, then `end`:
    the masking rate decayed (Ankner et al., EACL 2024: 0.3 to 0.15) or the masker's random
    share annealed."""
    if last <= first or step >= last:
        return end
    if step <= first:
        return start
    return start + (end - start) * (step - first) / (last - first)


def true_positions(flags: Tensor, count: int) -> Tensor:
    """`flags.nonzero().squeeze(1)` for a 1-D bool tensor whose number of True entries,
    `count`, the host already knows: the same indices in the same order, without reading
    anything back from the device (nonzero's output size is a host-device sync). A wrong
    count fails a device-side assert instead of returning wrong positions."""
    torch._assert_async(flags.sum() == count,
                        "true_positions: the host's count of masked positions is wrong")
    is_true = flags.long()
    # a permutation: the True entries to slots 0..count-1, the others after them, in order
    slot = torch.where(flags, is_true.cumsum(0) - 1, count + (1 - is_true).cumsum(0) - 1)
    order = torch.arange(flags.numel(), device=flags.device)
    return torch.empty_like(order).scatter_(0, slot, order)[:count]


def symbol_starts_word(symbols: list[str], gpt2_encoder: dict[str, int] | None = None
                       ) -> list[bool]:
    """Does each dictionary symbol begin a word? SentencePiece pieces do when they start with
    U+2581. With GPT-2 BPE (`gpt2_encoder`: its encoder.json) the symbols are GPT-2 token ids
    written as text, and a token begins a word when its byte-level form starts with a space
    (U+0120); a symbol that is not an id counts as a word of its own."""
    if gpt2_encoder is None:
        return [s.startswith("\u2581") for s in symbols]
    token = {i: t for t, i in gpt2_encoder.items()}
    return [not s.isdigit() or token.get(int(s), "").startswith("\u0120") for s in symbols]


def word_starts(tokens: Tensor, candidates: Tensor, is_word_start: Tensor) -> Tensor:
    """Positions that begin a word. (B, T) bool.

    is_word_start: (V,) bool over the vocabulary (fairseq's `get_whole_word_mask`). A candidate
    that follows a non-candidate (bos, or a block cut mid-word) also starts a word, so every
    candidate belongs to exactly one word.
    """
    starts = is_word_start.to(tokens.device)[tokens] & candidates
    after_gap = torch.ones_like(candidates)
    after_gap[:, 1:] = ~candidates[:, :-1]
    return candidates & (starts | after_gap)


def from_word_start(values: Tensor, starts: Tensor) -> Tensor:
    """Give every position the value at the start of its word. (B, T) -> (B, T).

    In whole-word mode this spreads a choice made on word starts (or a draw made there) to
    every piece of the word. Callers AND the result with the candidates where it matters.
    """
    B, T = starts.shape
    pos = torch.arange(T, device=starts.device).expand(B, T)
    # index of the word start each position belongs to: running max of start positions
    start_of = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values  # (B, T)
    return values.gather(1, start_of)


def _top_k_rows(keys: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Sort keys (B, T) descending; return the order and a (B, T) mask of the first k[b] slots."""
    order = keys.argsort(dim=1, descending=True, stable=True)  # (B, T)
    slot = torch.arange(keys.size(1), device=keys.device)
    in_top = slot.unsqueeze(0) < k.unsqueeze(1)  # (B, T), over sorted slots
    return order, in_top


def _scatter_slots(order: Tensor, in_top: Tensor) -> Tensor:
    """Positions (B, T) bool that the sorted slots marked in_top point to."""
    return torch.zeros_like(in_top).scatter(1, order, in_top)


def uniform_select(candidates: Tensor, k: Tensor, generator: torch.Generator) -> Tensor:
    """k[b] candidate positions per row, uniformly without replacement. (B, T) bool."""
    noise = torch.rand(candidates.shape, generator=generator, device=candidates.device)
    keys = torch.where(candidates, noise, torch.full_like(noise, -1.0))
    order, in_top = _top_k_rows(keys, k)
    return _scatter_slots(order, in_top)


@dataclass
class Draw:
    """A draw of k units without replacement from a masker's distribution."""

    selected: Tensor  # (B, T) bool, True = drawn
    log_prob: Tensor  # (B,) log-probability of the ordered draw; differentiable in the logits
    entropy: Tensor  # (B,) entropy (nats) of the single-draw distribution softmax(logits / tau)


def masked_log_softmax(logits: Tensor, candidates: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / temperature) over the candidates of each row; NEG_INF elsewhere."""
    scores = logits.float() / temperature
    scores = torch.where(candidates, scores, torch.full_like(scores, NEG_INF))
    return scores.log_softmax(dim=1)


def gumbel_top_k(
    logits: Tensor,
    candidates: Tensor,
    k: Tensor,
    temperature: float,
    generator: torch.Generator,
) -> Draw:
    """Draw k[b] candidates per row without replacement from softmax(logits / temperature).

    Gumbel-top-k: the k largest of `log p_i + Gumbel noise` are distributed exactly as k
    sequential draws without replacement (Plackett-Luce), in the order of their keys. The
    returned log-probability is that of the ordered draw,

        log P(c_1, ..., c_k) = sum_j [ s_{c_j} - logsumexp_{i not in c_<j} s_i ],  s = logits / tau,

    whose score function is an unbiased estimator of the gradient of E[reward(set)].
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device)
    return gumbel_top_k_from_uniform(logits, candidates, k, temperature, u)


def gumbel_top_k_from_uniform(
    logits: Tensor, candidates: Tensor, k: Tensor, temperature: float, u: Tensor
) -> Draw:
    """`gumbel_top_k` with its uniform draw u (B, T) in [0, 1) given: no generator, so
    torch.compile can trace it whole (the criterion compiles it under --torch-compile)."""
    log_p = masked_log_softmax(logits, candidates, temperature)  # (B, T)
    gumbel = -torch.log(-torch.log(u.clamp(min=1e-20, max=1.0 - 1e-7)))
    keys = torch.where(candidates, log_p.detach() + gumbel, torch.full_like(log_p, 2 * NEG_INF))
    order, in_top = _top_k_rows(keys, k)  # order (B, T), in_top (B, T) over slots

    s_sorted = log_p.gather(1, order)  # (B, T) scores in draw order, non-candidates last
    # logsumexp over what is still available at step j = all slots j..T-1 (a reverse cumulative)
    remaining = s_sorted.flip(1).logcumsumexp(dim=1).flip(1)  # (B, T)
    step_log_prob = torch.where(in_top, s_sorted - remaining, torch.zeros_like(s_sorted))

    p = log_p.exp()
    entropy = -(p * torch.where(candidates, log_p, torch.zeros_like(log_p))).sum(dim=1)
    return Draw(_scatter_slots(order, in_top), step_log_prob.sum(dim=1), entropy)


def corrupt(
    tokens: Tensor,
    mask: Tensor,
    mask_idx: int,
    replacement_ids: Tensor,
    leave_unmasked_prob: float,
    random_token_prob: float,
    generator: torch.Generator,
    starts: Tensor | None = None,
) -> Tensor:
    """The predictor's input: masked positions become <mask> / a random token / stay unchanged.

    With the defaults (0.1, 0.1) that is 80/10/10, decided per position, or per word when
    `starts` (whole-word mode) is given, as fairseq's MaskTokensDataset does.
    replacement_ids: 1-D tensor of ids a random replacement is drawn from (no specials).
    Returns a new (B, T) tensor; `tokens` is not modified.
    """
    u = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    if starts is not None:  # one decision per word: every piece takes its start's draw
        u = from_word_start(u, starts)
    r = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    return corrupt_with_draws(tokens, mask, u, r, mask_idx, replacement_ids,
                              leave_unmasked_prob, random_token_prob)


def span_select(
    units: Tensor, k: Tensor, generator: torch.Generator, p: float = 0.2, max_len: int = 10
) -> Tensor:
    """SpanBERT-style choice: spans of consecutive units until exactly k[b] are chosen.

    Span lengths ~ Geometric(p) clipped to max_len (mean ~3.8 with the defaults), starts
    uniform over the row's units; a span that would overshoot the budget is cut to fit.
    Consecutive means consecutive *units* (tokens, or words in whole-word mode). Runs per row
    on the CPU with a CPU generator: a baseline, not a hot path. (B, T) bool.
    """
    B, T = units.shape
    chosen = torch.zeros(B, T, dtype=torch.bool)
    units_cpu, k_cpu = units.cpu(), k.cpu().tolist()
    for b in range(B):
        idx = units_cpu[b].nonzero().squeeze(1)  # positions of this row's units, in order
        n, need = len(idx), k_cpu[b]
        taken = torch.zeros(n, dtype=torch.bool)
        while need > 0:
            u = torch.rand(2, generator=generator).tolist()
            length = min(max_len, 1 + int(math.log(1.0 - u[0]) / math.log(1.0 - p)))
            start = int(u[1] * n)
            span = [j for j in range(start, min(n, start + length)) if not taken[j]][:need]
            for j in span:
                taken[j] = True
            need -= len(span)
        chosen[b, idx[taken]] = True
    return chosen.to(units.device)


def frequency_logits(tokens: Tensor, counts: Tensor, exponent: float) -> Tensor:
    """Logits for choosing rare tokens: p(i) proportional to count(token_i) ** -exponent."""
    return -exponent * counts.to(tokens.device)[tokens].clamp(min=1).double().log().float()


def adaptive_weights(accuracy: Tensor, floor: float) -> Tensor:
    """The adaptive baseline's masking weight per type (AMLM, Edman & Fraser 2025): the
    predictor's running error rate on the type, 1 - accuracy, never below `floor`, so that
    every type keeps a chance. (V,) -> (V,); sampled in proportion within the exact budget."""
    return (1.0 - accuracy).clamp(min=floor)


def update_type_accuracy(accuracy: Tensor, targets: Tensor, correct: Tensor,
                         decay: float) -> Tensor:
    """The running top-1 accuracy per type, from one batch's masked targets (M,) and whether
    the predictor got each right (M,): for each type seen, decay * old + (1 - decay) * the
    batch's accuracy on it; unseen types keep theirs. On the device, no sync."""
    seen = torch.zeros_like(accuracy).index_add_(0, targets, torch.ones_like(targets,
                                                 dtype=accuracy.dtype))
    right = torch.zeros_like(accuracy).index_add_(0, targets, correct.to(accuracy.dtype))
    batch = right / seen.clamp(min=1)
    return torch.where(seen > 0, decay * accuracy + (1 - decay) * batch, accuracy)


STRATEGIES = ("learned", "random", "span", "frequency", "adaptive")


@dataclass
class Choice:
    """What one batch masks. mask (B, T): the positions corrupted and predicted. candidates
    (B, T), units (B, T): what the budget counts (the candidates, or the word starts in
    whole-word mode, then also `starts`), k (B,): units chosen per row. draw: the masker's
    Gumbel-top-k over its share of the units ("learned" only), for its policy gradient."""

    mask: Tensor
    candidates: Tensor
    units: Tensor
    starts: Tensor | None
    k: Tensor
    draw: Draw | None = None


def choose(
    tokens: Tensor,
    special_ids: Tensor,
    mask_prob: float,
    strategy: str,
    generator: torch.Generator,
    *,
    is_word_start: Tensor | None = None,
    draw_masker=None,
    random_share: float = 0.0,
    counts: Tensor | None = None,
    frequency_exponent: float = 1.0,
    type_weights: Tensor | None = None,
    span_p: float = 0.2,
    span_max_length: int = 10,
) -> Choice:
    """Choose exactly k = max(1, round(mask_prob * n)) of each row's n units (tokens, or whole
    words when `is_word_start` is given) by one strategy:

    - "learned": round(k * random_share) uniformly (exploration), the rest by
      `draw_masker(available, k, u) -> Draw`: the masker's Gumbel-top-k of k of the available
      units from the uniform draw u (B, T) (`gumbel_top_k_from_uniform` on its logits);
    - "random": uniformly (fairseq's masking, with this exact budget);
    - "span": SpanBERT-style spans (`span_select`);
    - "frequency": p(token) proportional to count ** -frequency_exponent (`counts`: (V,));
    - "adaptive": p(token) proportional to `type_weights` (V,) (`adaptive_weights`: the
      types the predictor still gets wrong).

    The criterion, scripts/show_masker.py and scripts/plot_masking.py all choose through here.
    The generator is read in a fixed order (the random share, then u), so a draw is
    reproducible from its seed.
    """
    candidates = candidate_mask(tokens, special_ids)
    starts = (word_starts(tokens, candidates, is_word_start)
              if is_word_start is not None else None)
    units = starts if starts is not None else candidates
    k = budget(units.sum(dim=1), mask_prob)
    draw = None
    if strategy == "learned":
        k_rand = torch.round(k.double() * random_share).long()
        chosen_rand = uniform_select(units, k_rand, generator)
        u = torch.rand(tokens.shape, generator=generator, device=tokens.device)
        draw = draw_masker(units & ~chosen_rand, k - k_rand, u)
        chosen = chosen_rand | draw.selected
    elif strategy == "random":
        chosen = uniform_select(units, k, generator)
    elif strategy == "span":  # on the CPU, from a seed drawn here
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        chosen = span_select(units, k, torch.Generator().manual_seed(seed), span_p,
                             span_max_length)
    elif strategy == "frequency":
        logits = frequency_logits(tokens, counts, frequency_exponent)
        chosen = gumbel_top_k(logits, units, k, 1.0, generator).selected
    elif strategy == "adaptive":
        logits = type_weights.to(tokens.device)[tokens].log()
        chosen = gumbel_top_k(logits, units, k, 1.0, generator).selected
    else:
        raise ValueError(f"unknown masking strategy '{strategy}'; one of {', '.join(STRATEGIES)}")
    mask = from_word_start(chosen, starts) & candidates if starts is not None else chosen
    return Choice(mask, candidates, units, starts, k, draw)


def fixed_mask(
    tokens: Tensor,
    candidates: Tensor,
    sample_ids: Tensor,
    mask_prob: float,
    seed: int = 0,
) -> Tensor:
    """A uniformly random mask that depends only on (seed, sample id, the sample's tokens).

    The comparable yardstick: the same positions for a sample in every run, whatever the batch
    it lands in, its padding, or the number of workers. Each row gets its own CPU generator,
    seeded by (seed, sample id), drawing over its own length. Returns mask (B, T) bool.
    """
    B, T = tokens.shape
    mask = torch.zeros(B, T, dtype=torch.bool)
    cand = candidates.cpu()
    for b, sid in enumerate(sample_ids.tolist()):
        pos = cand[b].nonzero().squeeze(1)
        n = int(pos[-1]) + 1 if len(pos) else 0  # the row up to its last candidate: no padding
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(sid))
        keys = torch.rand(n, generator=g)
        keys = torch.where(cand[b, :n], keys, torch.full_like(keys, 2.0))
        k = int(budget(cand[b].sum().view(1), mask_prob))
        mask[b, keys.argsort()[:k]] = True
    return mask.to(tokens.device)


def corrupt_with_draws(
    tokens: Tensor,
    mask: Tensor,
    u: Tensor,
    r: Tensor,
    mask_idx: int,
    replacement_ids: Tensor,
    leave_unmasked_prob: float,
    random_token_prob: float,
) -> Tensor:
    """80/10/10 corruption from given uniform draws u (which rule) and r (which token)."""
    keep = mask & (u < leave_unmasked_prob)
    randomise = mask & ~keep & (u < leave_unmasked_prob + random_token_prob)
    out = tokens.masked_fill(mask & ~keep & ~randomise, mask_idx)
    pick = (r * len(replacement_ids)).long().clamp(max=len(replacement_ids) - 1)
    return torch.where(randomise, replacement_ids.to(tokens.device)[pick], out)
