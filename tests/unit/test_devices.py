"""One training step and one validation step of every strategy on every device torch sees.

On a CPU-only machine this is the CPU; on a GPU machine (benchmarks/gpu.sh runs tests/unit
there) the same step also runs on CUDA: generators, buffers, the fused optimizer and bf16
autocast all have to agree on the device.
"""

import pytest
import torch
from fairseq.utils import apply_to_sample

from amt_plugin.optimizer import AMTAdam, AMTAdamConfig
from tests.conftest import build, make_sample

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def to_device(sample: dict, device: str) -> dict:
    return apply_to_sample(lambda t: t.to(device), sample)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["learned", "random", "span", "frequency"])
@pytest.mark.parametrize("whole_words", [False, True])
def test_train_and_validation_step_on_device(device, strategy, whole_words):
    task, model, criterion = build(strategy, whole_words=whole_words, masker_warmup_updates=0)
    model, criterion = model.to(device), criterion.to(device)
    optimizer = AMTAdam(AMTAdamConfig(lr=[1e-3]), list(model.parameters()))
    assert optimizer.fused or device != "cuda"  # one kernel per group on GPUs
    sample = to_device(make_sample(task), device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    task.cfg.bf16_autocast = True
    loss, sample_size, log = task.train_step(sample, model, criterion, optimizer, update_num=0)
    assert torch.isfinite(loss) and sample_size > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.device.type == device and g.dtype == torch.float32 for g in grads)
    optimizer.clip_grad_norm(1.0)
    task.optimizer_step(optimizer, model, update_num=0)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("encoder.") for n in moved)
    assert any(n.startswith("masker.") for n in moved) == (strategy == "learned")

    _, _, valid_log = task.valid_step(sample, model, criterion)
    assert valid_log["fixed_n"] > 0
    assert torch.isfinite(torch.as_tensor(valid_log["fixed_nll"])).all()
    criterion.reduce_metrics([log, valid_log])  # the logged sums read back from the device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bf16_weights", [False, True])
def test_training_under_cuda_graphs_follows_eager(device, bf16_weights):
    # --torch-compile-mode reduce-overhead: on a GPU each compiled block replays as a CUDA
    # graph (on a CPU the mode compiles without graphs); training steps as in the trainer.
    # With --bf16-weights amt_adam takes each replay's bf16 gradients into its fp32 masters
    # before the next replay reuses their buffers.
    mode = "reduce-overhead"
    losses = {}
    for compiled in (False, True):
        task, model, criterion = build(masker_warmup_updates=0)
        model, criterion = model.to(device), criterion.to(device)
        if bf16_weights:
            task.cfg.bf16_weights = True
            model.to(torch.bfloat16)
        if compiled:
            task.cfg.torch_compile, task.cfg.torch_compile_mode = True, mode
            model.compile_blocks(mode)
            layers = model.encoder.sentence_encoder.layers
            assert all(layer._compiled_call_impl is not None for layer in layers)
        optimizer = AMTAdam(AMTAdamConfig(lr=[1e-3]), list(model.parameters()))
        sample = to_device(make_sample(task), device)
        losses[compiled] = []
        for step in range(3):
            optimizer.zero_grad()
            loss, _, _ = task.train_step(sample, model, criterion, optimizer, update_num=step)
            task.optimizer_step(optimizer, model, update_num=step)
            losses[compiled].append(loss.item())
        _, _, valid_log = task.valid_step(sample, model, criterion)
        assert torch.isfinite(torch.as_tensor(valid_log["fixed_nll"])).all()
        # the masker with its draw, and its objective, each compiled as one graph
        assert len(criterion._compiled_fns) == (2 if compiled else 0)
    # bf16: eager and fused kernels round differently; still well under what one update
    # moves the loss, so a replay that lost its update would not pass
    tolerance = 3e-3 if bf16_weights else 1e-3
    assert losses[True] == pytest.approx(losses[False], rel=tolerance)
    assert abs(losses[False][1] / losses[False][0] - 1) > 2 * tolerance
    if device == "cuda":  # a second micro-batch on top of the last one's gradients
        with pytest.raises(ValueError, match="update-freq 1"):
            task.train_step(sample, model, criterion, optimizer, update_num=3)


def test_compile_mode_needs_torch_compile():
    import argparse

    from fairseq.models import ARCH_CONFIG_REGISTRY

    task, _, _ = build()
    task.cfg.torch_compile_mode = "reduce-overhead"
    args = argparse.Namespace(arch="amt_tiny", _name="amt_tiny", max_positions=64)
    ARCH_CONFIG_REGISTRY["amt_tiny"](args)
    with pytest.raises(ValueError, match="needs --torch-compile"):
        task.build_model(args)


