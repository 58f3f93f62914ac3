"""Faults during training (tests/e2e/faults.py injects them): each is survived with the update
skipped and logged, or stops the run with a clear message; no checkpoint ever holds
non-finite weights, and a failed save leaves the earlier checkpoints intact."""

import json
import math
import subprocess
import sys

import pytest
import torch

from amt_plugin import checkpoints
from tests.e2e.conftest import ENV, ROOT, json_logs, train_args

pytestmark = pytest.mark.slow
FAULTS = str(ROOT / "tests" / "e2e" / "faults.py")


def faulty_train(data, save_dir, faults: dict, *extra):
    cmd = [sys.executable, FAULTS, *train_args(data, save_dir, "--log-interval", "1", *extra)[1:]]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**ENV, "AMT_TEST_FAULTS": json.dumps(faults)}, timeout=600)


def all_finite(path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return not checkpoints.nonfinite_weights(state["model"])


def steps(path) -> dict[str, int]:
    opt = torch.load(path, map_location="cpu", weights_only=True)["last_optimizer_state"]
    return {g["name"]: int(opt["state"][g["params"][0]]["step"]) for g in opt["param_groups"]}


def test_a_nan_loss_skips_its_update_and_training_goes_on(zipf_data, tmp_path):
    proc = faulty_train(zipf_data, tmp_path / "ck", {"nan_loss_at": [3]}, "--max-update", "8",
                        "--masker-warmup-updates", "2")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.count("this update is skipped") == 1
    assert "NaN/inf gradients (predictor, masker)" in proc.stdout
    inner = json_logs(proc.stdout, "train_inner")
    assert [int(e["num_updates"]) for e in inner] == list(range(1, 9))
    assert float(inner[3]["gnorm"]) == 0  # the skipped update's, as the trainer saw it
    assert all(math.isfinite(float(e["loss"])) and float(e["gnorm"]) > 0
               for e in inner[:3] + inner[4:])
    last = tmp_path / "ck" / "checkpoint_last.pt"
    assert all_finite(last)
    # update 3 moved nothing: Adam took 7 steps for the predictor, 5 for the masker (2-7)
    assert steps(last) == {"predictor": 7, "masker": 5}
    reward_mean = torch.load(last, weights_only=True)["model"]["masker._extra_state"]
    assert reward_mean.numel() == 1 and torch.isfinite(reward_mean).all()


def test_nan_masker_logits_skip_the_update_naming_the_masker(zipf_data, tmp_path):
    proc = faulty_train(zipf_data, tmp_path / "ck", {"nan_masker_at": [4, 5]}, "--max-update",
                        "8", "--masker-warmup-updates", "2")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.count("NaN/inf gradients (masker): this update is skipped") == 2
    assert all_finite(tmp_path / "ck" / "checkpoint_last.pt")
    assert steps(tmp_path / "ck" / "checkpoint_last.pt") == {"predictor": 6, "masker": 4}


def test_gradients_that_stay_nan_stop_the_run_cleanly(zipf_data, tmp_path):
    save = tmp_path / "ck"
    proc = faulty_train(zipf_data, save, {"nan_loss_at": list(range(4, 100))}, "--max-update",
                        "20", "--save-interval-updates", "2", "--skip-nonfinite-updates", "3")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "4 update(s) in a row had NaN/inf gradients" in proc.stdout
    assert "--skip-nonfinite-updates 3" in proc.stdout and "Traceback" not in proc.stdout
    assert not (save / "crash.pt").exists()
    saved = sorted(save.glob("checkpoint*.pt"))
    assert saved and all(all_finite(p) for p in saved)
    # saved at 2, 4, 6: the skipped updates moved no weight
    a = torch.load(save / "checkpoint_1_4.pt", weights_only=True)["model"]
    b = torch.load(save / "checkpoint_1_6.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_weights_are_never_written(zipf_data, tmp_path):
    save = tmp_path / "ck"
    proc = faulty_train(zipf_data, save, {"nan_weight_at": 4}, "--max-update", "10",
                        "--save-interval-updates", "2", "--keep-interval-updates", "-1")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "not writing" in proc.stdout and "weight tensor(s) are not finite" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert sorted(p.name for p in save.iterdir()) == [
        "checkpoint_1_2.pt", "checkpoint_best.pt", "checkpoint_last.pt"]
    assert all(all_finite(p) for p in save.iterdir())


def test_a_full_disk_during_a_save_stops_cleanly_and_keeps_the_earlier_checkpoints(
        zipf_data, tmp_path):
    save = tmp_path / "ck"
    proc = faulty_train(zipf_data, save, {"enospc_in_save": 3}, "--max-update", "10",
                        "--save-interval-updates", "2", "--keep-interval-updates", "-1",
                        "--disable-validation")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert f"could not write {save / 'checkpoint_1_6.pt'}: No space left on device" \
        in proc.stdout
    assert "Free space in" in proc.stdout and "Traceback" not in proc.stdout
    assert sorted(p.name for p in save.iterdir()) == [
        "checkpoint_1_2.pt", "checkpoint_1_4.pt", "checkpoint_last.pt"]
    assert all(checkpoints.damage(p) is None for p in save.iterdir())
    assert torch.load(save / "checkpoint_last.pt", weights_only=True)[
        "optimizer_history"][-1]["num_updates"] == 4
    # space freed: the same command resumes from update 4
    proc = faulty_train(zipf_data, save, {}, "--max-update", "10", "--save-interval-updates",
                        "2", "--keep-interval-updates", "-1", "--disable-validation")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert int(json_logs(proc.stdout, "train_inner")[0]["num_updates"]) == 5


def test_fp16_overflow_is_skipped_and_the_loss_scale_recovers(zipf_data, tmp_path):
    # a loss scale of 2^24 overflows fp16 gradients: fairseq's scaler halves it per skipped
    # update until they fit, then training goes on
    proc = faulty_train(zipf_data, tmp_path / "ck", {"cuda_shim": True}, "--max-update", "6",
                        "--fp16", "--fp16-no-flatten-grads", "--fp16-init-scale", str(2 ** 24),
                        "--masker-warmup-updates", "2")
    assert proc.returncode == 0, proc.stdout[-3000:]
    overflows = proc.stdout.count("gradient overflow detected")
    assert overflows >= 2
    inner = json_logs(proc.stdout, "train_inner")
    assert int(inner[-1]["num_updates"]) == 6
    assert float(inner[-1]["loss_scale"]) < 2 ** 24
    assert all(math.isfinite(float(e["loss"])) for e in inner)
    assert all_finite(tmp_path / "ck" / "checkpoint_last.pt")


@pytest.mark.parametrize("batch", [["--batch-size", "1"],
                                   ["--batch-size", "1", "--tokens-per-sample", "2"]],
                         ids=["one-sequence", "one-sequence-of-two-tokens"])
def test_a_batch_of_one_short_sequence_trains(zipf_data, tmp_path, batch):
    proc = faulty_train(zipf_data, tmp_path / "ck", {}, "--max-update", "6",
                        "--masker-warmup-updates", "2", "--max-positions", "64", *batch)
    assert proc.returncode == 0, proc.stdout[-3000:]
    inner = json_logs(proc.stdout, "train_inner")
    assert len(inner) == 6 and all(math.isfinite(float(e["loss"])) for e in inner)
    assert all_finite(tmp_path / "ck" / "checkpoint_last.pt")
