"""--torch-compile: the same training as eager, the same checkpoints."""

import pytest
import torch

from tests.e2e.conftest import json_logs, train

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
