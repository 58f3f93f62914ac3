"""The fixed-mask yardstick and its context-free reference (amt_plugin/yardstick.py)."""

import math

import torch
from fairseq import metrics

from amt_plugin import yardstick
from tests.conftest import make_sample


def test_unigram_reference_matches_a_hand_count():
    # types 0-1 special; counts 5, 3, 0 for the three maskable types: add-one gives 6, 4, 1
    counts = torch.tensor([0, 0, 5, 3, 0])
    special = torch.tensor([True, True, False, False, False])
    nll = yardstick.unigram_nll(counts, special)
    assert torch.allclose(nll[2:], torch.tensor([-math.log(6 / 11), -math.log(4 / 11),
                                                 -math.log(1 / 11)]))
    assert torch.isinf(nll[:2]).all()
    assert yardstick.frequency_rank(counts, special).tolist() == [3, 4, 0, 1, 2]


class ContextFree(torch.nn.Module):
    """Predicts the unigram distribution at every position, whatever the input."""

    def __init__(self, log_probs: torch.Tensor) -> None:
        super().__init__()
        self.log_probs = log_probs
        self.inputs = []

    def forward(self, tokens, masked_tokens):
        self.inputs.append(tokens)
        return (self.log_probs.expand(int(masked_tokens.sum()), -1),)


def test_a_context_free_model_scores_exactly_the_reference_and_sees_only_mask(tiny):
    task, _, criterion = tiny
    sample = make_sample(task, B=8)
    tokens = sample["net_input"]["src_tokens"]
    model = ContextFree(-criterion.unigram_nll.clamp(max=1e4))
    sums = yardstick.score(model, tokens, tokens.ne(task.source_dictionary.pad()) &
                           ~torch.isin(tokens, criterion.special_ids), sample["id"], 0.15, 0,
                           task.mask_idx, criterion.freq_rank, criterion.unigram_nll)
    corrupted = model.inputs[0]
    changed = corrupted.ne(tokens)
    assert changed.any() and (corrupted[changed] == task.mask_idx).all()  # only <mask>
    assert int(sums["fixed_n"]) == int(changed.sum())
    assert torch.isclose(sums["fixed_nll"], sums["fixed_ref"])
    # the reference is the hand count: -ln (count + 1) / (total + maskable types)
    d = task.source_dictionary
    maskable = [i for i in range(len(d)) if i not in set(task.special_token_ids())]
    total = sum(d.count[i] + 1 for i in maskable)
    targets = tokens[changed]
    hand = sum(-math.log((d.count[t] + 1) / total) for t in targets.tolist())
    assert math.isclose(float(sums["fixed_ref"]), hand, rel_tol=1e-5)
    with metrics.aggregate(new_root=True) as agg:
        yardstick.log_metrics({k: float(v) for k, v in sums.items()})
        values = agg.get_smoothed_values()
    assert abs(values["fixed_mask_below_ref"]) < 1e-3
    assert math.isclose(values["fixed_mask_ref_loss"], hand / len(targets) / math.log(2),
                        rel_tol=1e-3)
    buckets = sum(values[f"fixed_mask_share_{b}"] for b in yardstick.BUCKETS)
    assert math.isclose(buckets, 1.0, rel_tol=1e-3)


def test_validation_logs_the_reference_beside_the_loss(tiny):
    task, model, criterion = tiny
    model.eval()
    sample = make_sample(task, B=8)
    with torch.no_grad():
        _, _, log = criterion(model, sample)
    with metrics.aggregate(new_root=True) as agg:
        criterion.reduce_metrics([log])
        values = agg.get_smoothed_values()
    for suffix in ("", "_top100", "_next900", "_rest"):
        if values.get(f"fixed_mask_share{suffix}", 1) > 0:
            below = values[f"fixed_mask_ref_loss{suffix}"] - values[f"fixed_mask_loss{suffix}"]
            assert abs(values[f"fixed_mask_below_ref{suffix}"] - below) < 2e-3
