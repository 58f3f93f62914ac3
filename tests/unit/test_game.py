"""The game: gradient isolation, the sign of the masker's update, alternation that freezes."""

import pytest
import torch
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig

from amt_plugin import masking
from amt_plugin.criterions import adversarial_masked_lm as criterion_module
from amt_plugin.objectives import reinforce_loss, running_mean
from amt_plugin.optimizer import AMTAdam, AMTAdamConfig
from tests.conftest import build, make_sample, stock_roberta


def grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def test_gradients_never_cross_between_masker_and_predictor():
    task, model, criterion = build(masker_warmup_updates=0)
    model.train()
    criterion.set_num_updates(0)
    out = criterion.play(model, make_sample(task))
    assert out.masker_trains and out.masker_loss is not None
    masker = list(model.masker.parameters())
    predictor = [p for n, p in model.named_parameters() if not n.startswith("masker.")]
    assert all(g is None for g in grads(out.mlm_loss, masker))
    assert any(g is not None and g.abs().sum() > 0 for g in grads(out.mlm_loss, predictor))
    assert all(g is None for g in grads(out.masker_loss, predictor))
    assert any(g is not None and g.abs().sum() > 0 for g in grads(out.masker_loss, masker))


@pytest.mark.parametrize("strategy", ["learned", "random", "span", "frequency"])
@pytest.mark.parametrize("whole_words", [False, True])
def test_criterion_masks_exactly_the_budget_and_never_specials(strategy, whole_words):
    task, model, criterion = build(strategy, whole_words=whole_words, masker_warmup_updates=0)
    model.train()
    criterion.set_num_updates(0)
    sample = make_sample(task)
    tokens = sample["net_input"]["src_tokens"]
    seen = {}

    def spy(corrupted, masked_tokens, **kwargs):  # the predictor's inputs, as the criterion
        mask = masked_tokens  # made them: flat positions for the amt predictor, or a mask
        if mask.dtype != torch.bool:
            mask = torch.zeros(tokens.numel(), dtype=torch.bool).index_fill_(0, mask, True)
        seen["mask"] = mask.view_as(tokens)
        return type(model).forward(model, corrupted, masked_tokens=masked_tokens, **kwargs)

    model.forward = spy
    criterion.play(model, sample)
    mask = seen["mask"]
    specials = torch.isin(tokens, criterion.special_ids)
    assert not (mask & specials).any()
    starts = task.is_word_start[tokens] & ~specials if whole_words else ~specials
    if whole_words:  # a row whose first piece continues a word still starts a word there
        starts[:, 1] |= ~specials[:, 1]
    k = torch.round(starts.sum(1) * task.cfg.mask_prob).long().clamp(min=1)
    assert torch.equal((mask & starts).sum(1), k)
    if whole_words:  # every masked continuation piece belongs to a masked word
        cont = mask & ~starts
        prev = torch.zeros_like(mask)
        prev[:, 1:] = mask[:, :-1]
        assert not (cont & ~prev).any()


@pytest.mark.parametrize("data_parallel", [True, False])
def test_resting_masker_gets_zero_gradients_under_data_parallelism_only(
    data_parallel, monkeypatch
):
    # warm-up: the masker does not choose, yet DDP must see a gradient for every parameter;
    # on one process the anchor is left out (it would only cost kernel launches)
    monkeypatch.setattr(criterion_module, "_ddp", lambda: data_parallel)
    task, model, criterion = build(masker_warmup_updates=10)
    model.train()
    criterion.groups_to_step(3)
    loss, _, log = criterion(model, make_sample(task))
    loss.backward()
    assert log["masker_chooses"] == 0
    assert all(p.grad is not None for n, p in model.named_parameters()
               if not n.startswith("masker."))
    if data_parallel:
        assert all(p.grad is not None and p.grad.abs().sum() == 0
                   for p in model.masker.parameters())
    else:
        assert all(p.grad is None for p in model.masker.parameters())


def test_one_masker_update_raises_probability_of_high_reward_positions():
    B, T, k = 256, 12, 3
    theta = torch.zeros(T, requires_grad=True)  # one policy shared by all rows
    logits = theta.expand(B, T)
    cand = torch.ones(B, T, dtype=torch.bool)
    draw = masking.gumbel_top_k(logits, cand, torch.full((B,), k), 1.0,
                                torch.Generator().manual_seed(0))
    reward = draw.selected[:, 5].float() + 0.1 * draw.selected[:, 9].float()
    loss = reinforce_loss(reward, draw.log_prob, draw.entropy, torch.ones(B, dtype=torch.bool),
                          entropy_weight=0.0)
    loss.backward()
    with torch.no_grad():
        before = theta.softmax(0).clone()
        theta -= 1.0 * theta.grad  # one SGD step on the masker's loss
        after = theta.softmax(0)
    assert after[5] > before[5] + 0.01
    assert after.argmax() == 5
    assert after[9] > before[9]  # a small reward still raises it
    others = [i for i in range(T) if i not in (5, 9)]
    assert after[others].sum() < before[others].sum()


