"""The fast paths compute what the plain ones do: flat-position LM head, padding hint, foreach
clipping, fused Adam; and one training step reads back to the host only once."""

import collections
import copy
import math
from pathlib import Path

import pytest
import torch
from fairseq import utils
from fairseq.data import RightPadDataset
from fairseq.models.roberta.model import RobertaEncoder
from torch.utils._python_dispatch import TorchDispatchMode

from amt_plugin import masking
from amt_plugin import optimizer as amt_optimizer
from amt_plugin.criterions.adversarial_masked_lm import sum_logs
from amt_plugin.optimizer import AMTAdam, AMTAdamConfig
from tests.conftest import build, make_sample


def unpadded(task, B: int = 4):
    tokens = make_sample(task, B=B)["net_input"]["src_tokens"][1:]  # row 0 is the padded one
    assert not tokens.eq(task.source_dictionary.pad()).any()
    return tokens


def test_predictor_is_robertas_modules_under_robertas_names():
    task, model, _ = build()
    stock = RobertaEncoder(copy.deepcopy(model.args), task.source_dictionary)
    assert model.encoder.state_dict().keys() == stock.state_dict().keys()
    stock.load_state_dict(model.encoder.state_dict())
    model.eval(), stock.eval()
    tokens = make_sample(task)["net_input"]["src_tokens"]
    assert torch.allclose(model.encoder(tokens)[0], stock(tokens)[0], atol=1e-6)


def test_predictor_trains_like_roberta_gradients_included():
    # dropout is off in build(): the same weights must give the same loss and gradients
    task, model, _ = build()
    stock = RobertaEncoder(copy.deepcopy(model.args), task.source_dictionary)
    stock.load_state_dict(model.encoder.state_dict())
    model.train(), stock.train()
    tokens = make_sample(task)["net_input"]["src_tokens"]  # row 0 is padded
    for net in (model.encoder, stock):
        out = net(tokens)[0]
        (out.float().log_softmax(-1)[..., 5].sum()).backward()
    ours = dict(model.encoder.named_parameters())
    for name, p in stock.named_parameters():
        assert torch.allclose(ours[name].grad, p.grad, atol=1e-5), name


def test_self_attention_matches_fairseqs_with_and_without_padding():
    from fairseq.modules import MultiheadAttention

    from amt_plugin.models.predictor import SelfAttention

    torch.manual_seed(0)
    ours = SelfAttention(32, 4, self_attention=True)
    stock = MultiheadAttention(32, 4, self_attention=True)
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(7, 3, 32, requires_grad=True)  # T x B x C
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    for mask in (None, pad):
        got, _ = ours(x, x, x, key_padding_mask=mask, need_weights=False)
        want, _ = stock(x, x, x, key_padding_mask=mask, need_weights=False)
        assert torch.allclose(got, want, atol=1e-6)
        g_ours = torch.autograd.grad(got.sum(), [x, *ours.parameters()])
        g_stock = torch.autograd.grad(want.sum(), [x, *stock.parameters()])
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_ours, g_stock))
    # attention weights asked for: fairseq's own path, same numbers
    got, weights = ours(x, x, x, key_padding_mask=pad, need_weights=True)
    assert weights is not None and torch.allclose(got, stock(x, x, x, pad)[0], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_is_an_unbiased_bernoulli_mask_reproducible_from_the_seed(dtype):
    from amt_plugin.models import cpu_dropout

    x = torch.ones(400, 500, dtype=dtype, requires_grad=True)
    torch.manual_seed(3)
    y = cpu_dropout.dropout(x, 0.1)
    kept = y != 0
    scale = 65536 / (65536 - round(0.1 * 65536))
    assert y.dtype == dtype and torch.equal(y[kept], torch.full_like(y[kept], scale))
    # 200,000 draws: the kept share's standard deviation is 0.00067
    assert abs(kept.float().mean().item() - 0.9) < 0.004
    assert abs(y.float().mean().item() - 1.0) < 0.005  # the expectation is kept
    # rows and columns alike: each of the four int16 lanes of a draw is uniform
    for lane in range(4):
        share = kept.flatten()[lane::4].float().mean().item()
        assert abs(share - 0.9) < 0.008, lane
    (y.float() * 2).sum().backward()  # the gradient goes through the kept elements only
    assert torch.equal(x.grad, (kept * 2 * scale).to(dtype))
    torch.manual_seed(3)
    assert torch.equal(cpu_dropout.dropout(x, 0.1), y)  # the same seed, the same mask
    assert cpu_dropout.dropout(x, 0.1, training=False) is x
    assert cpu_dropout.dropout(x, 0.0) is x


def test_cpu_attention_with_dropout_is_sdpas_attention():
    from amt_plugin.models import cpu_dropout

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    attend = torch.rand(3, 1, 1, 9) > 0.3
    attend[..., 0] = True
    for mask in (None, attend):
        # p below 2^-17 drops nothing, but takes the written-out path
        got = cpu_dropout.attention(q, k, v, mask, 1e-6)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.allclose(got, want, atol=1e-12)
    # with dropout: a tenth of the attention weights dropped, the rest scaled up
    ones = torch.ones(2, 1, 200, 1, dtype=torch.float64)
    out = cpu_dropout.attention(ones, ones, torch.eye(200, dtype=torch.float64)
                                .expand(2, 1, 200, 200), None, 0.1)
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.9) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 200 / (1 - 0.1)),
                          rtol=1e-4)


