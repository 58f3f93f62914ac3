"""Checkpoints that survive a kill: atomic copies, a damaged checkpoint_last.pt on start, and a
finished run that is restarted."""

import os
import subprocess

import pytest

from amt_plugin import checkpoints
from tests.e2e.conftest import ENV, json_logs, train, train_args

pytestmark = pytest.mark.slow
SAVE = ["--save-interval-updates", "2", "--keep-interval-updates", "-1", "--log-interval", "1"]


def test_atomic_copy_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    src, dst = tmp_path / "checkpoint_1_2.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old")
    assert checkpoints.atomic_copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == src.read_bytes()
    assert not (tmp_path / "checkpoint_last.pt.tmp").exists()
    # fairseq replaces a checkpoint by writing FILE.tmp and renaming it: the copy is unmoved
    (tmp_path / "new.tmp").write_bytes(b"newer")
    (tmp_path / "new.tmp").replace(src)
    assert dst.read_bytes() == b"new" * 1000
    src2 = tmp_path / "checkpoint_1_4.pt"
    src2.write_bytes(b"newest")

    def killed(*args):
        raise KeyboardInterrupt  # the process dies between the copy and the rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.atomic_copy(str(src2), str(dst), overwrite=True)
    assert dst.read_bytes() == b"new" * 1000  # the last complete copy, untouched
    assert not checkpoints.atomic_copy(str(src2), str(dst), overwrite=False)


def truncate(path, size):
    """A checkpoint_last.pt cut short, as stock fairseq's copy leaves it when killed (a new
    file: checkpoint_last.pt shares its bytes with the checkpoint it was linked from)."""
    data = path.read_bytes()[:size]
    path.unlink()
    path.write_bytes(data)


def run(cmd):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=ENV, timeout=600)


def test_damaged_last_checkpoint_resumes_from_the_newest_intact_one(zipf_data, tmp_path):
    save = tmp_path / "ckpt"
    train(zipf_data, save, "--max-update", "4", *SAVE)
    last = save / "checkpoint_last.pt"
    assert checkpoints.damage(last) is None
    truncate(last, last.stat().st_size // 2)
    assert "BadZipFile" in checkpoints.damage(last)
    proc = run(train_args(zipf_data, save, "--max-update", "6", *SAVE))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "checkpoint_last.pt is damaged" in proc.stdout
    assert f"resuming from {save / 'checkpoint_1_4.pt'}" in proc.stdout
    updates = [int(e["num_updates"]) for e in json_logs(proc.stdout, "train_inner")]
    assert updates == [5, 6]  # from update 4, not from scratch
    assert checkpoints.damage(last) is None  # the next save wrote a complete one


def test_damaged_last_checkpoint_with_nothing_to_fall_back_on_stops_cleanly(zipf_data, tmp_path):
    save = tmp_path / "ckpt"
    train(zipf_data, save, "--max-update", "2", "--log-interval", "1")
    last = save / "checkpoint_last.pt"
    for other in save.glob("checkpoint_*.pt"):
        if other != last:
            other.unlink()
    truncate(last, 1000)
    before = last.read_bytes()
    proc = run(train_args(zipf_data, save, "--max-update", "4"))
    assert proc.returncode != 0
    assert "is damaged" in proc.stdout and "no intact checkpoint to resume from" in proc.stdout
    assert "UnpicklingError" not in proc.stdout and "PytorchStreamReader" not in proc.stdout
    assert last.read_bytes() == before  # left as it was
    assert sorted(p.name for p in save.iterdir()) == ["checkpoint_last.pt"]


def test_a_finished_run_started_again_trains_nothing(zipf_data, tmp_path):
    save = tmp_path / "ckpt"
    cmd = train_args(zipf_data, save, "--max-update", "3", "--log-interval", "1")
    first = run(cmd)
    assert first.returncode == 0, first.stdout[-3000:]
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in save.iterdir()}
    again = run(cmd)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "this run has finished: 3 updates of --max-update 3" in again.stdout
    assert json_logs(again.stdout, "train_inner") == []
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in save.iterdir()} == files


def test_a_missing_last_checkpoint_beside_interval_ones_resumes_from_the_newest(zipf_data,
                                                                                 tmp_path):
    """A run killed during its first save's copy has checkpoint_1_N.pt but no
    checkpoint_last.pt: it resumes from there, not from scratch."""
    save = tmp_path / "ckpt"
    train(zipf_data, save, "--max-update", "4", *SAVE)
    (save / "checkpoint_last.pt").unlink()
    (save / "checkpoint_best.pt").unlink()
    (save / "checkpoint_1_4.pt.tmp").write_bytes(b"half a checkpoint")  # a killed write
    proc = run(train_args(zipf_data, save, "--max-update", "6", *SAVE))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"is missing but {save / 'checkpoint_1_4.pt'} is there" in proc.stdout
    assert [int(e["num_updates"]) for e in json_logs(proc.stdout, "train_inner")] == [5, 6]
    assert not (save / "checkpoint_1_4.pt.tmp").exists()