def test_entropy_bonus_pushes_towards_uniform():
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]], requires_grad=True)
    draw = masking.gumbel_top_k(logits, torch.ones(1, 4, dtype=torch.bool), torch.tensor([1]),
                                1.0, torch.Generator().manual_seed(0))
    reinforce_loss(torch.zeros(1), draw.log_prob, draw.entropy,
                   torch.ones(1, dtype=torch.bool), entropy_weight=1.0).backward()
    assert logits.grad[0, 0] > 0  # gradient descent lowers the dominant logit

def one_row_draw():
    logits = torch.zeros(1, 6, requires_grad=True)
    draw = masking.gumbel_top_k(logits, torch.ones(1, 6, dtype=torch.bool), torch.tensor([2]),
                                1.0, torch.Generator().manual_seed(0))
    return logits, draw


@pytest.mark.parametrize("fallback, direction", [(1.0, 1), (3.0, -1)])
def test_a_row_acting_alone_is_judged_against_the_running_mean(fallback, direction):
    # reward 2.0 above a running mean of 1.0: the drawn set becomes more likely (and less
    # likely when the running mean is 3.0); with no running mean, no policy gradient at all
    logits, draw = one_row_draw()
    chosen = draw.selected[0]
    loss = reinforce_loss(torch.tensor([2.0]), draw.log_prob, draw.entropy,
                          torch.ones(1, dtype=torch.bool), 0.0, torch.tensor(fallback))
    loss.backward()
    step = -logits.grad[0]  # gradient descent direction on the masker's logits
    assert (direction * step[chosen] > 0).all() and (direction * step[~chosen] < 0).all()
    for missing in (None, torch.tensor(float("nan"))):  # none yet: no signal, and no NaN
        logits, draw = one_row_draw()
        reinforce_loss(torch.tensor([2.0]), draw.log_prob, draw.entropy,
                       torch.ones(1, dtype=torch.bool), 0.0, missing).backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits.grad))


def test_running_mean_of_rewards_starts_decays_and_skips_batches_without_masker_picks():
    acted = torch.tensor([True, True, False])
    first = running_mean(None, torch.tensor([1.0, 3.0, 100.0]), acted)
    assert first.item() == pytest.approx(2.0)  # rows that did not act do not count
    second = running_mean(first, torch.tensor([12.0, 12.0, 0.0]), acted)
    assert second.item() == pytest.approx(0.9 * 2.0 + 0.1 * 12.0)
    none = torch.zeros(3, dtype=torch.bool)
    assert running_mean(second, torch.tensor([50.0, 50.0, 50.0]), none).item() == second.item()
    assert running_mean(None, torch.zeros(3), none).isnan()
    assert running_mean(running_mean(None, torch.zeros(3), none),
                        torch.tensor([4.0, 0.0, 0.0]), acted[[0, 2, 2]]).item() == 4.0


def test_masker_learns_from_single_sequence_micro_batches():
    # --batch-size 1: no leave-one-out baseline exists; the running mean of earlier batches'
    # rewards stands in, so the masker's policy gradient is not zero
    task, model, criterion = build(masker_warmup_updates=0, masker_entropy_weight=0.0)
    model.train()
    criterion.groups_to_step(0)
    single = [make_sample(task, B=1, seed=s) for s in range(3)]
    first = criterion.play(model, single[0])
    masker = list(model.masker.parameters())
    assert all(g is None or not g.any() for g in grads(first.masker_loss, masker))
    assert model.masker.reward_mean is not None and not model.masker.reward_mean.isnan()
    later = criterion.play(model, single[1])
    assert any(g is not None and g.abs().sum() > 0 for g in grads(later.masker_loss, masker))


def fill_grads(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def snapshot(model, prefix: str):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def test_amt_adam_leaves_an_unstepped_group_bit_identical():
    task, model, _ = build()
    opt = AMTAdam(AMTAdamConfig(lr=[1e-3], masker_lr=1e-2), list(model.parameters()))
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"predictor": 1e-3, "masker": 1e-2}
    fill_grads(model)
    opt.step(groups={"predictor", "masker"})  # both move; the masker now has Adam moments
    masker_before = snapshot(model, "masker.")
    state_before = {id(p): {k: v.clone() for k, v in opt.optimizer.state[p].items()}
                    for p in model.masker.parameters()}
    predictor_before = snapshot(model, "encoder.")
    fill_grads(model, seed=1)
    task.groups_to_step = {"predictor"}
    task.optimizer_step(opt, model, update_num=1)
    for n, p in model.named_parameters():
        if n.startswith("masker."):
            assert torch.equal(p, masker_before[n]), n
    for p in model.masker.parameters():
        for key, value in opt.optimizer.state[p].items():
            assert torch.equal(value, state_before[id(p)][key])
    assert any(not torch.equal(p, predictor_before[n])
               for n, p in model.named_parameters() if n.startswith("encoder."))


