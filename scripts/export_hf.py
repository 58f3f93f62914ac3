"""Export an AMT predictor for Hugging Face transformers: model, config and tokenizer.

    python scripts/export_hf.py CHECKPOINT --out DIR [--data BIN_DIR] [--bpe-dir BPE_DIR]

CHECKPOINT is an AMT checkpoint or its stock fairseq export (scripts/export_roberta.py). DIR
loads offline with transformers alone (no fairseq, no plugin):

    from transformers import AutoModelForMaskedLM, AutoTokenizer
    model = AutoModelForMaskedLM.from_pretrained(DIR)
    tokenizer = AutoTokenizer.from_pretrained(DIR)

DIR holds config.json (`roberta`, or `roberta-prelayernorm` for a pre-LN predictor),
model.safetensors, and tokenizer.json with its tokenizer_config.json; with GPT-2 BPE also
vocab.json and merges.txt, RobertaTokenizer's files. The tokenizer turns text into exactly the
ids the fairseq model saw: fairseq's dictionary orders pieces by count, not by SentencePiece's
or GPT-2's own ids, so the vocabulary maps every piece through dict.txt, and pieces the
dictionary lacks map to <unk> as they do in fairseq. <s> <pad> </s> <unk> <mask> are the same
ids on both sides, and so are the madeupword fillers.

--data defaults to the data directory the checkpoint was trained on (for dict.txt); --bpe-dir
to the `bpe` directory beside it (run.sh's layout), holding spm.model (SentencePiece) or
encoder.json and vocab.bpe (GPT-2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import amt_plugin  # noqa: E402,F401  (weights-only loading of fairseq checkpoints)
from amt_plugin import checkpoints  # noqa: E402

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq's Dictionary: ids 0-3
MASK = "<mask>"  # appended by the masked-LM tasks after dict.txt


# --- the model ------------------------------------------------------------------------------

def load_predictor(checkpoint: Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(model config, the predictor's encoder.* tensors, the data directory it was trained
    on) of an AMT or fairseq RoBERTa file."""
    state = checkpoints.read(checkpoint)
    cfg = state["cfg"]["model"]
    cfg = dict(vars(cfg) if isinstance(cfg, argparse.Namespace) else cfg)
    weights = {k[len("encoder."):]: v for k, v in state["model"].items()
               if k.startswith("encoder.") and not k.endswith(".version")}
    if "sentence_encoder.embed_tokens.weight" not in weights:
        raise SystemExit(f"error: {checkpoint} holds no RoBERTa predictor (encoder.* weights)")
    return cfg, weights, Path(str(state["cfg"]["task"]["data"]).split(":")[0])


def hf_config(cfg: dict, weights: dict[str, torch.Tensor]):
    from transformers import RobertaConfig, RobertaPreLayerNormConfig

    pre_ln = bool(cfg.get("encoder_normalize_before"))
    if pre_ln and "sentence_encoder.layernorm_embedding.weight" not in weights:
        raise SystemExit("error: a pre-LN predictor without an embedding LayerNorm has no "
                         "transformers counterpart (roberta-prelayernorm normalises its "
                         "embeddings); train with --layernorm-embedding")
    if cfg.get("activation_fn", "gelu") != "gelu":
        raise SystemExit(f"error: activation {cfg['activation_fn']}: only gelu is exported")
    vocab, dim = weights["sentence_encoder.embed_tokens.weight"].shape
    kind = RobertaPreLayerNormConfig if pre_ln else RobertaConfig
    return kind(
        vocab_size=vocab, hidden_size=dim,
        num_hidden_layers=cfg["encoder_layers"],
        num_attention_heads=cfg["encoder_attention_heads"],
        intermediate_size=cfg["encoder_ffn_embed_dim"], hidden_act="gelu",
        # fairseq's learned positions start after the padding index: max_positions + 2 rows
        max_position_embeddings=weights["sentence_encoder.embed_positions.weight"].shape[0],
        type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, tie_word_embeddings=not cfg.get("untie_weights_roberta", False),
        architectures=["RobertaPreLayerNormForMaskedLM" if pre_ln else "RobertaForMaskedLM"],
    )


