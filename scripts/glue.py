"""GLUE for AMT: download, offline proxy tasks, BPE + binarize, fine-tune, score.

Fine-tuning is fairseq's own `sentence_prediction` task on the exported predictor (a stock
`roberta` checkpoint), with the per-task hyperparameters fairseq published for RoBERTa
(examples/roberta/README.glue.md), optionally scaled down for small models.

Task files follow GLUE's layout exactly (train.tsv / dev.tsv, the same columns and headers),
so the offline proxy tasks built from held-out text go through the same code as GLUE:
- SHUF (CoLA layout): is this sentence the original, or has a window of its words been
  shuffled? Metric: MCC, like CoLA.
- NEXT (MRPC layout): is sentence 2 the sentence that follows sentence 1? Negatives are the
  two in swapped order, or sentence 1 with a random other sentence. Metrics: F1 and accuracy.
They are not GLUE: they say whether the predictor learned word order and discourse at all.
"""

from __future__ import annotations

import csv
import random
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data"
MRPC_URL = "https://dl.fbaipublicfiles.com/senteval/senteval_data"


@dataclass(frozen=True)
class Task:
    """How to read one GLUE-format task and fine-tune on it."""

    name: str
    archive: str | None  # zip under GLUE_URL (None: built another way)
    inputs: tuple[int, ...]  # 0-based tsv columns of the sentence(s)
    label: int  # 0-based tsv column of the label in train.tsv
    header: bool  # does train.tsv start with a header row
    num_classes: int  # 1 = regression
    metrics: tuple[str, ...]  # fairseq sentence_prediction's names; the first one ranks epochs
    lr: float  # RoBERTa's published fine-tuning hyperparameters (base and large)
    batch_size: int
    total_updates: int
    warmup_updates: int
    dev_label: int | None = None  # label column in dev.tsv when it differs (MNLI)
    dev_splits: tuple[str, ...] = ("dev",)  # MNLI: matched and mismatched

    @property
    def regression(self) -> bool:
        return self.num_classes == 1


TASKS = {t.name: t for t in [
    Task("MNLI", "MNLI.zip", (8, 9), 11, True, 3, ("accuracy",), 1e-5, 32, 123873, 7432,
         dev_label=15, dev_splits=("dev_matched", "dev_mismatched")),
    Task("QNLI", "QNLIv2.zip", (1, 2), 3, True, 2, ("accuracy",), 1e-5, 32, 33112, 1986),
    Task("QQP", "QQP-clean.zip", (3, 4), 5, True, 2, ("f1", "accuracy"), 1e-5, 32, 113272,
         28318),
    Task("RTE", "RTE.zip", (1, 2), 3, True, 2, ("accuracy",), 2e-5, 16, 2036, 122),
    Task("SST-2", "SST-2.zip", (0,), 1, True, 2, ("accuracy",), 1e-5, 32, 20935, 1256),
    Task("MRPC", None, (3, 4), 0, True, 2, ("f1", "accuracy"), 1e-5, 16, 2296, 137),
    Task("CoLA", "CoLA.zip", (3,), 1, False, 2, ("mcc",), 1e-5, 16, 5336, 320),
    Task("STS-B", "STS-B.zip", (7, 8), 9, True, 1, ("pearson", "spearman"), 2e-5, 16, 3598,
         214),
    # offline proxies in CoLA's and MRPC's layouts; hyperparameters for tiny CPU models
    Task("SHUF", None, (3,), 1, False, 2, ("mcc", "accuracy"), 3e-4, 32, 150, 15),
    Task("NEXT", None, (3, 4), 0, True, 2, ("f1", "accuracy"), 3e-4, 32, 150, 15),
]}
PROXY_TASKS = ("SHUF", "NEXT")


class GlueError(ValueError):
    """A problem with the user's GLUE data or task names."""


def parse_tasks(names: str) -> list[Task]:
    tasks = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in TASKS:
            raise GlueError(f"unknown task '{name}'; known: {', '.join(TASKS)}")
        tasks.append(TASKS[name])
    return tasks


def required_files(task: Task) -> list[str]:
    return ["train.tsv", *[f"{s}.tsv" for s in task.dev_splits]]


