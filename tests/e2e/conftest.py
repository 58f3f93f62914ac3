"""Real fairseq command-line runs on tiny data made by the tests."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from amt_plugin import logs

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLUGIN = str(ROOT / "amt_plugin")

# One thread per process: faster on 2 cores, and gloo ranks do not fight over them.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(cmd: list[str], timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; its stdout and stderr together in .stdout (fairseq logs to both)."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env=ENV, **kwargs)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc


def preprocess(text_dir: Path, dest: Path) -> Path:
    run([str(BIN / "fairseq-preprocess"), "--only-source",
         "--trainpref", str(text_dir / "train.txt"), "--validpref", str(text_dir / "valid.txt"),
         "--destdir", str(dest), "--workers", "1"])
    return dest


TRAIN_DEFAULTS = [
    "--user-dir", PLUGIN, "--task", "adversarial_masked_lm",
    "--criterion", "adversarial_masked_lm", "--arch", "amt_tiny",
    "--optimizer", "amt_adam", "--lr", "1e-3", "--masker-lr", "1e-3",
    "--tokens-per-sample", "64", "--batch-size", "16", "--seed", "1",
    "--cpu", "--num-workers", "0", "--no-progress-bar",
    "--log-format", "json", "--log-interval", "5", "--no-epoch-checkpoints",
]


def train_args(data: Path, save_dir: Path, *extra: str) -> list[str]:
    return [str(BIN / "fairseq-train"), str(data), "--save-dir", str(save_dir),
            *TRAIN_DEFAULTS, *extra]


def train(data: Path, save_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run(train_args(data, save_dir, *extra))


def json_logs(output: str, kind: str) -> list[dict]:
    """fairseq's logged lines of one kind (train_inner, train, valid), through the project's
    one log reader (keys without json's `valid_` prefix, numbers as floats)."""
    return logs.records(output, kind)


def zipf_text(path: Path, lines: int, seed: int) -> None:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(300)]
    weights = [1 / (i + 1) for i in range(300)]
    with open(path, "w") as f:
        for _ in range(lines):
            f.write(" ".join(rng.choices(words, weights, k=rng.randint(5, 30))) + "\n")


@pytest.fixture(scope="session")
def zipf_data(tmp_path_factory) -> Path:
    """A small Zipf-distributed corpus (300 types), binarized."""
    d = tmp_path_factory.mktemp("zipf")
    zipf_text(d / "train.txt", 1500, seed=0)
    zipf_text(d / "valid.txt", 150, seed=1)
    return preprocess(d, d / "bin")