def hf_state_dict(weights: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """fairseq RoBERTa names -> transformers names (the same tensors)."""
    pre_ln = config.model_type == "roberta-prelayernorm"
    base = "roberta_prelayernorm" if pre_ln else "roberta"
    enc = "sentence_encoder."
    out = {
        f"{base}.embeddings.word_embeddings.weight": weights[enc + "embed_tokens.weight"],
        f"{base}.embeddings.position_embeddings.weight": weights[enc + "embed_positions.weight"],
        # RoBERTa has one segment; fairseq adds no segment embedding
        f"{base}.embeddings.token_type_embeddings.weight":
            torch.zeros(1, config.hidden_size, dtype=weights[enc + "embed_tokens.weight"].dtype),
    }
    for p in ("weight", "bias"):
        out[f"{base}.embeddings.LayerNorm.{p}"] = weights[enc + f"layernorm_embedding.{p}"]
        if pre_ln:
            out[f"{base}.LayerNorm.{p}"] = weights[enc + f"layer_norm.{p}"]
        out[f"lm_head.dense.{p}"] = weights[f"lm_head.dense.{p}"]
        out[f"lm_head.layer_norm.{p}"] = weights[f"lm_head.layer_norm.{p}"]
    attn_norm = "attention.LayerNorm" if pre_ln else "attention.output.LayerNorm"
    ffn_norm = "intermediate.LayerNorm" if pre_ln else "output.LayerNorm"
    for i in range(config.num_hidden_layers):
        src, dst = f"{enc}layers.{i}.", f"{base}.encoder.layer.{i}."
        names = {"self_attn.q_proj": "attention.self.query",
                 "self_attn.k_proj": "attention.self.key",
                 "self_attn.v_proj": "attention.self.value",
                 "self_attn.out_proj": "attention.output.dense",
                 "self_attn_layer_norm": attn_norm, "fc1": "intermediate.dense",
                 "fc2": "output.dense", "final_layer_norm": ffn_norm}
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[dst + f"{b}.{p}"] = weights[src + f"{a}.{p}"]
    out["lm_head.decoder.weight"] = weights["lm_head.weight"]
    out["lm_head.bias"] = out["lm_head.decoder.bias"] = weights["lm_head.bias"]
    return out


def export_model(cfg: dict, weights: dict[str, torch.Tensor], out: Path):
    from transformers import AutoModelForMaskedLM

    config = hf_config(cfg, weights)
    model = AutoModelForMaskedLM.from_config(config)
    state = {k: v.float() for k, v in hf_state_dict(weights, config).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.decoder.weight", "lm_head.decoder.bias"}  # views of tied tensors
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"weights do not line up: missing {missing}, unexpected "
                           f"{unexpected}")
    model.eval().save_pretrained(out, safe_serialization=True)
    return config


# --- the tokenizer --------------------------------------------------------------------------

def fairseq_symbols(dict_txt: Path, vocab_size: int) -> list[str]:
    """Every id's symbol as fairseq numbers them: the specials, dict.txt in order, <mask>."""
    symbols = [*SPECIALS]
    for n, line in enumerate(dict_txt.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.rsplit(" ", 2 if line.endswith("#fairseq:overwrite") else 1)
        if len(parts) < 2:
            raise SystemExit(f"error: {dict_txt} line {n} is not 'SYMBOL COUNT': {line!r}")
        symbols.append(parts[0])
    symbols.append(MASK)
    if len(symbols) != vocab_size:
        raise SystemExit(
            f"error: {dict_txt} gives {len(symbols)} symbols (with the 4 specials and "
            f"<mask>) but the model has {vocab_size} embeddings: pass the --data directory "
            "the checkpoint was trained on")
    return symbols


def sentencepiece_tokenizer(spm_model: Path, dict_txt: Path, max_length: int, out: Path):
    """SentencePiece pieces looked up in fairseq's dict.txt, unknown pieces as <unk>: what
    transformers' BartphoTokenizer does (BARTpho is a fairseq model with the same layout)."""
    from transformers import BartphoTokenizer

    shutil.copy(spm_model, out / "sentencepiece.bpe.model")
    shutil.copy(dict_txt, out / "dict.txt")
    tokenizer = BartphoTokenizer(str(out / "sentencepiece.bpe.model"), str(out / "dict.txt"),
                                 model_max_length=max_length)
    tokenizer.save_pretrained(out)
    return tokenizer


def gpt2_tokenizer(bpe_dir: Path, symbols: list[str], max_length: int, out: Path):
    """GPT-2's byte-level BPE with fairseq's ids (its dict.txt lists GPT-2 ids as text): the
    files RobertaTokenizer reads, as in the original RoBERTa's Hugging Face release."""
    from transformers import RobertaTokenizer

    encoder = json.loads((bpe_dir / "encoder.json").read_text(encoding="utf-8"))
    ids = {s: i for i, s in enumerate(symbols)}
    missing = [t for t, g in encoder.items() if str(g) not in ids]
    if missing:  # a byte-level BPE needs an id of its own for every token it can produce
        raise SystemExit(f"error: {bpe_dir / 'encoder.json'} has {len(missing)} tokens that "
                         f"dict.txt lacks (first: {missing[:3]}); use GPT-2's own dict.txt")
    vocab = {token: ids[str(g)] for token, g in encoder.items()}
    vocab.update({s: i for s, i in ids.items() if not s.isdigit()})  # specials, fillers
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    shutil.copy(bpe_dir / "vocab.bpe", out / "merges.txt")
    tokenizer = RobertaTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"),
                                 model_max_length=max_length)
    tokenizer.save_pretrained(out)
    return tokenizer


def export_tokenizer(bpe_dir: Path, dict_txt: Path, vocab_size: int, max_length: int,
                     out: Path) -> str:
    symbols = fairseq_symbols(dict_txt, vocab_size)
    if (bpe_dir / "spm.model").is_file():
        from bpe import check_matches  # scripts/, beside this file

        try:
            check_matches(bpe_dir, symbols[len(SPECIALS):], dict_txt)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        kind = "sentencepiece"
        tokenizer = sentencepiece_tokenizer(bpe_dir / "spm.model", dict_txt, max_length, out)
    elif (bpe_dir / "encoder.json").is_file() and (bpe_dir / "vocab.bpe").is_file():
        kind = "gpt2"
        tokenizer = gpt2_tokenizer(bpe_dir, symbols, max_length, out)
    else:
        raise SystemExit(f"error: {bpe_dir} holds neither spm.model nor GPT-2's encoder.json "
                         "and vocab.bpe: pass --bpe-dir, the BPE the corpus was encoded with")
    got = {s: tokenizer.convert_tokens_to_ids(s) for s in (*SPECIALS, MASK)}
    want = {s: symbols.index(s) for s in got}
    if got != want or len(tokenizer) != vocab_size:
        raise RuntimeError(f"the tokenizer does not match fairseq's dictionary: special ids "
                           f"{got} (want {want}), {len(tokenizer)} tokens (want {vocab_size})")
    return kind


def export_hf(checkpoint: Path, out: Path, data: Path | None = None,
              bpe_dir: Path | None = None) -> Path:
    cfg, weights, trained_on = load_predictor(checkpoint)
    data = data or trained_on
    dict_txt = data / "dict.txt" if data.is_dir() else data
    if not dict_txt.is_file():
        raise SystemExit(f"error: no dictionary at {dict_txt}: pass --data, the binarized "
                         "data directory the checkpoint was trained on")
    bpe_dir = bpe_dir or dict_txt.parent.parent / "bpe"
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        config = export_model(cfg, weights, partial)
        kind = export_tokenizer(bpe_dir, dict_txt, config.vocab_size,
                                config.max_position_embeddings - 2, partial)
    except BaseException:
        shutil.rmtree(partial)  # a refused export leaves nothing behind
        raise
    (partial / "README.md").write_text(
        f"AMT predictor exported from {checkpoint.name} ({config.model_type}, "
        f"{config.num_hidden_layers} layers x {config.hidden_size}, {kind} tokenizer mapped "
        "through fairseq's dictionary).\n\n    from transformers import AutoModelForMaskedLM, "
        "AutoTokenizer\n    model = AutoModelForMaskedLM.from_pretrained(DIR)\n"
        "    tokenizer = AutoTokenizer.from_pretrained(DIR)\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)  # a finished export only ever appears whole
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="binarized data dir (dict.txt); default: "
                        "the one the checkpoint was trained on")
    parser.add_argument("--bpe-dir", type=Path, help="spm.model, or GPT-2's encoder.json and "
                        "vocab.bpe; default: DATA/../bpe")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no checkpoint at {args.checkpoint}")
    out = export_hf(args.checkpoint, args.out, args.data, args.bpe_dir)
    print(f"wrote {out}: AutoModelForMaskedLM.from_pretrained('{out}'), "
          f"AutoTokenizer.from_pretrained('{out}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
