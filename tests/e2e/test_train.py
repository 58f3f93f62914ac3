"""fairseq-train / fairseq-validate with --user-dir amt_plugin on tiny data, on CPU."""

import json
import math
import socket
import subprocess
import sys

import pytest
import torch
from fairseq import checkpoint_utils

from tests.e2e.conftest import BIN, ENV, PLUGIN, ROOT, json_logs, run, train, train_args

pytestmark = pytest.mark.slow

LOGGED = ["loss", "masker_loss", "masker_entropy", "masker_reward", "mask_top100_share",
          "mask_rand_top100_share"]


def test_train_logs_every_key_and_loss_falls_then_validate(zipf_data, tmp_path):
    proc = train(zipf_data, tmp_path / "ck", "--max-update", "40",
                 "--masker-warmup-updates", "10")
    inner = json_logs(proc.stdout, "train_inner")
    assert [int(x["num_updates"]) for x in inner] == list(range(5, 45, 5))
    losses = [float(x["loss"]) for x in inner]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    after_warmup = [x for x in inner if int(x["num_updates"]) > 10]
    for key in LOGGED:
        assert all(key in x for x in after_warmup), key
    valid = json_logs(proc.stdout, "valid")[-1]
    for key in LOGGED:
        assert key in valid, key

    out = run([str(BIN / "fairseq-validate"), str(zipf_data), "--user-dir", PLUGIN,
               "--path", str(tmp_path / "ck" / "checkpoint_last.pt"),
               "--task", "adversarial_masked_lm", "--criterion", "adversarial_masked_lm",
               "--batch-size", "16", "--cpu", "--log-format", "json"])
    result = json_logs(out.stdout, "valid")[-1]
    assert math.isfinite(float(result["loss"]))
    # validation masks are seeded by sample: the same checkpoint gives the same number
    assert result["loss"] == valid["loss"]


def test_resume_continues_the_update_count_and_both_optimizer_states(zipf_data, tmp_path):
    ck = tmp_path / "ck"
    # gradient accumulation over 2 batches too: the schedule counts updates, not batches
    schedule = ["--masker-warmup-updates", "4", "--masker-update-freq", "2",
                "--save-interval-updates", "5", "--update-freq", "2", "--clip-norm", "1.0"]
    train(zipf_data, ck, "--max-update", "10", *schedule)
    first = torch.load(ck / "checkpoint_last.pt", weights_only=True)
    proc = train(zipf_data, ck, "--max-update", "20", *schedule)
    assert "Loaded checkpoint" in proc.stdout and "(epoch 1 @ 10 updates)" in proc.stdout
    assert int(json_logs(proc.stdout, "train_inner")[-1]["num_updates"]) == 20
    last = torch.load(ck / "checkpoint_last.pt", weights_only=True)

    def steps_by_group(ckpt) -> dict[str, set[int]]:
        opt = ckpt["last_optimizer_state"]
        return {g["name"]: {int(opt["state"][i]["step"]) for i in g["params"]}
                for g in opt["param_groups"]}

    # predictor: every update; masker: update_num 4, 6, 8 (then 10, ..., 18 after resuming)
    assert steps_by_group(first) == {"predictor": {10}, "masker": {3}}
    assert steps_by_group(last) == {"predictor": {20}, "masker": {8}}
    # and the masker's running reward mean (its fallback baseline) is saved with it
    for ckpt in (first, last):
        assert math.isfinite(ckpt["model"]["masker._extra_state"].item())


def test_random_strategy_never_moves_the_masker(zipf_data, tmp_path):
    ck = tmp_path / "ck"
    proc = train(zipf_data, ck, "--max-update", "12", "--masking-strategy", "random",
                 "--save-interval-updates", "6", "--keep-interval-updates", "2")
    inner = json_logs(proc.stdout, "train_inner")
    assert all(float(x["masker_chooses"]) == 0 for x in inner)
    assert all(math.isfinite(float(x["loss"])) for x in inner)
    share = [float(x["mask_top100_share"]) for x in inner]
    rand = [float(x["mask_rand_top100_share"]) for x in inner]
    assert abs(sum(share) / len(share) - sum(rand) / len(rand)) < 0.05
    mid = torch.load(ck / "checkpoint_1_6.pt", weights_only=True)["model"]
    end = torch.load(ck / "checkpoint_1_12.pt", weights_only=True)["model"]
    masker_keys = [k for k in end if k.startswith("masker.")]
    assert masker_keys and all(torch.equal(mid[k], end[k]) for k in masker_keys)
    assert not torch.equal(mid["encoder.lm_head.bias"], end["encoder.lm_head.bias"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_distributed_run(procs_outputs: list[tuple[int, str]], save_dir) -> None:
    for rc, log in procs_outputs:
        assert rc == 0, log[-3000:]
    logs = "\n".join(log for _, log in procs_outputs)
    inner = json_logs(logs, "train_inner")
    assert inner and all(math.isfinite(float(x["loss"])) for x in inner)
    assert float(inner[-1]["masker_trains"]) == 1
    # both ranks' batches are counted: 2 x 16 sequences per update
    assert float(inner[-1]["bsz"]) > 16
    state = checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))
    assert state["optimizer_history"][-1]["num_updates"] == 12


GLOO = ["--ddp-backend", "legacy_ddp", "--distributed-backend", "gloo",
        "--max-update", "12", "--masker-warmup-updates", "4"]


# bf16 weights: amt_adam sums the two micro-batches in fp32 and all-reduces that sum in fp32
# itself (legacy_ddp reduces nothing); tests/e2e/test_pytorch_ddp.py checks the sums
@pytest.mark.parametrize("precision", [[], ["--bf16-weights", "--update-freq", "2"]],
                         ids=["fp32", "bf16-weights"])
