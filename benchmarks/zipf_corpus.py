"""The benchmarks' synthetic corpus: Zipf-distributed words, binarized by fairseq-preprocess."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path


def make_corpus(workdir: Path, vocab: int, train_lines: int, valid_lines: int,
                words_per_line: tuple[int, int], workers: int = 1) -> Path:
    """Write train/valid text of `vocab` word types (p ~ 1/rank), binarize it; the data dir."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(vocab)]
    weights = [1 / (i + 1) for i in range(vocab)]
    for split, n in (("train", train_lines), ("valid", valid_lines)):
        with open(workdir / f"{split}.txt", "w") as f:
            for _ in range(n):
                f.write(" ".join(rng.choices(words, weights, k=rng.randint(*words_per_line)))
                        + "\n")
    subprocess.run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
                    "--trainpref", str(workdir / "train.txt"),
                    "--validpref", str(workdir / "valid.txt"),
                    "--destdir", str(workdir / "bin"), "--workers", str(workers)],
                   check=True, capture_output=True)
    return workdir / "bin"