def test_the_predictors_dropout_modules_are_the_cpu_ones():
    from fairseq.modules import FairseqDropout

    from amt_plugin.models.cpu_dropout import CPUDropout

    _, model, _ = build()
    dropouts = [m for m in model.modules() if isinstance(m, FairseqDropout)]
    assert dropouts and all(type(m) is CPUDropout for m in dropouts)


class OpDtypes(TorchDispatchMode):
    """aten op name -> list of the dtype of its first tensor argument."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = collections.defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.seen[func.__name__.split(".")[0]].append(getattr(first, "dtype", None))
        return func(*args, **(kwargs or {}))


def test_under_bf16_autocast_the_predictor_casts_less_than_roberta():
    # torch's GELU runs on the bf16 activation (fairseq's upcasts it to fp32 and back), and
    # q, k, v come from one GEMM on one cast of the input instead of three
    task, model, _ = build()
    stock = RobertaEncoder(copy.deepcopy(model.args), task.source_dictionary)
    tokens = unpadded(task)
    seen = {}
    for name, net in (("ours", model.encoder), ("stock", stock)):
        with OpDtypes() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
            net(tokens)[0].float().sum().backward()
        seen[name] = ops.seen
    layers = model.args.encoder_layers
    assert seen["ours"]["gelu"] == [torch.bfloat16] * (layers + 1)  # + the LM head's
    assert torch.float32 in seen["stock"]["gelu"]
    assert len(seen["ours"]["_to_copy"]) < len(seen["stock"]["_to_copy"]) - 4 * layers


def test_flat_positions_select_the_same_logits_as_a_boolean_mask():
    task, model, _ = build()
    model.eval()
    tokens = make_sample(task)["net_input"]["src_tokens"]
    mask = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    by_mask = model(tokens, masked_tokens=mask)[0]
    by_position = model(tokens, masked_tokens=mask.flatten().nonzero().squeeze(1))[0]
    assert by_mask.shape == by_position.shape
    assert torch.allclose(by_mask, by_position, atol=1e-6)


def test_padding_hint_changes_nothing_but_the_work():
    task, model, _ = build()
    model.eval()
    tokens = unpadded(task)
    checked = model(tokens)[0]
    assert torch.allclose(model(tokens, padded=False)[0], checked, atol=1e-5)
    assert torch.allclose(model(tokens, padded=True)[0], checked, atol=1e-5)
    assert torch.allclose(model.masker(tokens, padded=False), model.masker(tokens), atol=1e-5)
    padded = make_sample(task)["net_input"]["src_tokens"]  # row 0 is padded
    assert torch.allclose(model(padded, padded=True)[0], model(padded)[0], atol=1e-6)


def test_pad_to_multiple_pads_batches_to_a_few_lengths_and_changes_no_real_position():
    # --pad-to-multiple: a few batch shapes for compiled graphs and CUDA graphs (recorded per
    # shape), never past the block size, and the padding changes no real position's output
    from amt_plugin.tasks.adversarial_masked_lm import (
        AdversarialMaskedLMConfig,
        AdversarialMaskedLMTask,
        PadToMultipleDataset,
    )

    task, model, _ = build()
    pad = task.source_dictionary.pad()
    blocks = [torch.arange(4, 4 + n) for n in (5, 3, 17, 33, 40, 9)]
    padded = PadToMultipleDataset(blocks, pad, multiple=16, longest=40)
    lengths = {(0, 1): 16, (2,): 32, (0, 2): 32, (3,): 40, (4,): 40}  # 33 -> 40, not 48
    for rows, length in lengths.items():
        batch = padded.collater([blocks[i] for i in rows])
        assert batch.shape == (len(rows), length)
        for row, i in zip(batch, rows):
            assert torch.equal(row[:len(blocks[i])], blocks[i])
            assert row[len(blocks[i]):].eq(pad).all()
    assert PadToMultipleDataset(blocks, pad, 8, 40).collater([blocks[5]]).shape == (1, 16)

    model.eval()
    tokens = make_sample(task)["net_input"]["src_tokens"][:, :20].clone()
    tokens[:, -1] = task.source_dictionary.eos()
    longer = PadToMultipleDataset(list(tokens), pad, 16, 32).collater(list(tokens))
    assert longer.shape == (8, 32)
    assert torch.allclose(model(longer)[0][:, :20], model(tokens)[0], atol=1e-5)
    assert torch.allclose(model.masker(longer)[:, :20], model.masker(tokens), atol=1e-5)

    plain = task._padded(blocks)  # the default, 1: fairseq's padding to the longest block
    assert isinstance(plain, RightPadDataset) and not isinstance(plain, PadToMultipleDataset)
    task.cfg.pad_to_multiple = 16
    assert isinstance(task._padded(blocks), PadToMultipleDataset)
    with pytest.raises(ValueError, match="--pad-to-multiple"):
        AdversarialMaskedLMTask(AdversarialMaskedLMConfig(data="unused", pad_to_multiple=0),
                                task.source_dictionary)


class SyncCounter(TorchDispatchMode):
    """Ops that make a GPU wait for the host: value reads, and data-dependent output sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        bool_index = name.startswith("index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])
        )
        if bool_index or name in ("_local_scalar_dense", "nonzero", "masked_select",
                                  "_unique2", "masked_scatter"):
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("strategy,whole_words,syncs", [
    ("learned", False, {}), ("random", False, {}), ("frequency", False, {}),
    ("learned", True, {"nonzero": 1}),
])
def test_a_training_step_reads_nothing_back_when_the_budget_is_known(strategy, whole_words,
                                                                     syncs):
    # forward (masker, choice, predictor, both losses) and backward of one micro-batch. The
    # number of masked positions comes from the batch (the task counts it on the host), so
    # token-level masking makes no sync at all; whole words mask a number of pieces that
    # only the device knows (one nonzero). fairseq's own masked_lm needs a sync per layer
    # and two for the LM head, plus one more in the backward.
    task, model, criterion = build(strategy=strategy, whole_words=whole_words,
                                   masker_warmup_updates=0)
    model.train()
    criterion.groups_to_step(1)
    sample = make_sample(task)
    counter = SyncCounter()
    with counter:
        loss, _, _ = criterion(model, sample)
        loss.backward()
    assert dict(counter.syncs) == syncs