def test_task_freezes_the_masker_with_a_plain_fairseq_adam_too():
    task, model, _ = build()
    cfg = FairseqAdamConfig(lr=[1e-3], adam_betas="(0.9, 0.999)")
    opt = FairseqAdam(cfg, list(model.parameters()))
    fill_grads(model)
    opt.step()
    masker_before = snapshot(model, "masker.")
    fill_grads(model, seed=1)
    task.groups_to_step = {"predictor"}
    task.optimizer_step(opt, model, update_num=1)
    assert all(torch.equal(p, masker_before[n])
               for n, p in model.named_parameters() if n.startswith("masker."))


def test_task_steps_a_stock_roberta_predictor_which_has_no_role_tags():
    # --arch roberta with --masking-strategy random: every parameter is the predictor's
    task, model, _ = build("random")
    roberta = stock_roberta(task, model)
    assert not any(hasattr(p, "param_group") for p in roberta.parameters())
    opt = FairseqAdam(FairseqAdamConfig(lr=[1e-3], adam_betas="(0.9, 0.999)"),
                      list(roberta.parameters()))
    before = snapshot(roberta, "")
    fill_grads(roberta)
    task.groups_to_step = {"predictor"}  # random masking: the masker never trains
    task.optimizer_step(opt, roberta, update_num=1)
    assert all(not torch.equal(p, before[n]) for n, p in roberta.named_parameters())


def test_masker_lr_follows_the_schedule_scaled():
    _, model, _ = build()
    opt = AMTAdam(AMTAdamConfig(lr=[2e-3], masker_lr=5e-4), list(model.parameters()))
    opt.set_lr(1e-3)  # what a scheduler does mid-warm-up
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["predictor"] == 1e-3 and abs(lrs["masker"] - 2.5e-4) < 1e-12


def test_per_group_clipping_does_not_let_the_masker_shrink_the_predictor():
    _, model, _ = build()
    opt = AMTAdam(AMTAdamConfig(lr=[1e-3]), list(model.parameters()))
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0 if p.param_group == "masker" else 1e-4)
    predictor_grads = {n: p.grad.clone() for n, p in model.named_parameters()
                       if not n.startswith("masker.")}
    opt.clip_grad_norm(1.0)
    for n, p in model.named_parameters():
        if n.startswith("masker."):
            continue
        assert torch.equal(p.grad, predictor_grads[n])
    masker_norm = torch.stack([p.grad.norm() for p in model.masker.parameters()]).norm()
    assert abs(masker_norm.item() - 1.0) < 1e-4


def test_amt_adam_on_flattened_fp16_params_says_which_flag_to_add():
    # fairseq's FP16Optimizer flattens every parameter into one untagged tensor by default
    flat = torch.nn.Parameter(torch.zeros(10))
    with pytest.raises(ValueError, match="--fp16-no-flatten-grads"):
        AMTAdam(AMTAdamConfig(lr=[1e-3]), [flat])


def test_fixed_mask_buckets_add_up_and_do_not_depend_on_the_strategy():
    logs = {}
    for strategy in ("learned", "random"):
        task, model, criterion = build(strategy)
        model.eval()
        logs[strategy] = criterion.play(model, make_sample(task)).logging_output
    log = logs["learned"]
    assert log["fixed_n"] > 0
    assert sum(int(log[f"fixed_n_{b}"]) for b in ("top100", "next900", "rest")) == log["fixed_n"]
    total_nll = sum(float(log[f"fixed_nll_{b}"]) for b in ("top100", "next900", "rest"))
    assert abs(total_nll - float(log["fixed_nll"])) < 1e-3
    # same model weights (seeded build), same samples: identical yardstick under both strategies
    assert float(logs["random"]["fixed_nll"]) == pytest.approx(float(log["fixed_nll"]))


def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_fp32_weights():
    task, model, criterion = build(masker_warmup_updates=0)
    task.cfg.bf16_autocast = True
    sample = make_sample(task)
    model.train()
    seen = []
    fc1 = model.encoder.sentence_encoder.layers[0].fc1  # a predictor matmul
    fc1.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    with task.autocast(model):
        masker_logits = model.masker(sample["net_input"]["src_tokens"])
        loss, _, log = criterion(model, sample)
    assert seen and set(seen) == {torch.bfloat16} and masker_logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_running_mean_travels_in_the_checkpoint_and_stays_fp32():
    task, model, criterion = build(masker_warmup_updates=0)
    model.train()
    criterion.groups_to_step(0)
    criterion.play(model, make_sample(task))
    saved = model.state_dict()
    mean = model.masker.reward_mean.item()
    assert saved["masker._extra_state"].item() == mean and mean == mean  # not NaN
    _, resumed, _ = build()
    assert resumed.masker.reward_mean is None
    resumed.load_state_dict(saved, strict=True)  # fairseq's load: upgrade, then strict
    assert resumed.masker.reward_mean.item() == mean
    resumed.bfloat16()  # --bf16-weights casts the model; the baseline keeps its precision
    assert resumed.masker.reward_mean.dtype == torch.float32
    # a checkpoint from before the running mean was saved loads, and starts it afresh
    old = {k: v for k, v in saved.items() if k != "masker._extra_state"}
    resumed.load_state_dict(old, strict=True)
    assert resumed.masker.reward_mean is None
