"""Train a SentencePiece BPE model on a training text and encode text files with it.

    python scripts/spm_bpe.py train --input train.txt --model-prefix DIR/spm --vocab-size 8000
    python scripts/spm_bpe.py encode --model DIR/spm.model IN.txt OUT.bpe [IN OUT ...]

Encoded files hold space-separated pieces ('\u2581' marks a word start), the input
`fairseq-preprocess` expects and what `--mask-whole-words` reads word boundaries from.
"""

from __future__ import annotations

import argparse
import os
import sys

import sentencepiece as spm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train")
    train.add_argument("--input", required=True)
    train.add_argument("--model-prefix", required=True)
    train.add_argument("--vocab-size", type=int, default=8000)
    encode = sub.add_parser("encode")
    encode.add_argument("--model", required=True)
    encode.add_argument("files", nargs="+", help="pairs: input output")
    args = parser.parse_args(argv)

    if args.command == "train":
        spm.SentencePieceTrainer.train(
            input=args.input, model_prefix=args.model_prefix, vocab_size=args.vocab_size,
            model_type="bpe", character_coverage=1.0, num_threads=os.cpu_count() or 1,
            # fairseq's dictionary adds its own <s> <pad> </s> <unk>; keep SentencePiece's
            # ids out of the text so the two do not collide
            bos_id=-1, eos_id=-1, unk_surface="<unk>", minloglevel=2,
        )
        return 0
    if len(args.files) % 2:
        parser.error("encode takes pairs of files: input output")
    sp = spm.SentencePieceProcessor(model_file=args.model)
    for src, dst in zip(args.files[::2], args.files[1::2]):
        with open(src) as fin, open(dst + ".tmp", "w") as fout:
            for line in fin:
                fout.write(" ".join(sp.encode(line.strip(), out_type=str)) + "\n")
        os.replace(dst + ".tmp", dst)  # a finished file only ever appears whole
    return 0


if __name__ == "__main__":
    sys.exit(main())
