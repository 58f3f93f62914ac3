"""Subword encoding for AMT: SentencePiece BPE trained on the corpus, or fairseq's GPT-2 BPE.

    python scripts/bpe.py train --input train.txt --out BPE_DIR --vocab-size 8000
    python scripts/bpe.py encode --bpe-dir BPE_DIR IN.txt OUT.bpe [IN OUT ...]

A BPE directory holds either `spm.model` (SentencePiece; pieces written as text, '\u2581'
marking a word start, which --mask-whole-words reads) or GPT-2's `encoder.json`, `vocab.bpe`
and `dict.txt` (token ids written as text, as fairseq's RoBERTa recipe does).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path


def train_sentencepiece(text: Path, out: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(out / "spm"), vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, num_threads=os.cpu_count() or 1,
            # fairseq's dictionary adds its own <s> <pad> </s> <unk>; keep SentencePiece's
            # control symbols out of the text so the two do not collide
            bos_id=-1, eos_id=-1, minloglevel=2,
        )
    except RuntimeError as e:
        for made in ("spm.model", "spm.vocab"):
            (out / made).unlink(missing_ok=True)
        too_high = re.search(r"Vocabulary size too high.*<= (\d+)", str(e))
        if too_high:
            raise ValueError(
                f"{text} is too small for a vocabulary of {vocab_size} pieces (SentencePiece "
                f"finds at most {too_high[1]} in it): use a larger corpus, or --vocab-size "
                f"{too_high[1]} or less") from None
        raise


def check_matches(bpe_dir: Path, symbols: list[str], dict_txt: Path | str) -> None:
    """Raise ValueError unless a dictionary's symbols (dict.txt's, without fairseq's specials)
    were made from text that this BPE encoded: every symbol a SentencePiece piece, or every
    GPT-2 id one of encoder.json's."""
    symbols = [s for s in symbols if not s.startswith("madeupword") and s != "<mask>"]
    if (bpe_dir / "spm.model").is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(bpe_dir / "spm.model"))
        known = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    else:
        encoder = json.loads((bpe_dir / "encoder.json").read_text(encoding="utf-8"))
        known = {str(i) for i in encoder.values()}
    foreign = [s for s in symbols if s not in known]
    if foreign:
        raise ValueError(
            f"the BPE in {bpe_dir} does not match {dict_txt}: {len(foreign)} of its "
            f"{len(symbols)} symbols are not pieces of that BPE (first: {foreign[0]!r}). Pass "
            "the BPE directory the data was binarized with (run.sh's OUT/bpe)")


def load_encoder(bpe_dir: Path) -> Callable[[str], str]:
    """line -> space-separated subwords, for whichever BPE the directory holds."""
    if (bpe_dir / "spm.model").is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(bpe_dir / "spm.model"))
        return lambda line: " ".join(sp.encode(line.strip(), out_type=str))
    if all((bpe_dir / f).is_file() for f in ("encoder.json", "vocab.bpe", "dict.txt")):
        from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

        enc = get_encoder(str(bpe_dir / "encoder.json"), str(bpe_dir / "vocab.bpe"))
        return lambda line: " ".join(map(str, enc.encode(line.strip())))
    raise FileNotFoundError(
        f"{bpe_dir} holds neither spm.model nor GPT-2's encoder.json, vocab.bpe and dict.txt"
    )


def encode_files(bpe_dir: Path, pairs: list[tuple[Path, Path]]) -> None:
    encode = load_encoder(bpe_dir)
    for src, dst in pairs:
        tmp = dst.with_name(dst.name + ".partial")
        with open(src, encoding="utf-8") as fin, open(tmp, "w", encoding="utf-8") as fout:
            for line in fin:
                fout.write(encode(line) + "\n")
        tmp.replace(dst)  # a finished file only ever appears whole


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train SentencePiece BPE")
    train.add_argument("--input", type=Path, required=True)
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--vocab-size", type=int, default=8000)
    encode = sub.add_parser("encode", help="encode text files")
    encode.add_argument("--bpe-dir", type=Path, required=True)
    encode.add_argument("files", nargs="+", type=Path, help="pairs: input output")
    args = parser.parse_args(argv)
    if args.command == "train":
        train_sentencepiece(args.input, args.out, args.vocab_size)
    else:
        if len(args.files) % 2:
            parser.error("encode takes pairs of files: input output")
        encode_files(args.bpe_dir, list(zip(args.files[::2], args.files[1::2])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
