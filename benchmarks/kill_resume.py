"""Kill pretraining anywhere, resume it with the same command, and compare with a run that was
never interrupted.

    .venv/bin/python benchmarks/kill_resume.py DATA [--updates 200] [--kills 12]
        [--update-freq 1] [--save-interval-updates 7] [--seed 0] [--out runs/kill_resume]
        [-- extra fairseq-train arguments]

DATA is a binarized corpus (fairseq-preprocess). The script trains learned masking
(amt_tiny unless the extra arguments say otherwise) twice into two save directories:

1. once, uninterrupted, to --updates;
2. again, launched over and over with the same command, each launch killed with SIGKILL at a
   moment drawn from --seed: a random time after a random update, half-way through writing a
   checkpoint, or between a checkpoint copy's link and its rename (fault injection:
   tests/e2e/faults.py). After --kills kills a last launch runs to the end.

It then compares the two final checkpoints: the predictor's and the masker's weights, the
running reward mean, both optimizer states, the learning-rate schedule and update count, the
data position (epoch, batch within it), the task's state and the best validation loss. Only
the wall-clock fields (training time, logged meters) are left out. On a CPU they must be
bit-identical; the script prints every difference and exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import amt_plugin  # noqa: E402,F401  (fairseq's checkpoint types allowed for weights_only)
from amt_plugin import logs  # noqa: E402

FAULTS = ROOT / "tests" / "e2e" / "faults.py"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# extra_state fields that hold wall-clock time, not training state
WALL_CLOCK = {"metrics", "previous_training_time"}


def train_command(data: Path, save_dir: Path, updates: int, update_freq: int,
                  save_interval: int, extra: list[str]) -> list[str]:
    return [
        sys.executable, str(FAULTS), str(data), "--save-dir", str(save_dir),
        "--user-dir", str(ROOT / "amt_plugin"), "--task", "adversarial_masked_lm",
        "--criterion", "adversarial_masked_lm", "--arch", "amt_tiny",
        "--optimizer", "amt_adam", "--lr", "1e-3", "--masker-lr", "1e-3",
        *([] if "--lr-scheduler" in extra else [
            "--lr-scheduler", "polynomial_decay", "--warmup-updates",
            str(max(updates // 10, 1)), "--total-num-update", str(updates)]),
        "--masker-warmup-updates", str(updates // 5),
        "--tokens-per-sample", "64", "--batch-size", "16", "--seed", "1", "--dropout", "0.1",
        "--cpu", "--num-workers", "0", "--no-progress-bar", "--log-format", "json",
        "--log-interval", "1", "--max-update", str(updates), "--update-freq", str(update_freq),
        "--save-interval-updates", str(save_interval), "--keep-interval-updates", "2",
        "--no-epoch-checkpoints", *extra,
    ]


@dataclass
class Kill:
    """How one launch dies: `timer` (SIGKILL `delay` seconds after update `after` is logged),
    `save` (half-way through its n-th checkpoint write) or `copy` (between its n-th
    checkpoint copy's link and rename)."""

    how: str
    after: int = 0
    delay: float = 0.0
    n: int = 1


def plan(kills: int, updates: int, seed: int) -> list[Kill]:
    rng = random.Random(seed)
    out = []
    for i in range(kills):
        how = ("timer", "save", "copy")[i % 3]
        out.append(Kill(how, after=rng.randrange(1, updates), delay=rng.uniform(0, 0.3),
                        n=rng.randint(1, 3)))
    rng.shuffle(out)
    return out


def launch(cmd: list[str], kill: Kill | None, env: dict) -> tuple[int, str]:
    """One launch of `cmd`; returns its exit status (-9: killed) and its output."""
    faults = json.loads(env.get("AMT_TEST_FAULTS", "{}"))  # others the caller asks for
    if kill is not None and kill.how == "save":
        faults["kill_in_save"] = kill.n
    if kill is not None and kill.how == "copy":
        faults["kill_in_copy"] = kill.n
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "AMT_TEST_FAULTS": json.dumps(faults)})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if kill is None or kill.how != "timer":
            continue
        logged = logs.records(line, "train_inner")
        if logged and logged[0]["num_updates"] >= kill.after:
            time.sleep(kill.delay)
            proc.send_signal(signal.SIGKILL)
            break
    rest, _ = proc.communicate(timeout=600)
    return proc.returncode, "".join(lines) + rest


