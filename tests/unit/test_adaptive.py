"""--masking-strategy adaptive: mask in proportion to the predictor's running error per type."""

import pytest
import torch

from amt_plugin import masking
from tests.conftest import build, make_sample


def test_running_accuracy_per_type_by_hand():
    acc = torch.tensor([0.0, 0.5, 1.0, 0.2])
    targets = torch.tensor([1, 1, 2, 1])
    correct = torch.tensor([True, False, False, True])
    got = masking.update_type_accuracy(acc, targets, correct, decay=0.9)
    # type 1: batch accuracy 2/3; type 2: 0; types 0 and 3 unseen, unchanged
    want = torch.tensor([0.0, 0.9 * 0.5 + 0.1 * 2 / 3, 0.9 * 1.0, 0.2])
    assert torch.allclose(got, want)
    assert torch.equal(masking.adaptive_weights(torch.tensor([0.0, 0.5, 1.0]), 0.05),
                       torch.tensor([1.0, 0.5, 0.05]))


def test_types_the_predictor_misses_are_masked_more_within_the_exact_budget():
    task, model, criterion = build("adaptive")
    d = task.source_dictionary
    accuracy = torch.zeros(len(d))
    accuracy[d.nspecial::2] = 1.0  # the predictor always gets the even-offset types right
    task.type_accuracy = accuracy
    chosen = []
    real_choose = masking.choose

    def spy(*args, **kwargs):
        chosen.append(real_choose(*args, **kwargs))
        return chosen[-1]

    model.eval()
    sample = make_sample(task)
    tokens = sample["net_input"]["src_tokens"]
    easy = (tokens - d.nspecial) % 2 == 0
    with pytest.MonkeyPatch.context() as m:
        m.setattr(masking, "choose", spy)
        for seed in range(20):
            criterion.cfg.seed = seed
            criterion.play(model, sample)
    masked_easy = sum(int((c.mask & easy).sum()) for c in chosen)
    masked_hard = sum(int((c.mask & ~easy).sum()) for c in chosen)
    # weights 0.05 against 1: the easy types get about a twentieth of the hard ones' picks
    assert masked_easy * 5 < masked_hard
    for c in chosen:  # the budget is the same as every strategy's
        assert torch.equal(c.mask.sum(1), masking.budget(c.candidates.sum(1), 0.15))
    assert torch.equal(task.type_accuracy, accuracy)  # validation learns nothing


def test_training_updates_the_statistics_and_checkpoints_carry_them():
    task, model, criterion = build("adaptive")
    assert task.get_checkpoint_dict() == {}  # nothing before the first batch
    model.train()
    sample = make_sample(task)
    criterion.play(model, sample)
    acc = task.type_accuracy
    assert acc is not None and acc.shape == (len(task.source_dictionary),)
    tokens = sample["net_input"]["src_tokens"]
    never = torch.ones(len(acc), dtype=torch.bool)
    never[tokens.flatten()] = False
    assert torch.all(acc[never] == 0)  # types not in the batch keep their value
    saved = task.get_checkpoint_dict()["AdversarialMaskedLMTask"]["type_accuracy"]
    other, _, _ = build("adaptive")
    other.set_checkpoint_dict({"type_accuracy": saved.clone()})
    assert torch.equal(other.type_accuracy, acc)


def test_bad_adaptive_settings_are_refused():
    with pytest.raises(ValueError, match="--adaptive-decay must be in"):
        build("adaptive", adaptive_decay=1.0)
    with pytest.raises(ValueError, match="--adaptive-floor"):
        build("adaptive", adaptive_floor=0.0)