@pytest.mark.parametrize("strategy", ["learned", "random", "frequency"])
def test_a_known_budget_finds_the_same_positions_as_nonzero(strategy):
    task, model, criterion = build(strategy=strategy, masker_warmup_updates=0)
    model.train()
    sample = make_sample(task)
    without = {k: v for k, v in sample.items() if k != "mask_budget"}
    results = []
    for s in (sample, without):
        criterion.set_num_updates(1)
        criterion._calls_this_update = 0  # the same masks for both
        counter = SyncCounter()
        with counter:
            loss, sample_size, _ = criterion(model, s)
        results.append((loss.item(), sample_size, dict(counter.syncs)))
    (known, n_known, syncs_known), (read, n_read, syncs_read) = results
    assert n_known == n_read == sample["mask_budget"]
    assert known == read
    assert syncs_known == {} and syncs_read == {"nonzero": 1}


def test_true_positions_is_nonzero_without_the_read_back():
    g = torch.Generator().manual_seed(0)
    for p in (0.0, 0.15, 0.5, 1.0):
        flags = torch.rand(97, generator=g) < p
        expected = flags.nonzero().squeeze(1)
        assert torch.equal(masking.true_positions(flags, int(flags.sum())), expected)
    with pytest.raises(RuntimeError, match="count of masked positions"):
        masking.true_positions(flags, int(flags.sum()) + 1)