def kill_and_resume(cmd: list[str], kills: list[Kill], env: dict) -> list[dict]:
    """Launch `cmd` once per planned kill, then once to the end; what each launch did."""
    done = []
    for kill in [*kills, None]:
        code, output = launch(cmd, kill, env)
        updates = [int(e["num_updates"]) for e in logs.records(output, "train_inner")]
        done.append({"kill": kill, "returncode": code, "updates": updates, "output": output})
        if code not in (0, -signal.SIGKILL):
            raise RuntimeError(f"launch failed ({code}):\n{output[-4000:]}")
    return done


def differences(a, b, where: str = "") -> list[str]:
    """Every place two checkpoint states differ, bit for bit (NaN equals NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}: key {k} in only one" for k in set(a) ^ set(b)]
        for k in sorted(set(a) & set(b), key=str):
            out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        same = a.dtype == b.dtype and a.shape == b.shape and (torch.equal(a, b) or (
            a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))))
        return [] if same else [f"{where}: tensors differ (max abs {_max_diff(a, b)})"]
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return []
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def _max_diff(a, b) -> str:
    try:
        return f"{(a.double() - b.double()).abs().max().item():.3g}"
    except RuntimeError:
        return "shapes differ"


def training_state(path: Path) -> dict:
    """A checkpoint without its wall-clock fields, its config (the command: the same but for
    --save-dir) and the history of earlier launches."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for command in ("cfg", "args"):
        state.pop(command, None)
    # fairseq appends an entry per launch (criterion, optimizer, schedule, update count):
    # the state is the last one
    state["optimizer_history"] = state["optimizer_history"][-1]
    state["extra_state"] = {k: v for k, v in state["extra_state"].items() if k not in WALL_CLOCK}
    return state


def compare(reference: Path, resumed: Path) -> list[str]:
    return differences(training_state(reference), training_state(resumed))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("--updates", type=int, default=200)
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--update-freq", type=int, default=1)
    p.add_argument("--save-interval-updates", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "kill_resume")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:len(argv) - len(extra) - (1 if extra else 0)])
    args.extra = extra
    env = {**os.environ, **ENV}
    save = {name: args.out / name for name in ("uninterrupted", "killed")}
    for d in save.values():
        if d.exists() and any(d.iterdir()):
            p.error(f"{d} is not empty: pass another --out")
    cmds = {name: train_command(args.data, d, args.updates, args.update_freq,
                                args.save_interval_updates, args.extra)
            for name, d in save.items()}
    code, output = launch(cmds["uninterrupted"], None, env)
    if code != 0:
        print(output[-4000:])
        return 1
    launches = kill_and_resume(cmds["killed"], plan(args.kills, args.updates, args.seed), env)
    killed = sum(x["returncode"] == -signal.SIGKILL for x in launches)
    print("| launch | planned kill | exit | updates logged |\n|---|---|---|---|")
    for i, x in enumerate(launches):
        k = x["kill"]
        what = "none (to the end)" if k is None else (
            f"{k.delay:.2f} s after update {k.after}" if k.how == "timer" else
            f"in checkpoint write {k.n}" if k.how == "save" else f"in checkpoint copy {k.n}")
        span = f"{x['updates'][0]}-{x['updates'][-1]}" if x["updates"] else "none"
        print(f"| {i + 1} | {what} | {x['returncode']} | {span} |")
    diffs = compare(save["uninterrupted"] / "checkpoint_last.pt",
                    save["killed"] / "checkpoint_last.pt")
    print(f"\n{killed} kills survived in {len(launches)} launches; final state against the "
          f"uninterrupted run: {'bit-identical' if not diffs else f'{len(diffs)} differences'}")
    for d in diffs[:50]:
        print(f"  {d}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
