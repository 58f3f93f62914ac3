"""The masking-rate decay and the masker's random-share annealing (off by default)."""

import pytest
import torch

from amt_plugin import masking
from amt_plugin.errors import UsageError
from tests.conftest import build, make_sample


def test_linear_schedule_holds_then_interpolates_then_holds():
    values = [masking.linear_schedule(0.3, 0.15, step, 0, 10) for step in (0, 5, 10, 20)]
    assert values == pytest.approx([0.3, 0.225, 0.15, 0.15])
    assert masking.linear_schedule(1.0, 0.2, 3, 4, 12) == 1.0  # before it starts
    assert masking.linear_schedule(1.0, 0.2, 8, 4, 12) == pytest.approx(0.6)
    assert masking.linear_schedule(1.0, 0.2, 5, 4, 4) == 0.2  # an empty schedule: the end


def captured_choices(monkeypatch) -> list:
    seen = []
    choose = masking.choose

    def spy(*args, **kwargs):
        seen.append(choose(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(masking, "choose", spy)
    return seen


@pytest.mark.parametrize("strategy", ["random", "learned"])
def test_the_masking_rate_decays_for_every_strategy_and_validation_uses_the_final_one(
        strategy, monkeypatch):
    task, model, criterion = build(strategy, masker_warmup_updates=0, mask_prob_start=0.3,
                                   schedule_updates=10)
    seen = captured_choices(monkeypatch)
    sample = make_sample(task)
    n = seen_units = None
    for update, rate in ((0, 0.3), (5, 0.225), (10, 0.15), (30, 0.15)):
        model.train()
        criterion.set_num_updates(update)
        criterion.play(model, sample)
        seen_units = seen[-1].units.sum(1)
        n = torch.round(seen_units * rate).long().clamp(min=1)
        assert torch.equal(seen[-1].mask.sum(1), n), update
    model.eval()
    with torch.no_grad():
        criterion.play(model, sample)
    assert torch.equal(seen[-1].mask.sum(1),
                       torch.round(seen_units * 0.15).long().clamp(min=1))


def test_the_random_share_anneals_from_the_end_of_the_warmup(monkeypatch):
    task, model, criterion = build("learned", masker_warmup_updates=2,
                                   masker_random_share_start=1.0, masker_random_share=0.2,
                                   schedule_updates=12)
    shares = []
    for update in (2, 7, 12, 40):
        criterion.set_num_updates(update)
        shares.append(criterion.random_share())
    assert shares == pytest.approx([1.0, 0.6, 0.2, 0.2])
    seen = captured_choices(monkeypatch)
    model.train()
    criterion.set_num_updates(2)  # all random: the masker picks nothing
    criterion.play(model, make_sample(task))
    assert seen[-1].draw is None or not seen[-1].draw.selected.any()
    criterion.set_num_updates(12)  # 80% of the budget from the masker
    criterion.play(model, make_sample(task))
    k = seen[-1].k
    assert torch.equal(seen[-1].draw.selected.sum(1), k - torch.round(0.2 * k).long())


@pytest.mark.parametrize("overrides,message", [
    ({"mask_prob_start": 1.5, "schedule_updates": 10}, "--mask-prob-start must be in [0, 1]"),
    ({"masker_random_share_start": 0.5, "schedule_updates": 0},
     "--masker-random-share-start needs --schedule-updates"),
])
def test_bad_schedules_are_refused(overrides, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build("learned", **overrides)
