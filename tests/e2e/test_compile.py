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
    compiled = train(zipf_data, tmp_path / "compiled", *flags, "--torch-compile")
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