def test_logging_outputs_are_reduced_without_reading_values_one_by_one():
    # the sums are stacked and read back by one .tolist() (a copy that only a GPU run would
    # show); reading each value (.item(), float()) would show up here as _local_scalar_dense
    task, model, criterion = build(masker_warmup_updates=0)
    model.train()
    criterion.groups_to_step(1)
    logs = [criterion(model, make_sample(task, seed=s))[2] for s in (0, 1)]
    counter = SyncCounter()
    with counter:
        type(criterion).reduce_metrics(logs)
    assert not counter.syncs


def grads_like(model, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) * (10.0 if p.param_group == "masker" else 0.1)
            for p in model.parameters()]


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_foreach_clipping_matches_fairseqs_per_group(max_norm, monkeypatch):
    # fairseq's clip_grad_norm_ moves the norm to the GPU whenever one exists, and then fails
    # on these CPU gradients: as the reference, run it as on a machine without one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, model, _ = build()
    params = list(model.parameters())
    opt = AMTAdam(AMTAdamConfig(lr=[1e-3]), params)
    for p, g in zip(params, grads_like(model)):
        p.grad = g.clone()
    reference = {}
    for role in ("predictor", "masker"):
        group = [copy.deepcopy(p) for p in params if p.param_group == role]
        for q, p in zip(group, [p for p in params if p.param_group == role]):
            q.grad = p.grad.clone()
        reference[role] = (utils.clip_grad_norm_(group, max_norm), group)
    joint = opt.clip_grad_norm(max_norm)
    expected = torch.stack([n for n, _ in reference.values()]).norm()
    assert torch.allclose(joint, expected, rtol=1e-5)
    for role, (_, group) in reference.items():
        mine = [p for p in params if p.param_group == role]
        assert all(torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-8)
                   for p, q in zip(mine, group))


@pytest.mark.parametrize("factor", [0.25, torch.tensor(0.25)])
def test_multiply_grads_scales_like_fairseqs_in_one_call(factor):
    from fairseq.optim import FairseqOptimizer

    _, model, _ = build()
    params = list(model.parameters())
    opt = AMTAdam(AMTAdamConfig(lr=[1e-3]), params)
    grads = grads_like(model)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    params[0].grad = None  # a parameter without a gradient is left alone
    reference = copy.deepcopy(params)
    for q, p in zip(reference, params):
        q.grad = None if p.grad is None else p.grad.clone()
    FairseqOptimizer.multiply_grads(type("Plain", (), {"params": reference})(), factor)
    ops = OpDtypes()
    with ops:
        opt.multiply_grads(factor)
    assert params[0].grad is None
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(params[1:], reference[1:]))
    # fairseq's takes p.grad.data per parameter: a dispatcher call each
    assert sum(map(len, ops.seen.values())) <= 2, dict(ops.seen)


def test_fused_and_foreach_adam_take_the_same_step():
    _, model, _ = build()
    _, twin, _ = build()  # the same seed: the same initial weights
    fused = AMTAdam(AMTAdamConfig(lr=[1e-3], weight_decay=0.01), list(model.parameters()))
    plain = AMTAdam(AMTAdamConfig(lr=[1e-3], weight_decay=0.01, no_fused_adam=True),
                    list(twin.parameters()))
    assert fused.fused and not plain.fused
    for step in range(3):
        for m in (model, twin):
            for p, g in zip(m.parameters(), grads_like(m, seed=step)):
                p.grad = g
        fused.step(groups={"predictor", "masker"} if step != 1 else {"predictor"})
        plain.step(groups={"predictor", "masker"} if step != 1 else {"predictor"})
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_train_mode_and_update_count_reach_every_module_that_needs_them():
    # AMTModel.train skips the walk when nothing would change; set_num_updates calls only
    # modules with a set_num_updates of their own
    _, model, _ = build()
    model.masker.eval()  # a part left in eval mode is still switched back
    model.train()
    assert all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())

    class Listener(torch.nn.Module):
        seen = None

        def set_num_updates(self, num_updates):
            self.seen = num_updates

    listener = Listener()
    model.encoder.sentence_encoder.layers[0].add_module("schedule", listener)
    model.set_num_updates(7)
    model.set_num_updates(8)
    assert listener.seen == 8