def test_two_processes_with_gloo(zipf_data, tmp_path, precision):
    port = free_port()
    distributed = [*GLOO, "--distributed-init-method", f"tcp://127.0.0.1:{port}",
                   "--distributed-no-spawn", "--distributed-world-size", "2", *precision]
    procs = [
        subprocess.Popen(train_args(zipf_data, tmp_path / "ck", *distributed,
                                    "--distributed-rank", str(rank)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    check_distributed_run([(p.returncode, out) for p, out in zip(procs, outputs)],
                          tmp_path / "ck")


def test_two_processes_under_torchrun(zipf_data, tmp_path):
    train_cmd = train_args(zipf_data, tmp_path / "ck", *GLOO)
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
           "--no-python", str(ROOT / "scripts" / "torchrun_train.sh"), *train_cmd[1:]]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**ENV, "PATH": f"{BIN}:{ENV['PATH']}"}, timeout=300)
    check_distributed_run([(proc.returncode, proc.stdout)], tmp_path / "ck")


def test_two_nodes_over_loopback(zipf_data, tmp_path):
    """Two torchrun "nodes" (--nnodes 2, one process each) over 127.0.0.1 with gloo, as the
    multi-node recipe in docs/multi-node.md runs them: after every update the ranks' weights
    agree and their masks differ. 29 batches an epoch: at its end one rank has none and
    trains on fairseq's dummy batch."""
    port, trace = free_port(), tmp_path / "trace"
    train_cmd = train_args(zipf_data, tmp_path / "ck", *GLOO[:4], "--max-update", "16",
                           "--masker-warmup-updates", "4", "--log-interval", "4")
    env = {**ENV, "PATH": f"{BIN}:{ENV['PATH']}",
           "AMT_TEST_FAULTS": json.dumps({"trace": str(trace)}),
           "FAIRSEQ_TRAIN": f"{sys.executable} {ROOT / 'tests' / 'e2e' / 'faults.py'}"}
    nodes = [subprocess.Popen(
        [str(BIN / "torchrun"), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node",
         "1", "--master-addr", "127.0.0.1", "--master-port", str(port), "--no-python",
         str(ROOT / "scripts" / "torchrun_train.sh"), *train_cmd[1:]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for node in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    ranks = [[json.loads(line) for line in open(f"{trace}.rank{r}")] for r in (0, 1)]
    assert [e["update"] for e in ranks[0]] == [e["update"] for e in ranks[1]] == \
        list(range(1, 17))
    for a, b in zip(*ranks):
        assert a["weights"] == b["weights"], a["update"]
        assert a["masks"] != b["masks"], a["update"]
    assert len({e["weights"] for e in ranks[0]}) == 16  # they moved every update
    assert sum(e["empty_batch"] for r in ranks for e in r) == 1
    state = torch.load(tmp_path / "ck" / "checkpoint_last.pt", weights_only=True)
    opt = state["last_optimizer_state"]
    assert {g["name"]: int(opt["state"][g["params"][0]]["step"]) for g in opt["param_groups"]} \
        == {"predictor": 16, "masker": 12}  # both roles trained


def test_lines_longer_than_a_block_are_counted_and_the_fix_named(zipf_data, tmp_path):
    proc = train(zipf_data, tmp_path / "ckpt", "--max-update", "1", "--tokens-per-sample", "12",
                 "--max-positions", "12", "--sample-break-mode", "complete", "--no-save",
                 "--skip-invalid-size-inputs-valid-test")  # as the configs do
    warning = [line for line in proc.stdout.splitlines() if "lines longer than" in line]
    assert any("train: " in line and "--tokens-per-sample 12" in line
               and "use --sample-break-mode none" in line for line in warning), warning


def test_adaptive_masking_trains_and_resumes_with_its_statistics(zipf_data, tmp_path):
    save = tmp_path / "ckpt"
    train(zipf_data, save, "--masking-strategy", "adaptive", "--max-update", "4")
    state = checkpoint_utils.load_checkpoint_to_cpu(str(save / "checkpoint_last.pt"))
    acc = state["extra_state"]["AdversarialMaskedLMTask"]["type_accuracy"]
    assert acc.dtype == torch.float32 and 0 < int((acc > 0).sum()) and float(acc.max()) <= 1
    proc = train(zipf_data, save, "--masking-strategy", "adaptive", "--max-update", "6",
                 "--log-interval", "1")
    assert [int(e["num_updates"]) for e in json_logs(proc.stdout, "train_inner")] == [5, 6]
    resumed = checkpoint_utils.load_checkpoint_to_cpu(str(save / "checkpoint_last.pt"))
    assert not torch.equal(resumed["extra_state"]["AdversarialMaskedLMTask"]["type_accuracy"],
                           acc)  # it went on learning from where it was


def test_the_masking_rate_decays_over_the_schedule_in_training(zipf_data, tmp_path):
    proc = train(zipf_data, tmp_path / "ck", "--max-update", "8", "--log-interval", "1",
                 "--masking-strategy", "random", "--mask-prob-start", "0.3",
                 "--schedule-updates", "6", "--no-save")
    shares = [float(e["masked_share"]) for e in json_logs(proc.stdout, "train_inner")]
    assert len(shares) == 8
    assert 0.27 < shares[0] < 0.33 and all(0.14 < s < 0.16 for s in shares[6:])
    assert all(a >= b for a, b in zip(shares[:7], shares[1:7]))  # it falls, never rises