@pytest.mark.parametrize("trains", [True, False])
def test_the_masker_its_draw_and_its_objective_compile_as_one_graph_each(trains):
    # under --torch-compile the criterion compiles masker_draw and masker_objective whole: a
    # graph break would send part of them back to eager, one kernel per op
    from amt_plugin.criterions.adversarial_masked_lm import masker_draw
    from amt_plugin.objectives import masker_objective

    task, model, _ = build()
    tokens = make_sample(task)["net_input"]["src_tokens"]
    available = tokens.gt(3)
    k = torch.full((tokens.size(0),), 3)
    u = torch.rand(tokens.shape)
    torch._dynamo.reset()
    with torch.set_grad_enabled(trains):
        explained = [torch._dynamo.explain(masker_draw)(model.masker, tokens, True, available,
                                                         k, 1.0, u)]
        selected, log_prob, entropy = masker_draw(model.masker, tokens, True, available, k,
                                                  1.0, u)
        loss_grid = torch.rand(tokens.shape)
        for mean in (torch.tensor(float("nan")), torch.tensor(2.0)):
            explained.append(torch._dynamo.explain(masker_objective)(
                loss_grid, selected, selected, tokens, log_prob, entropy, mean, 0.01,
                len(task.source_dictionary)))
    for e in explained:
        assert e.graph_count == 1 and e.graph_break_count == 0, e.break_reasons


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_variants_stay_under_torchs_recompile_limit(device):
    # batches of several lengths, padded and not, a resting masker, validation in between:
    # torch compiles at most 8 variants of a function, then runs every new one eager
    from fairseq.modules.transformer_layer import TransformerEncoderLayerBase
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from amt_plugin.criterions.adversarial_masked_lm import masker_draw
    from amt_plugin.objectives import masker_objective

    torch._dynamo.reset()
    task, model, criterion = build(masker_warmup_updates=0, masker_update_freq=2)
    model, criterion = model.to(device), criterion.to(device)
    task.cfg.torch_compile = True
    model.compile_blocks()
    optimizer = AMTAdam(AMTAdamConfig(lr=[1e-3]), list(model.parameters()))
    update = 0
    for T in (32, 28, 24):
        padded = make_sample(task, B=8, T=T, seed=T)
        rows = make_sample(task, B=9, T=T, seed=T)["net_input"]["src_tokens"][1:]
        unpadded = {"id": torch.arange(8), "net_input": {"src_tokens": rows},
                    "nsentences": 8, "ntokens": rows.numel()}
        for sample in (padded, unpadded):
            sample = to_device(sample, device)
            for _ in range(2):  # the masker trains, then rests
                optimizer.zero_grad()
                task.train_step(sample, model, criterion, optimizer, update_num=update)
                task.optimizer_step(optimizer, model, update_num=update)
                update += 1
            task.valid_step(sample, model, criterion)
    limit = getattr(torch._dynamo.config, "recompile_limit", None) or \
        torch._dynamo.config.cache_size_limit
    for fn in (masker_draw, masker_objective, TransformerEncoderLayerBase.forward):
        variants = len(_debug_get_cache_entry_list(fn.__code__))
        assert 0 < variants <= limit // 2, (fn.__qualname__, variants)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device syncs need a GPU")
@pytest.mark.parametrize("strategy,precision", [("learned", "--bf16-autocast"),
                                                ("random", "--bf16-autocast"),
                                                ("learned", "--bf16-weights")])
def test_fairseq_train_updates_never_drain_the_gpus_queue(strategy, precision, tmp_path):
    # Real fairseq-train updates with torch's sync debug mode set to "warn" from the third
    # update on: every read that waits for the GPU to finish its queue (.item(), nonzero, a
    # blocking copy) is recorded with the Python lines that made it, and the test fails
    # listing them all. What is left is waiting on events: the logs after the forward, the
    # previous update's gradient norm. Token-level masking, amt_adam, both bf16 paths.
    import sys
    import traceback
    import warnings
    from pathlib import Path

    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer
    from fairseq_cli.train import main as train_main

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "benchmarks"))
    from zipf_corpus import make_corpus

    data = make_corpus(tmp_path, 500, 400, 20, (10, 60))
    argv = [str(data), "--user-dir", str(root / "amt_plugin"),
            "--task", "adversarial_masked_lm", "--criterion", "adversarial_masked_lm",
            "--arch", "amt_tiny", "--optimizer", "amt_adam", "--lr", "1e-4",
            "--masking-strategy", strategy, "--masker-warmup-updates", "0",
            precision, "--clip-norm", "1.0", "--tokens-per-sample", "64",
            "--batch-size", "8", "--max-update", "8", "--no-save", "--disable-validation",
            "--num-workers", "0", "--log-format", "simple", "--log-interval", "4",
            "--seed", "1"]
    cfg = convert_namespace_to_omegaconf(
        options.parse_args_and_arch(options.get_training_parser(), argv))
    original, updates, syncs = Trainer.train_step, [], {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" in str(message):
            stack = [f"{f.filename}:{f.lineno} {f.name}"
                     for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
            stack = stack[-6:]
            syncs.setdefault("\n    ".join(stack), len(updates))

    def watched(self, samples, *args, **kwargs):
        updates.append(len(updates))
        torch.cuda.set_sync_debug_mode("warn" if len(updates) > 2 else "default")
        try:
            return original(self, samples, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    Trainer.train_step = watched
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            train_main(cfg)
    finally:
        Trainer.train_step = original
    assert len(updates) == 8
    assert not syncs, "syncs in updates 3-8, first seen at update:\n" + "\n".join(
        f"  {update}: {stack}" for stack, update in syncs.items())