@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16])
def test_under_fairseqs_fp16_optimizer_each_role_is_still_clipped_on_its_own(precision):
    # --bf16-weights / --fp16: fairseq's FP16Optimizer asks amt_adam only for the norm, then
    # multiplies every gradient by one joint clipping factor
    from fairseq.optim.fp16_optimizer import FP16Optimizer
    from omegaconf import OmegaConf

    max_norm = 1.0
    _, model, _ = build()
    grads = [g.to(precision).float() for g in grads_like(model)]  # exact in both precisions
    reference = AMTAdam(AMTAdamConfig(lr=[1e-3]), list(model.parameters()))
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    reference.multiply_grads(0.5)
    reference.clip_grad_norm(max_norm)
    expected = [p.grad for p in model.parameters()]
    cfg = OmegaConf.create({
        "optimizer": {"_name": "amt_adam", "lr": [1e-3]},
        "common": {"bf16": precision == torch.bfloat16, "fp16_no_flatten_grads": True,
                   "fp16_scale_window": 128, "fp16_init_scale": 1.0,
                   "fp16_scale_tolerance": 0.0, "threshold_loss_scale": None,
                   "min_loss_scale": 1e-4},
        "optimization": {"update_freq": [1]},
    })
    effective = {}
    for linked in (False, True):
        _, half, _ = build()
        half.to(precision)
        wrapper = FP16Optimizer.build_optimizer(cfg, list(half.parameters()))
        # a backward through the wrapper whose gradients are exactly `grads`
        wrapper.backward(sum((p * g.to(precision)).sum() for p, g in zip(half.parameters(),
                                                                         grads)))
        if linked:  # what the task does before every update
            wrapper.fp32_optimizer.clip_roles_under(wrapper, max_norm)
        wrapper.multiply_grads(0.5)
        wrapper.clip_grad_norm(max_norm)
        effective[linked] = [p.grad * wrapper._multiply_factor for p in wrapper.fp32_params]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7)
               for a, b in zip(effective[True], expected))
    # without it, the masker's small gradient would have been shrunk with the predictor's
    roles = [p.param_group for p in model.parameters()]
    masker = [i for i, r in enumerate(roles) if r == "masker"]
    assert not all(torch.allclose(effective[False][i], expected[i]) for i in masker)


def test_the_task_tells_amt_adam_about_fairseqs_fp16_optimizer():
    from fairseq.optim.fp16_optimizer import FP16Optimizer
    from omegaconf import OmegaConf

    task, model, criterion = build(masker_warmup_updates=0)
    model.to(torch.bfloat16)
    cfg = OmegaConf.create({
        "optimizer": {"_name": "amt_adam", "lr": [1e-3]},
        "common": {"bf16": True, "fp16_no_flatten_grads": True, "fp16_scale_window": 128},
        "optimization": {"update_freq": [1]},
    })
    wrapper = FP16Optimizer.build_optimizer(cfg, list(model.parameters()))
    task._clip_norm = 0.5  # setup_task reads it from the run's --clip-norm
    task.train_step(make_sample(task), model, criterion, wrapper, update_num=0)
    assert wrapper.fp32_optimizer._wrapper == (wrapper, 0.5)


def test_the_task_reads_the_runs_clip_norm_from_the_command_line(tmp_path):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    (tmp_path / "dict.txt").write_text("".join(f"w{i} {100 - i}\n" for i in range(20)))
    plugin = Path(__file__).resolve().parents[2] / "amt_plugin"
    argv = [str(tmp_path), "--user-dir", str(plugin), "--task",
            "adversarial_masked_lm", "--arch", "amt_tiny", "--optimizer", "amt_adam",
            "--lr", "1e-3", "--cpu", "--clip-norm", "0.25"]
    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))
    assert tasks.setup_task(cfg.task)._clip_norm == 0.25


