"""amt_plugin.masking: budgets, specials, 80/10/10, determinism, the Plackett-Luce log-prob."""

import itertools
import math

import pytest
import torch

from amt_plugin import masking
from amt_plugin.tasks.adversarial_masked_lm import block_budget

PAD, BOS, EOS, MASK = 1, 0, 2, 99
SPECIALS = torch.tensor([BOS, PAD, EOS, 3, MASK])


def batch(B: int = 32, T: int = 40, seed: int = 0) -> torch.Tensor:
    """Random rows: <s> w w ... </s> <pad> ..., lengths varying from 3 to T."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, MASK, (B, T), generator=g)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    tokens[:, 0] = BOS
    for b, n in enumerate(lengths.tolist()):
        tokens[b, n - 1] = EOS
        tokens[b, n:] = PAD
    return tokens


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mask_prob", [0.15, 0.5, 0.01])
def test_budget_is_exact_and_specials_are_never_selected(mask_prob):
    tokens = batch()
    cand = masking.candidate_mask(tokens, SPECIALS)
    n = cand.sum(1)
    k = masking.budget(n, mask_prob)
    assert torch.equal(k, torch.round(n * mask_prob).long().clamp(min=1))
    logits = torch.randn(tokens.shape, generator=gen(1))
    for selected in (
        masking.uniform_select(cand, k, gen(2)),
        masking.gumbel_top_k(logits, cand, k, 1.0, gen(3)).selected,
    ):
        assert torch.equal(selected.sum(1), k)
        assert not (selected & ~cand).any()
        assert not torch.isin(tokens[selected], SPECIALS).any()


def test_budget_rounds_like_python_and_has_floor_one():
    n = torch.tensor([0, 1, 3, 10, 13, 100])
    assert masking.budget(n, 0.15).tolist() == [0, 1, 1, 2, 2, 15]  # round(1.95)=2, 0.45->1
    assert masking.budget(torch.tensor([10]), 0.25).tolist() == [round(2.5)]  # half to even


@pytest.mark.parametrize("mask_prob", [0.15, 0.25, 0.5, 1.0])
def test_the_tasks_host_budget_is_the_criterions(mask_prob):
    # the task counts each block's budget on the host (the criterion's number of masked
    # positions, without a sync); it must agree with masking.budget on the device exactly,
    # ties of round() included (n = 10 at 0.25, n = 30 at 0.15)
    tokens = batch(B=256, T=60, seed=7)  # 1 to 58 candidates per row
    specials = set(SPECIALS.tolist())
    host = [block_budget(row.numpy(), SPECIALS.numpy(), mask_prob) for row in tokens]
    for row, k in zip(tokens, host):  # against the rule, written out in plain Python
        n = sum(int(t) not in specials for t in row)
        assert k == (0 if n == 0 else min(n, max(1, round(mask_prob * n))))
    # and the criterion's choice masks exactly that many, whatever the strategy
    for strategy in ("random", "frequency", "span"):
        choice = masking.choose(tokens, SPECIALS, mask_prob, strategy, gen(1),
                                counts=torch.arange(200, 0, -1))
        assert choice.mask.sum(1).tolist() == host


def test_whole_words_are_masked_whole_and_budget_counts_words():
    # vocabulary: ids >= 50 continue a word, ids < 50 start one
    is_start = torch.ones(100, dtype=torch.bool)
    is_start[50:MASK] = False
    tokens = batch(seed=5)
    cand = masking.candidate_mask(tokens, SPECIALS)
    starts = masking.word_starts(tokens, cand, is_start)
    k = masking.budget(starts.sum(1), 0.3)
    chosen = masking.uniform_select(starts, k, gen(4))
    mask = masking.from_word_start(chosen, starts) & cand
    assert torch.equal(chosen.sum(1), k)
    # a masked piece that continues a word has its predecessor masked too
    cont = mask & ~starts
    prev = torch.zeros_like(mask)
    prev[:, 1:] = mask[:, :-1]
    assert not (cont & ~prev).any()
    # and an unmasked start is never followed by a masked continuation
    nxt = torch.zeros_like(mask)
    nxt[:, :-1] = mask[:, 1:] & ~starts[:, 1:]
    assert not (nxt & ~mask & cand).any()


def test_corruption_is_80_10_10():
    B, T = 400, 500
    tokens = torch.randint(4, MASK, (B, T), generator=gen(0))
    mask = torch.rand(B, T, generator=gen(1)) < 0.5
    replacement = torch.arange(4, MASK)
    out = masking.corrupt(tokens, mask, MASK, replacement, 0.1, 0.1, gen(2))
    m = mask.sum().item()
    to_mask = (out == MASK) & mask
    unchanged = (out == tokens) & mask
    changed = mask & ~to_mask & ~unchanged
    assert to_mask.sum().item() / m == pytest.approx(0.8, abs=0.005)
    # a random replacement equals the original 1/95 of the time, so "unchanged" is ~0.1 + 0.1/95
    assert unchanged.sum().item() / m == pytest.approx(0.1 + 0.1 / 95, abs=0.004)
    assert changed.sum().item() / m == pytest.approx(0.1 - 0.1 / 95, abs=0.004)
    assert torch.equal(out[~mask], tokens[~mask])  # only selected positions change
    assert torch.isin(out[changed], replacement).all()


def test_draws_are_deterministic_given_the_generator():
    tokens = batch()
    cand = masking.candidate_mask(tokens, SPECIALS)
    k = masking.budget(cand.sum(1), 0.15)
    logits = torch.randn(tokens.shape, generator=gen(7))
    a = masking.gumbel_top_k(logits, cand, k, 1.0, gen(11))
    b = masking.gumbel_top_k(logits, cand, k, 1.0, gen(11))
    c = masking.gumbel_top_k(logits, cand, k, 1.0, gen(12))
    assert torch.equal(a.selected, b.selected) and torch.equal(a.log_prob, b.log_prob)
    assert not torch.equal(a.selected, c.selected)
    u1 = masking.uniform_select(cand, k, gen(3))
    assert torch.equal(u1, masking.uniform_select(cand, k, gen(3)))


def brute_force_ordered(p: list[float], order: tuple[int, ...]) -> float:
    """P(drawing `order` one by one without replacement from p), by the definition."""
    prob, left = 1.0, list(range(len(p)))
    for i in order:
        prob *= p[i] / sum(p[j] for j in left)
        left.remove(i)
    return prob


def test_log_prob_is_the_plackett_luce_probability_of_the_draw():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5, 0.0]])
    cand = torch.tensor([[True, True, True, True, False]])
    temperature = 0.7
    p = torch.softmax(logits[0, :4] / temperature, 0).tolist()
    k = torch.tensor([2])
    counts: dict[frozenset, int] = {}
    draws = 4000
    for s in range(draws):
        d = masking.gumbel_top_k(logits, cand, k, temperature, gen(s))
        chosen = tuple(d.selected[0].nonzero().squeeze(1).tolist())
        assert 4 not in chosen  # not a candidate
        # the log-prob is that of the pair in the order drawn: by descending Gumbel key, from
        # the same uniform draw the function made
        u = torch.rand(logits.shape, generator=gen(s))[0, :4]
        keys = torch.tensor(p).log() - torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
        drawn = tuple(keys.argsort(descending=True)[:2].tolist())
        assert set(drawn) == set(chosen)
        assert abs(d.log_prob.item() - math.log(brute_force_ordered(p, drawn))) < 1e-5
        counts[frozenset(chosen)] = counts.get(frozenset(chosen), 0) + 1
    # and the sets come out with the brute-force set probabilities
    for pair in itertools.combinations(range(4), 2):
        expected = sum(brute_force_ordered(p, o) for o in itertools.permutations(pair))
        seen = counts.get(frozenset(pair), 0) / draws
        assert seen == pytest.approx(expected, abs=4 * math.sqrt(expected / draws) + 1e-3)


def test_single_draw_log_prob_and_entropy_match_softmax():
    logits = torch.randn(3, 6, generator=gen(0))
    cand = torch.ones(3, 6, dtype=torch.bool)
    cand[0, :2] = False
    d = masking.gumbel_top_k(logits, cand, torch.tensor([1, 1, 1]), 1.0, gen(1))
    logp = masking.masked_log_softmax(logits, cand, 1.0)
    assert torch.allclose(d.log_prob, logp[d.selected])
    p = logp.exp() * cand
    assert torch.allclose(d.entropy, -(p * logp.where(cand, torch.zeros(()))).sum(1))
    assert torch.allclose(d.entropy[1], torch.distributions.Categorical(logits=logits[1]).entropy())


def test_log_prob_gradient_is_finite_with_excluded_positions_and_full_budgets():
    logits = torch.randn(4, 10, generator=gen(0), requires_grad=True)
    cand = torch.rand(4, 10, generator=gen(1)) < 0.6
    cand[0] = False  # a row with nothing to choose
    k = cand.sum(1)  # everything selectable is chosen
    d = masking.gumbel_top_k(logits, cand, k, 0.5, gen(2))
    d.log_prob.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(d.selected, cand)


def test_spans_are_contiguous_runs_of_units_within_budget():
    tokens = batch(B=64, T=60, seed=3)
    cand = masking.candidate_mask(tokens, SPECIALS)
    k = masking.budget(cand.sum(1), 0.3)
    chosen = masking.span_select(cand, k, gen(0))
    assert torch.equal(chosen.sum(1), k) and not (chosen & ~cand).any()
    # runs of chosen positions are longer than uniform choice would give
    starts = chosen & ~torch.cat([torch.zeros(64, 1, dtype=torch.bool), chosen[:, :-1]], 1)
    assert chosen.sum() / starts.sum() > 2.0


def test_frequency_strategy_prefers_rare_types():
    counts = torch.ones(100)
    counts[4:50] = 1000.0  # ids 4..49 frequent, 50..98 rare
    tokens = batch(B=200, seed=4)
    cand = masking.candidate_mask(tokens, SPECIALS)
    k = masking.budget(cand.sum(1), 0.15)
    logits = masking.frequency_logits(tokens, counts, exponent=1.0)
    chosen = masking.gumbel_top_k(logits, cand, k, 1.0, gen(0)).selected
    rare_share_chosen = (tokens[chosen] >= 50).float().mean()
    rare_share_all = (tokens[cand] >= 50).float().mean()
    assert rare_share_chosen > 0.95 > rare_share_all


def test_fixed_mask_depends_only_on_the_sample_not_its_batch_or_padding():
    tokens = batch(B=6, T=30, seed=6)
    cand = masking.candidate_mask(tokens, SPECIALS)
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    mask = masking.fixed_mask(tokens, cand, ids, 0.15, seed=0)
    # the same samples, in another order, with extra padding, in a smaller batch
    order = [4, 1]
    padded = torch.cat([tokens[order], torch.full((2, 9), PAD)], dim=1)
    cand2 = masking.candidate_mask(padded, SPECIALS)
    mask2 = masking.fixed_mask(padded, cand2, ids[order], 0.15, seed=0)
    assert torch.equal(mask2[:, :30], mask[order]) and not mask2[:, 30:].any()
    assert torch.equal(mask.sum(1), masking.budget(cand.sum(1), 0.15))
    assert not (mask & ~cand).any()
    other = masking.fixed_mask(tokens, cand, ids, 0.15, seed=1)
    assert not torch.equal(other, mask)