def check_task_dir(task: Task, glue_dir: Path) -> None:
    """Raise a GlueError naming what is missing, before any work starts."""
    missing = [f for f in required_files(task) if not (glue_dir / task.name / f).is_file()]
    if missing:
        raise GlueError(
            f"{glue_dir / task.name} lacks {', '.join(missing)}: --glue-dir must hold GLUE's "
            f"layout (TASK/train.tsv, TASK/dev.tsv); use --download-glue to fetch it"
        )
    splits = label_columns(task)
    seen = {name: set(read_rows(task, glue_dir / task.name / f"{name}.tsv", col)[1])
            for name, col in splits.items()}
    if not task.regression:
        for name in list(splits)[1:]:
            unseen = sorted(seen[name] - seen["train"])
            if unseen:
                raise GlueError(f"{glue_dir / task.name / name}.tsv has labels that train.tsv "
                                f"lacks ({', '.join(unseen[:6])}): are the files one task's?")


def label_columns(task: Task) -> dict[str, int]:
    """Each file of a task (train, then the dev splits) and its label column."""
    return {"train": task.label, **{d: task.dev_label or task.label for d in task.dev_splits}}


# --- download ----------------------------------------------------------------------------------

def fetch(url: str, dest: Path) -> Path:
    """Download url to dest atomically (a partial file never takes the final name)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    print(f"downloading {url}", flush=True)
    with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
    tmp.replace(dest)
    return dest


def download(task: Task, glue_dir: Path, base: str = GLUE_URL, mrpc_base: str = MRPC_URL) -> None:
    """Fetch one GLUE task into glue_dir/TASK from GLUE's download locations."""
    if all((glue_dir / task.name / f).is_file() for f in required_files(task)):
        return
    if task.name == "MRPC":
        download_mrpc(glue_dir / "MRPC", base, mrpc_base)
        return
    if task.archive is None:
        raise GlueError(f"{task.name} cannot be downloaded (it is built from the corpus)")
    archive = fetch(f"{base}/{task.archive}", glue_dir / task.archive)
    with zipfile.ZipFile(archive) as z:
        z.extractall(glue_dir)
    archive.unlink()
    extracted = glue_dir / Path(task.archive).stem  # QNLIv2.zip holds QNLI/, QQP-clean QQP/
    if not (glue_dir / task.name).exists() and extracted.exists():
        extracted.rename(glue_dir / task.name)


