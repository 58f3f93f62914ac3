"""Checkpoints load on torch >= 2.6 with weights-only unpickling on, and nothing else does."""

import os
import pickle

import pytest
import torch
from fairseq import checkpoint_utils

import amt_plugin  # noqa: F401  (allow-lists fairseq's checkpoint types)
from amt_plugin.models.amt import AMTModel
from tests.e2e.conftest import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(zipf_data, tmp_path_factory):
    ck = tmp_path_factory.mktemp("ck")
    train(zipf_data, ck, "--max-update", "6", "--masker-warmup-updates", "2")
    return ck / "checkpoint_last.pt"


def test_no_global_switch_is_used():
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_real_checkpoint_loads_weights_only(checkpoint, zipf_data):
    state = torch.load(checkpoint, weights_only=True)  # what torch >= 2.6 does by default
    assert state["optimizer_history"][-1]["num_updates"] == 6
    assert any(k.startswith("masker.") for k in state["model"])
    state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))  # fairseq's own path
    assert "model" in state
    hub = AMTModel.from_pretrained(str(checkpoint.parent), checkpoint_file=checkpoint.name,
                                   data_name_or_path=str(zipf_data), bpe=None)
    tokens = hub.task.source_dictionary.encode_line("w1 w2 w3", append_eos=True).long()
    features = hub.extract_features(tokens)
    assert features.shape == (1, len(tokens), 128) and torch.isfinite(features).all()


class Payload:
    """Stands for anything a checkpoint should not be able to smuggle in."""

    def __reduce__(self):
        return (os.system, ("touch should-never-exist",))


def test_checkpoint_carrying_an_unexpected_object_is_refused(checkpoint, tmp_path, monkeypatch):
    state = torch.load(checkpoint, weights_only=True)
    state["extra_state"]["payload"] = Payload()
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    monkeypatch.chdir(tmp_path)  # where the payload would write
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoint_utils.load_checkpoint_to_cpu(str(bad))
    assert not (tmp_path / "should-never-exist").exists()