def test_the_gradient_norm_read_late_is_the_previous_updates_and_a_nan_step_is_skipped(
        monkeypatch):
    # What the trainer gets from clip_grad_norm when the norm is read one update late (on
    # GPUs, by default); the same on a CPU, where fused AdamW takes found_inf too
    task, model, criterion = build(masker_warmup_updates=0)
    optimizer = AMTAdam(AMTAdamConfig(lr=[1e-3]), list(model.parameters()))
    assert optimizer.fused

    def backward(update: int) -> None:
        optimizer.zero_grad()
        task.train_step(make_sample(task, seed=update), model, criterion, optimizer,
                        update_num=update)
        optimizer.norm_read_late = True  # (the task switches it off on a CPU)

    reported, actual = [], []
    for update in range(3):
        backward(update)
        optimizer.norm_read_late = False
        actual.append(optimizer.clip_grad_norm(0.0).item())  # measures only
        optimizer.norm_read_late = True
        norm = optimizer.clip_grad_norm(1.0)
        assert norm.device.type == "cpu"  # the trainer's checks read no device value
        reported.append(norm.item())
        task.optimizer_step(optimizer, model, update_num=update)
    # the first update reports its own norm (nothing older), then each the previous one's
    assert reported == pytest.approx([actual[0], actual[0], actual[1]])

    # a non-finite gradient: this update's step is skipped on the device (weights, moments,
    # step counts), and the trainer sees the NaN at the next update
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(optimizer._optimizer.state_dict()["state"])
    backward(3)
    params[0].grad[0].fill_(float("nan"))
    assert math.isfinite(optimizer.clip_grad_norm(1.0).item())  # update 2's
    task.optimizer_step(optimizer, model, update_num=3)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    after = optimizer._optimizer.state_dict()["state"]
    assert all(torch.equal(after[i][k], state[i][k]) for i in state for k in state[i])
    backward(4)
    warnings = []
    monkeypatch.setattr(amt_optimizer.logger, "warning", lambda msg, *a: warnings.append(msg))
    # the trainer gets 0 (fairseq would raise on NaN) and a warning names the skipped update
    assert optimizer.clip_grad_norm(1.0).item() == 0.0
    assert any("the previous update (norm read late) is skipped" in w for w in warnings)
    assert optimizer._nonfinite_in_a_row == 1
    assert optimizer._optimizer.found_inf is not None  # and consumed by the next step only
    task.optimizer_step(optimizer, model, update_num=4)
    assert optimizer._optimizer.found_inf is None
    assert not all(torch.equal(p, b) for p, b in zip(params, before))


def test_the_task_reads_the_norm_late_only_on_gpus_and_not_under_sync_grad_norm():
    task, model, criterion = build()
    for sync in (False, True):
        optimizer = AMTAdam(AMTAdamConfig(lr=[1e-3], sync_grad_norm=sync),
                            list(model.parameters()))
        optimizer.norm_read_late = True
        task.train_step(make_sample(task), model, criterion, optimizer, update_num=0)
        assert optimizer.norm_read_late is False  # a CPU: nothing to overlap
    if torch.cuda.is_available():
        model, criterion = model.cuda(), criterion.cuda()
        sample = utils.move_to_cuda(make_sample(task))
        for sync in (False, True):
            optimizer = AMTAdam(AMTAdamConfig(lr=[1e-3], sync_grad_norm=sync),
                                list(model.parameters()))
            task.train_step(sample, model, criterion, optimizer, update_num=0)
            assert optimizer.norm_read_late is (not sync)


def test_logged_sums_read_from_a_host_copy_equal_the_device_values():
    # start_host_copy (a CUDA-only copy begun after the forward) hands sum_logs the values
    # under "_host_copy"; here the copy is built by hand on the CPU, without an event
    task, model, criterion = build(masker_warmup_updates=0)
    model.train()
    criterion.groups_to_step(1)
    logs = [criterion(model, make_sample(task, seed=s))[2] for s in (0, 1)]
    assert "_host_copy" not in logs[0]  # CPU: nothing to gain from an early copy
    direct = sum_logs(logs)
    copied = []
    for log in logs:
        keys = [k for k, v in log.items() if torch.is_tensor(v)]
        host = torch.stack([log[k].double().reshape(()) for k in keys])
        poisoned = {k: (torch.tensor(float("nan")) if k in keys else v) for k, v in log.items()}
        copied.append({**poisoned, "_host_copy": (keys, host, None)})
    assert sum_logs(copied) == pytest.approx(direct)