def download_mrpc(dest: Path, base: str, mrpc_base: str) -> None:
    """GLUE's MRPC: SentEval's MSR paraphrase files, split into train/dev by GLUE's ids."""
    raw = dest / "raw"
    train_txt = fetch(f"{mrpc_base}/msr_paraphrase_train.txt", raw / "msr_paraphrase_train.txt")
    fetch(f"{mrpc_base}/msr_paraphrase_test.txt", raw / "msr_paraphrase_test.txt")
    ids = fetch(f"{base}/mrpc_dev_ids.tsv", raw / "mrpc_dev_ids.tsv")
    dev_ids = {tuple(line.strip().split("\t")) for line in ids.read_text().splitlines()}
    rows = list(csv.reader(open(train_txt, encoding="utf-8-sig"), delimiter="\t",
                           quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:]
    with open(dest / "train.tsv", "w") as tr, open(dest / "dev.tsv", "w") as dv:
        for f in (tr, dv):
            f.write("\t".join(header) + "\n")
        for row in body:
            (dv if (row[1], row[2]) in dev_ids else tr).write("\t".join(row) + "\n")


# --- proxy tasks -------------------------------------------------------------------------------

def make_proxy_tasks(sentences: list[str], glue_dir: Path, seed: int = 0,
                     dev_share: float = 0.2) -> None:
    """Write SHUF (CoLA layout) and NEXT (MRPC layout) from held-out sentences, in order."""
    rng = random.Random(seed)
    sentences = [s for s in (x.strip() for x in sentences) if len(s.split()) >= 4]
    if len(sentences) < 50:
        raise GlueError("need at least 50 held-out sentences of 4+ words for the proxy tasks")
    cut = int(len(sentences) * (1 - dev_share))
    for split, part in (("train", sentences[:cut]), ("dev", sentences[cut:])):
        shuf = glue_dir / "SHUF" / f"{split}.tsv"
        shuf.parent.mkdir(parents=True, exist_ok=True)
        with open(shuf, "w") as f:  # CoLA: source, label, original label, sentence; no header
            for s in part:
                label = rng.random() < 0.5
                text = s if label else shuffle_window(s, rng)
                f.write(f"ptb\t{int(label)}\t{'' if label else '*'}\t{text}\n")
        nxt = glue_dir / "NEXT" / f"{split}.tsv"
        nxt.parent.mkdir(parents=True, exist_ok=True)
        with open(nxt, "w") as f:  # MRPC: Quality, #1 ID, #2 ID, #1 String, #2 String
            f.write("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
            for i in range(len(part) - 1):
                a, b = part[i], part[i + 1]
                r = rng.random()
                if r < 0.5:
                    row = (1, a, b)
                elif r < 0.75:
                    row = (0, b, a)  # the right pair, in the wrong order
                else:
                    row = (0, a, part[rng.randrange(len(part))])  # an unrelated sentence
                f.write(f"{row[0]}\t{i}\t{i + 1}\t{row[1]}\t{row[2]}\n")


def shuffle_window(sentence: str, rng: random.Random, width: int = 4) -> str:
    """Shuffle a window of up to `width` consecutive words so that the order changes."""
    words = sentence.split()
    start = rng.randrange(0, max(1, len(words) - width + 1))
    window = words[start:start + width]
    original = list(window)
    while window == original and len(set(window)) > 1:
        rng.shuffle(window)
    if window == original:  # all words equal: swap with a neighbour outside the window
        return sentence
    return " ".join(words[:start] + window + words[start + width:])


# --- reading GLUE tsv files --------------------------------------------------------------------

def read_rows(task: Task, path: Path, label_col: int) -> tuple[list[list[str]], list[str]]:
    """Sentences (one list per input column) and labels from a GLUE tsv file."""
    inputs: list[list[str]] = [[] for _ in task.inputs]
    labels: list[str] = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if task.header:
        lines = lines[1:]
    width = max(*task.inputs, label_col) + 1
    first = 2 if task.header else 1
    for n, line in enumerate(lines, first):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < width:
            raise GlueError(f"{path} line {n} has {len(cols)} tab-separated column(s), "
                            f"{task.name} needs {width}: is it {task.name}'s file, unmodified?")
        label = cols[label_col].strip()
        if not label:
            raise GlueError(f"{path} line {n} has no label (column {label_col + 1})")
        if task.regression:
            try:
                float(label)
            except ValueError:
                raise GlueError(f"{path} line {n}: {task.name}'s label must be a number, "
                                f"got {label!r}") from None
        for i, c in enumerate(task.inputs):
            inputs[i].append(cols[c])
        labels.append(label)
    if not labels:
        raise GlueError(f"{path} holds no rows: is it {task.name}'s file?")
    kinds = sorted(set(labels))
    if not task.regression and len(kinds) > task.num_classes:
        raise GlueError(f"{path} has {len(kinds)} different labels ({', '.join(kinds[:6])}), "
                        f"{task.name} has {task.num_classes}: is the label column right?")
    return inputs, labels


# --- BPE + binarize ----------------------------------------------------------------------------

def prepare(task: Task, glue_dir: Path, bpe_dir: Path, dictionary: Path, dest: Path,
            workers: int = 1) -> Path:
    """GLUE tsv -> fairseq's sentence_prediction layout: input0/ [input1/] label/."""
    from bpe import load_encoder  # scripts/ is on sys.path when run as a script

    encode = load_encoder(bpe_dir)
    raw = dest / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    splits = {"train": ("train", task.label)}
    for i, dev in enumerate(task.dev_splits):
        splits["valid" if i == 0 else f"valid{i}"] = (dev, task.dev_label or task.label)
    for split, (name, label_col) in splits.items():
        inputs, labels = read_rows(task, glue_dir / task.name / f"{name}.tsv", label_col)
        for i, column in enumerate(inputs):
            (raw / f"{split}.input{i}").write_text(
                "".join(encode(s) + "\n" for s in column), encoding="utf-8")
        (raw / f"{split}.label").write_text("".join(x + "\n" for x in labels))
    dev_names = [s for s in splits if s != "train"]
    for i in range(len(task.inputs)):
        preprocess(raw, f"input{i}", dest / f"input{i}", dev_names, workers, srcdict=dictionary)
    if task.regression:  # sentence_prediction reads regression targets as text
        (dest / "label").mkdir(exist_ok=True)
        for split in splits:
            shutil.copy(raw / f"{split}.label", dest / "label" / f"{split}.label")
    else:
        preprocess(raw, "label", dest / "label", dev_names, workers)
    return dest


def preprocess(raw: Path, suffix: str, dest: Path, dev_names: list[str], workers: int,
               srcdict: Path | None = None) -> None:
    import subprocess

    cmd = ["fairseq-preprocess", "--only-source", "--trainpref", str(raw / f"train.{suffix}"),
           "--destdir", str(dest), "--workers", str(workers)]
    if dev_names:
        cmd += ["--validpref", ",".join(str(raw / f"{d}.{suffix}") for d in dev_names)]
    if srcdict is not None:
        cmd += ["--srcdict", str(srcdict)]
    subprocess.run(cmd, check=True, capture_output=True)


# --- fine-tune and score -----------------------------------------------------------------------

def finetune_command(task: Task, data: Path, checkpoint: Path, shape_args: list[str],
                     seed: int, save_dir: Path, update_scale: float = 1.0,
                     lr: float | None = None, cpu: bool = True) -> list[str]:
    """fairseq-train sentence_prediction, as fairseq's RoBERTa GLUE recipe runs it. Nothing
    is saved, but fairseq-train checks at start-up that it could write into `save_dir`
    (default ./checkpoints, which would be left behind in the user's working directory)."""
    total = max(10, round(task.total_updates * update_scale))
    warmup = max(1, round(task.warmup_updates * update_scale))
    report = {"mcc": "--report-mcc", "f1": "--report-acc-and-f1",
              "pearson": "--report-pearson-and-spearman"}
    cmd = [
        "fairseq-train", str(data), "--restore-file", str(checkpoint),
        "--reset-optimizer", "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler",
        "--task", "sentence_prediction", "--num-classes", str(task.num_classes),
        "--init-token", "0", "--separator-token", "2", "--shorten-method", "truncate",
        *shape_args, "--criterion", "sentence_prediction",
        "--classification-head-name", "sentence_classification_head",
        "--batch-size", str(task.batch_size), "--required-batch-size-multiple", "1",
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--adam-eps", "1e-06",
        "--weight-decay", "0.1", "--clip-norm", "0.0",
        "--lr-scheduler", "polynomial_decay", "--lr", str(lr or task.lr),
        "--total-num-update", str(total), "--warmup-updates", str(warmup),
        "--max-update", str(total), "--max-epoch", "1000",
        "--dropout", "0.1", "--attention-dropout", "0.1",
        "--valid-subset", ",".join(["valid"] + [f"valid{i}" for i in
                                                range(1, len(task.dev_splits))]),
        "--validate-interval-updates", str(max(1, total // 5)), "--validate-interval", "1000",
        "--no-save", "--save-dir", str(save_dir),
        "--find-unused-parameters", "--seed", str(seed), "--num-workers", "0",
        "--log-format", "json", "--log-interval", "50", "--no-progress-bar",
        "--skip-invalid-size-inputs-valid-test",
    ]
    if task.regression:
        cmd.append("--regression-target")
    else:
        cmd += ["--best-checkpoint-metric", task.metrics[0], "--maximize-best-checkpoint-metric"]
    if task.metrics[0] in report:
        cmd.append(report[task.metrics[0]])
    if cpu:
        cmd.append("--cpu")
    return cmd


def best_scores(task: Task, log: str) -> dict[str, float]:
    """The dev scores at the validation where the task's first metric peaked (fairseq's
    sentence_prediction logs them per validation), one entry per metric and dev split."""
    from amt_plugin import logs

    subsets = ["valid"] + [f"valid{i}" for i in range(1, len(task.dev_splits))]
    per_subset = {s: logs.records(log, s) for s in subsets}
    rounds = per_subset["valid"]
    if not rounds:
        raise RuntimeError(f"no validation results found for {task.name}")
    key = task.metrics[0]
    best = max(range(len(rounds)), key=lambda i: float(rounds[i].get(key, float("-inf"))))
    scores = {}
    for s, dev in zip(subsets, task.dev_splits):
        entry = per_subset[s][best] if best < len(per_subset[s]) else per_subset[s][-1]
        for m in task.metrics:
            value = entry.get(m)
            if value is not None:
                name = m if len(task.dev_splits) == 1 else f"{m}_{dev.split('_')[-1]}"
                scores[name] = float(value)
    return scores
