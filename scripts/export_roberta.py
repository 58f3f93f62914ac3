"""Export the predictor of an AMT checkpoint as a stock fairseq RoBERTa checkpoint.

    python scripts/export_roberta.py CHECKPOINT OUT_DIR [--data BIN_DIR]

Writes OUT_DIR/model.pt (no `masker.*` keys, architecture `roberta` / `roberta_base` /
`roberta_large`, task `masked_lm`, the model config as a plain dict: it loads in stock fairseq
without the plugin, weights-only, on any torch), OUT_DIR/dict.txt when --data is
given (for `RobertaModel.from_pretrained(OUT_DIR)`), and OUT_DIR/roberta_args.txt: the
fairseq-train flags that rebuild this shape for fine-tuning with `sentence_prediction`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import amt_plugin  # noqa: E402,F401  (weights-only loading of fairseq checkpoints)
from amt_plugin import checkpoints  # noqa: E402

SHAPE = ("encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
         "encoder_attention_heads", "max_positions")
NAMED = {  # stock architectures whose defaults are these shapes (max_positions 512)
    (12, 768, 3072, 12, 512): "roberta_base",
    (24, 1024, 4096, 16, 512): "roberta_large",
}
TASK_KEYS = {  # masked_lm's own config keys; ours (masking_strategy, ...) are dropped
    "_name", "data", "sample_break_mode", "tokens_per_sample", "mask_prob",
    "leave_unmasked_prob", "random_token_prob", "freq_weighted_replacement",
    "mask_whole_words", "mask_multiple_length", "mask_stdev", "shorten_method",
    "shorten_data_split_list", "seed", "include_target_tokens", "include_index",
    "skip_masking", "d2v2_multi",
}


def export(checkpoint: Path, out: Path, data: Path | None = None) -> Path:
    state = checkpoints.read(checkpoint)
    if "encoder.sentence_encoder.embed_tokens.weight" not in state.get("model", {}):
        raise SystemExit(f"error: {checkpoint} holds no RoBERTa predictor (encoder.* weights)")
    if data is not None:
        check_dictionary(data / "dict.txt",
                         len(state["model"]["encoder.sentence_encoder.embed_tokens.weight"]))
    model_cfg = state["cfg"]["model"]  # a Namespace from fairseq-train, a dict from hydra
    model_cfg = dict(vars(model_cfg) if isinstance(model_cfg, argparse.Namespace) else model_cfg)
    shape = tuple(model_cfg[k] for k in SHAPE)
    arch = NAMED.get(shape, "roberta")
    kept = {k: v for k, v in model_cfg.items() if not k.startswith("masker_")}
    kept.update(arch=arch, _name=arch)
    task_cfg = {k: v for k, v in state["cfg"]["task"].items() if k in TASK_KEYS}
    task_cfg["_name"] = "masked_lm"
    exported = {
        "cfg": {**state["cfg"], "model": kept, "task": task_cfg,
                "criterion": {"_name": "masked_lm", "tpu": False}},
        "args": None,
        "model": {k: v for k, v in state["model"].items() if not k.startswith("masker.")},
        "optimizer_history": state["optimizer_history"][-1:],
        "extra_state": {"train_iterator": {"epoch": 1}},
        "last_optimizer_state": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.pt.partial"
    torch.save(exported, tmp)
    tmp.replace(out / "model.pt")
    if data is not None:
        shutil.copy(data / "dict.txt", out / "dict.txt")
    flags = ["--arch", arch] + [
        f"--{k.replace('_', '-')}={model_cfg[k]}" for k in SHAPE if arch == "roberta"
    ]
    if arch != "roberta":
        flags.append(f"--max-positions={model_cfg['max_positions']}")
    if model_cfg.get("encoder_normalize_before"):  # pre-LN: not the roberta default
        flags.append("--encoder-normalize-before")
    (out / "roberta_args.txt").write_text(" ".join(flags) + "\n")
    return out / "model.pt"


def check_dictionary(dict_txt: Path, rows: int) -> None:
    """The data's dictionary (fairseq's 4 specials, dict.txt, <mask>) fits the embeddings."""
    if not dict_txt.is_file():
        raise SystemExit(f"error: {dict_txt} does not exist: --data takes the binarized "
                         "data directory the checkpoint was trained on")
    lines = dict_txt.read_text(encoding="utf-8").splitlines()
    if 4 + len(lines) + 1 != rows:
        raise SystemExit(
            f"error: {dict_txt} gives {4 + len(lines) + 1} symbols (with the 4 specials and "
            f"<mask>) but the checkpoint has {rows} embeddings: pass the --data directory the "
            "checkpoint was trained on. Nothing was written")


def random_init(checkpoint: Path, out: Path, data: Path, seed: int = 1) -> Path:
    """A copy of `checkpoint` whose weights are a fresh random initialisation of the same model
    (fairseq's own init, seeded): the control that shows what pretraining added."""
    from fairseq import checkpoint_utils

    _, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data)})
    torch.manual_seed(seed)
    fresh = task.build_model(cfg.model)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["model"] = fresh.state_dict()
    state["last_optimizer_state"] = None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    torch.save(state, tmp)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, help="the pretraining data dir (for dict.txt)")
    args = parser.parse_args(argv)
    path = export(args.checkpoint, args.out, args.data)
    print(f"wrote {path}; fine-tune with: {(args.out / 'roberta_args.txt').read_text().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
