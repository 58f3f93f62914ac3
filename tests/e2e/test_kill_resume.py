"""Kill learned-masking pretraining anywhere, resume it with the same command: the final state
is bit-identical to an uninterrupted run's (benchmarks/kill_resume.py, at test size)."""

import signal
import sys

import pytest

from tests.e2e.conftest import ENV, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import kill_resume  # noqa: E402

pytestmark = pytest.mark.slow


# 40 updates cross two epoch ends with --update-freq 2 (15 updates an epoch) and one with 1
# (29 an epoch); checkpoints every 3 updates, so most resumes land mid-epoch
@pytest.mark.parametrize("update_freq,scheduler", [
    (1, []),
    (2, ["--lr-scheduler", "reduce_lr_on_plateau", "--lr-patience", "0", "--lr-shrink", "0.5"]),
], ids=["update-freq-1", "update-freq-2-plateau"])
def test_killed_anywhere_and_resumed_ends_bit_identical(zipf_data, tmp_path, update_freq,
                                                         scheduler):
    cmds = {name: kill_resume.train_command(zipf_data, tmp_path / name, 40, update_freq, 3,
                                            scheduler)
            for name in ("uninterrupted", "killed")}
    code, output = kill_resume.launch(cmds["uninterrupted"], None, ENV)
    assert code == 0, output[-3000:]
    kills = [
        kill_resume.Kill("save", n=2),  # half-way through writing its second checkpoint
        kill_resume.Kill("timer", after=17, delay=0.05),  # mid-epoch, between saves
        kill_resume.Kill("copy", n=1),  # between linking checkpoint_best/last and the rename
        kill_resume.Kill("timer", after=33, delay=0.0),
        kill_resume.Kill("save", n=1),
    ]
    launches = kill_resume.kill_and_resume(cmds["killed"], kills, ENV)
    assert [x["returncode"] for x in launches] == [-signal.SIGKILL] * len(kills) + [0]
    starts = [x["updates"][0] for x in launches if x["updates"]]
    assert all(s > 1 for s in starts[1:]), starts  # every resume continued, none restarted
    assert any((s - 1) % 3 == 0 and s > 1 for s in starts)  # from an interval checkpoint
    assert launches[-1]["updates"][-1] == 40
    save = tmp_path / "killed"
    assert not list(save.glob("*.tmp"))  # what the killed saves left was cleaned up
    diffs = kill_resume.compare(tmp_path / "uninterrupted" / "checkpoint_last.pt",
                                save / "checkpoint_last.pt")
    assert diffs == []
    # the comparison sees everything it should: a changed state is a difference
    state = kill_resume.training_state(save / "checkpoint_last.pt")
    assert {"model", "last_optimizer_state", "optimizer_history", "extra_state", "task_state",
            "criterion"} <= set(state)
    assert state["extra_state"]["train_iterator"]["epoch"] > 1
    assert "masker._extra_state" in state["model"]  # the running reward mean
    assert state["model"]["masker._extra_state"].numel() == 1
    other = kill_resume.training_state(save / "checkpoint_last.pt")
    other["extra_state"]["train_iterator"]["iterations_in_epoch"] += 1
    other["model"]["masker._extra_state"] += 1e-3
    assert len(kill_resume.differences(state, other)) == 2


def test_the_resume_stays_bit_identical_after_a_nonfinite_update_is_skipped(zipf_data, tmp_path):
    """A skipped update (NaN loss) is part of the state: resumed across it, nothing differs."""
    cmds = {name: kill_resume.train_command(zipf_data, tmp_path / name, 16, 1, 3, [])
            for name in ("uninterrupted", "killed")}
    env = {**ENV, "AMT_TEST_FAULTS": '{"nan_loss_at": [7]}'}
    code, output = kill_resume.launch(cmds["uninterrupted"], None, env)
    assert code == 0 and "this update is skipped" in output, output[-3000:]
    launches = kill_resume.kill_and_resume(
        cmds["killed"], [kill_resume.Kill("timer", after=8, delay=0.0)], env)
    assert launches[0]["returncode"] == -signal.SIGKILL
    assert kill_resume.compare(tmp_path / "uninterrupted" / "checkpoint_last.pt",
                               tmp_path / "killed" / "checkpoint_last.pt") == []
