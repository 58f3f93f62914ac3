"""--torch-compile: the same training as eager, the same checkpoints."""

import pytest
import torch
from fairseq import checkpoint_utils

import amt_plugin  # noqa: F401  (the task and model the checkpoint names)
from tests.e2e.conftest import BIN, PLUGIN, json_logs, run, train

pytestmark = pytest.mark.slow


def test_compiled_training_follows_eager_and_saves_the_same_checkpoint(zipf_data, tmp_path):
    flags = ["--max-update", "12", "--masker-warmup-updates", "4", "--dropout", "0",
             "--attention-dropout", "0", "--log-interval", "4", "--save-interval-updates",
             "12", "--disable-validation"]
    eager = train(zipf_data, tmp_path / "eager", *flags)
    # blocks of 64 (--sample-break-mode none) are already a multiple of 16: the flag pads
    # nothing here, and the run must agree with eager all the same
    compiled = train(zipf_data, tmp_path / "compiled", *flags, "--torch-compile",
                     "--pad-to-multiple", "16")
    # same data, seed and masks: the losses agree up to kernel fusion's rounding
    for a, b in zip(json_logs(eager.stdout, "train_inner"),
                    json_logs(compiled.stdout, "train_inner"), strict=True):
        assert abs(float(a["loss"]) - float(b["loss"])) < 0.05
        assert abs(float(a["masker_entropy"]) - float(b["masker_entropy"])) < 0.05
    state = torch.load(tmp_path / "compiled" / "checkpoint_last.pt", weights_only=True)
    reference = torch.load(tmp_path / "eager" / "checkpoint_last.pt", weights_only=True)
    assert state["model"].keys() == reference["model"].keys()
    # evaluation loads the compiled run's checkpoint and runs eager (no compile time)
    valid = run([str(BIN / "fairseq-validate"), str(zipf_data), "--user-dir", PLUGIN,
                 "--path", str(tmp_path / "compiled" / "checkpoint_last.pt"), "--cpu",
                 "--task", "adversarial_masked_lm", "--criterion", "adversarial_masked_lm",
                 "--batch-size", "16", "--log-format", "json"])
    assert "fixed_mask_loss" in valid.stdout
    [model], _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(tmp_path / "compiled" / "checkpoint_last.pt")])
    assert task.cfg.torch_compile  # the run's setting travels with the checkpoint ...
    assert model.masker._compiled_call_impl is None  # ... but loading does not compile
    assert all(layer._compiled_call_impl is None
               for layer in model.encoder.sentence_encoder.layers)


def test_pad_to_multiple_leaves_a_few_batch_shapes(zipf_data):
    # sentences packed whole (--sample-break-mode complete) make batches of many lengths;
    # compiled graphs and CUDA graphs are made per shape
    from amt_plugin.tasks.adversarial_masked_lm import (
        AdversarialMaskedLMConfig,
        AdversarialMaskedLMTask,
    )

    lengths, tokens = {}, {}
    for multiple in (1, 16):
        task = AdversarialMaskedLMTask.setup_task(AdversarialMaskedLMConfig(
            data=str(zipf_data), tokens_per_sample=64, seed=1, sample_break_mode="complete",
            pad_to_multiple=multiple))
        task.load_dataset("train")
        batches = task.get_batch_iterator(task.dataset("train"), max_sentences=16,
                                          seed=1).next_epoch_itr(shuffle=False)
        lengths[multiple], tokens[multiple] = set(), 0
        for batch in batches:
            lengths[multiple].add(batch["net_input"]["src_tokens"].size(1))
            tokens[multiple] += batch["ntokens"]
    assert len(lengths[1]) > 8 and max(lengths[1]) <= 64
    assert lengths[16] <= {16, 32, 48, 64}
    assert tokens[16] == tokens[1]  # the same blocks, only padded further


def test_cuda_graphs_refuse_gradient_accumulation_at_start_up(zipf_data, tmp_path):
    # each replay overwrites the last one's outputs, the gradients among them: refused before
    # any training (on a CPU too, where the mode has no graphs: the run is meant for a GPU)
    with pytest.raises(AssertionError, match="cannot accumulate gradients over micro-batches"):
        train(zipf_data, tmp_path / "ck", "--max-update", "2", "--torch-compile",
              "--torch-compile-mode", "reduce-overhead", "--update-freq", "2")