def test_bf16_weights_step_like_fp32_adam_through_their_master_weights():
    # --bf16-weights: amt_adam steps fp32 copies of bf16 weights. Given the same (bf16-valued)
    # gradients, its masters follow fp32 AdamW exactly, the resting role included, and the
    # model holds them rounded; the state dict carries them to a resumed run, bf16 or fp32.
    torch.manual_seed(0)
    roles = ["predictor", "predictor", "masker"]
    start = [torch.randn(5, 3).bfloat16().float() for _ in roles]

    def params(dtype):
        ps = [torch.nn.Parameter(w.to(dtype, copy=True)) for w in start]
        for p, role in zip(ps, roles):
            p.param_group = role
        return ps

    cfg = AMTAdamConfig(lr=[1e-5], weight_decay=0.01)  # steps far below bf16's resolution
    fp32, bf16 = params(torch.float32), params(torch.bfloat16)
    reference, optimizer = AMTAdam(cfg, fp32), AMTAdam(cfg, bf16)
    for update in range(20):
        for p, q in zip(fp32, bf16):
            g = torch.randn_like(p).bfloat16()
            p.grad, q.grad = g.float(), g.clone()
        for opt in (reference, optimizer):
            opt.multiply_grads(0.5)
            opt.clip_grad_norm(1.0)
            opt.step(groups={"predictor"} if update % 2 else None)  # the masker rests
            opt.zero_grad()
        assert all(q.grad is None for q in bf16)
    masters = list(optimizer.params)
    assert all(m.dtype == torch.float32 for m in masters)
    assert all(torch.equal(m, p) for m, p in zip(masters, fp32))
    assert all(torch.equal(q, p.bfloat16()) for q, p in zip(bf16, fp32))
    assert not torch.equal(fp32[0], start[0])  # they moved,
    assert all(torch.equal(q.float(), w) for q, w in zip(bf16, start))  # by under bf16's step
    state = copy.deepcopy(optimizer.state_dict())
    for dtype in (torch.bfloat16, torch.float32):  # resumed with and without --bf16-weights
        resumed = [torch.nn.Parameter(q.detach().to(dtype)) for q in bf16]
        for p, role in zip(resumed, roles):
            p.param_group = role
        loaded = AMTAdam(cfg, resumed)
        loaded.load_state_dict(copy.deepcopy(state))
        assert all(torch.equal(p, r) for p, r in zip(loaded.params, fp32))
    mismatched = [torch.nn.Parameter(torch.zeros(2).bfloat16()) for _ in roles]
    for p, role in zip(mismatched, roles):
        p.param_group = role
    with pytest.raises(ValueError, match="--reset-optimizer"):
        AMTAdam(cfg, mismatched).load_state_dict(copy.deepcopy(state))


def test_bf16_weights_sum_micro_batches_in_fp32():
    # 1 + 2^-9 + 2^-9: each small term is half a bf16 step at 1, so a bf16 sum stays at 1.
    # Each backward's bf16 gradient is added to the master's fp32 one (across data-parallel
    # ranks too: tests/e2e/test_pytorch_ddp.py).
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    weight.param_group = "predictor"
    optimizer = AMTAdam(AMTAdamConfig(lr=[1e-3]), [weight])
    for _ in range(2):  # the second update starts afresh
        optimizer.zero_grad()
        for i, c in enumerate((1.0, 2.0**-9, 2.0**-9)):
            # what the task checks before a micro-batch under CUDA graphs
            assert optimizer.has_folded_grads == (i > 0)
            optimizer.backward((weight * c).sum())
        norm = optimizer.clip_grad_norm(0.0)
        expected = 1.0 + 2.0**-8
        (master,) = optimizer.params
        assert master.grad.dtype == torch.float32 and weight.grad is None
        assert torch.equal(master.grad, torch.full((4,), expected))
        assert norm.item() == pytest.approx(2 * expected)
        optimizer.step()
