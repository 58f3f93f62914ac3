"""The Hugging Face export against fairseq: the same ids, the same logits, usable with the
Trainer; and whole-word masking on real SentencePiece and GPT-2 BPE data, offline."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import BIN, ENV, ROOT, run, train, train_args

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(ROOT / "scripts"))

import bpe  # noqa: E402
import export_hf  # noqa: E402
import export_roberta  # noqa: E402

NOUNS = ("cat dog bird teacher student farmer doctor river mountain village market "
         "government company president engineer report question answer").split()
VERBS = ("sees likes finds helps calls watches follows answers reads writes builds "
         "discovers").split()
ADJS = "old young quiet bright heavy careful strange happy northern wooden".split()


def sentence(rng: random.Random) -> str:
    def np() -> str:
        words = [rng.choice(("the", "a", "every", "this"))]
        words += [rng.choice(ADJS)] * (rng.random() < 0.4) + [rng.choice(NOUNS)]
        return " ".join(words)

    text = f"{np()} {rng.choice(VERBS)} {np()}"
    if rng.random() < 0.3:
        text += f" near {np()}"
    return text[0].upper() + text[1:] + rng.choice((".", ".", "!", "?"))


def write_corpus(d: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 1500), ("valid", 100), ("test", 100)):
        (d / f"{split}.txt").write_text("".join(sentence(rng) + "\n" for _ in range(n)))
    return d


def binarize(bpe_dir: Path, text: Path, dest: Path, srcdict: Path | None = None) -> Path:
    bpe.encode_files(bpe_dir, [(text / f"{s}.txt", bpe_dir / f"{s}.bpe")
                               for s in ("train", "valid", "test")])
    cmd = [str(BIN / "fairseq-preprocess"), "--only-source", "--trainpref",
           str(bpe_dir / "train.bpe"), "--validpref", str(bpe_dir / "valid.bpe"),
           "--destdir", str(dest), "--workers", "1"]
    run(cmd + (["--srcdict", str(srcdict)] if srcdict else []))
    return dest


def gpt2_bpe(d: Path, text: Path) -> Path:
    """A real byte-level GPT-2 BPE, small: the 256 byte symbols, then merges that spell the
    corpus's words (with and without their leading space), in fairseq's file formats."""
    from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode

    d.mkdir(parents=True)
    encoder = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = []
    for word in sorted(set(re.findall(r"[A-Za-z]+", (text / "train.txt").read_text()))):
        for form in (word, "\u0120" + word):
            piece = form[0]
            for c in form[1:]:
                if piece + c not in encoder:
                    merges.append((piece, c))
                    encoder[piece + c] = len(encoder)
                piece += c
    (d / "encoder.json").write_text(json.dumps(encoder))
    (d / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (d / "dict.txt").write_text("".join(f"{i} {10_000 - i}\n" for i in range(len(encoder))))
    return d


TRAIN = ["--max-update", "12", "--tokens-per-sample", "64", "--max-positions", "64",
         "--mask-whole-words", "--masker-warmup-updates", "4", "--log-interval", "4"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """For each BPE: a predictor pretrained a few updates with whole-word masking, exported
    both ways. {bpe: work dir with text/, bpe/, bin/, roberta/, hf/}."""
    root = tmp_path_factory.mktemp("hf")
    text = write_corpus(root / "text")
    dirs = {}
    for kind in ("sentencepiece", "gpt2"):
        work = root / kind
        if kind == "sentencepiece":
            bpe.train_sentencepiece(text / "train.txt", work / "bpe", 120)
            data = binarize(work / "bpe", text, work / "bin")
            extra = []
        else:
            gpt2_bpe(work / "bpe", text)
            data = binarize(work / "bpe", text, work / "bin", work / "bpe" / "dict.txt")
            extra = ["--word-boundaries", "gpt2",
                     "--gpt2-encoder-json", str(work / "bpe" / "encoder.json")]
        train(data, work / "ckpt", *TRAIN, *extra)
        checkpoint = work / "ckpt" / "checkpoint_last.pt"
        export_roberta.export(checkpoint, work / "roberta", data)
        export_hf.export_hf(checkpoint, work / "hf", data, work / "bpe")
        dirs[kind] = work
    return dirs


def fairseq_hub(work: Path, kind: str):
    from fairseq.models.roberta import RobertaModel

    bpe_args = ({"bpe": "sentencepiece", "sentencepiece_model": str(work / "bpe" / "spm.model")}
                if kind == "sentencepiece" else
                {"bpe": "gpt2", "gpt2_encoder_json": str(work / "bpe" / "encoder.json"),
                 "gpt2_vocab_bpe": str(work / "bpe" / "vocab.bpe")})
    return RobertaModel.from_pretrained(str(work / "roberta"), "model.pt", **bpe_args).eval()


def held_out_lines(n: int = 40) -> list[str]:
    rng = random.Random(99)  # sentences the model never saw, and words the BPE never saw
    lines = [sentence(rng) for _ in range(n)]
    return lines + ["The zebra quickly sees an unknown xylophone, twice.", "a  b\tc",
                    "Ünïcödé 42 — “quotes”"]


@pytest.mark.parametrize("kind", ["sentencepiece", "gpt2"])
def test_hf_export_gives_fairseq_ids_and_logits(exported, kind):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    work = exported[kind]
    hub = fairseq_hub(work, kind)
    model = AutoModelForMaskedLM.from_pretrained(work / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    d = hub.task.source_dictionary
    assert len(tokenizer) == len(d) == model.config.vocab_size
    for s in ("<s>", "<pad>", "</s>", "<unk>", "<mask>"):
        assert tokenizer.convert_tokens_to_ids(s) == d.index(s)
    unknown = 0
    for line in held_out_lines():
        ids = hub.encode(line)
        assert tokenizer(line)["input_ids"] == ids.tolist(), line
        unknown += int((ids == d.unk()).sum())
        with torch.no_grad():
            want = hub.model(ids[None])[0]
            got = model(ids[None]).logits
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-4, line
    if kind == "sentencepiece":  # the unseen characters really were <unk> on both sides
        assert unknown > 0
    # the documented difference: text spelling a special token is that token for
    # transformers, and plain text for fairseq's encode
    literal = "The cat sees <unk> ."
    hf_ids, fs_ids = tokenizer(literal)["input_ids"], hub.encode(literal).tolist()
    assert hf_ids.count(d.unk()) == 1 and len(fs_ids) > len(hf_ids)
    # a padded batch: the attention mask keeps every sentence's logits
    batch = tokenizer(held_out_lines()[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = model(**batch).logits
        for row, line in enumerate(held_out_lines()[:4]):
            ids = hub.encode(line)
            want = hub.model(ids[None])[0][0]
            assert (padded[row, :len(ids)] - want).abs().max() < 1e-4


def test_fill_mask_pipeline_fills_a_word(exported):
    from transformers import pipeline

    work = exported["sentencepiece"]
    fill = pipeline("fill-mask", model=str(work / "hf"), tokenizer=str(work / "hf"))
    text = "The old teacher <mask> the river."
    answers = fill(text, top_k=5)
    assert len(answers) == 5 and all(a["sequence"] != text for a in answers)
    hub = fairseq_hub(work, "sentencepiece")
    want = hub.fill_mask(text, topk=5)
    assert [round(a["score"], 4) for a in answers] == [round(w[1], 4) for w in want]


def test_hf_export_loads_without_fairseq_or_the_plugin(exported):
    """A fresh process where importing fairseq or amt_plugin fails still loads and fills."""
    code = (
        "import sys; sys.modules['fairseq'] = None; sys.modules['amt_plugin'] = None\n"
        "from transformers import pipeline\n"
        f"fill = pipeline('fill-mask', model={str(exported['gpt2'] / 'hf')!r})\n"
        "print(fill('A cat sees the <mask>.')[0]['token_str'])\n")
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.strip().splitlines()[-1].strip()


def test_sequence_classification_trains_with_the_trainer(exported, tmp_path):
    """A GLUE fixture in SST-2's layout (label: does the sentence end in '?'): the loss falls
    under the Trainer."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
    )

    rng = random.Random(5)
    rows = [sentence(rng) for _ in range(64)]
    tsv = tmp_path / "SST-2" / "train.tsv"
    tsv.parent.mkdir()
    tsv.write_text("sentence\tlabel\n" + "".join(f"{r}\t{int(r.endswith('?'))}\n" for r in rows))
    header, *lines = tsv.read_text().splitlines()
    assert header.split("\t") == ["sentence", "label"]
    rows, labels = zip(*(line.split("\t") for line in lines))
    hf = exported["sentencepiece"] / "hf"
    tokenizer = AutoTokenizer.from_pretrained(hf)
    enc = tokenizer(list(rows), padding=True)
    data = [{"input_ids": i, "attention_mask": m, "labels": int(y)}
            for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(hf, num_labels=2)

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            batch = {k: torch.tensor([d[k] for d in data]) for k in data[0]}
            return model(**batch).loss.item()

    before = loss()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=40,
                             per_device_train_batch_size=16, learning_rate=1e-3,
                             logging_steps=10, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0)
    Trainer(model=model, args=args, train_dataset=data).train()
    after = loss()
    assert after < 0.8 * before, (before, after)


def test_whole_word_masks_cover_words_on_real_sentencepiece(exported):
    """--mask-whole-words on a trained SentencePiece model: every masked piece's word is
    masked whole."""
    from fairseq import tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.options import get_training_parser, parse_args_and_arch

    import amt_plugin  # noqa: F401
    from amt_plugin import masking

    work = exported["sentencepiece"]
    parser = get_training_parser()
    args = parse_args_and_arch(parser, [str(work / "bin"), "--user-dir", str(ROOT / "amt_plugin"),
                                        "--task", "adversarial_masked_lm", "--arch", "amt_tiny",
                                        "--criterion", "adversarial_masked_lm",
                                        "--mask-whole-words", "--tokens-per-sample", "64"])
    task = tasks.setup_task(convert_namespace_to_omegaconf(args).task)
    d = task.dictionary
    table = task.is_word_start
    pieces = [s for s in d.symbols if not s.startswith(("<", "madeupword"))]
    assert sum(not table[d.index(p)] for p in pieces) > 20  # real word-internal pieces
    assert all(bool(table[d.index(p)]) == p.startswith("\u2581") for p in pieces)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    batch = ds.collater([ds[i] for i in range(16)])["net_input"]["src_tokens"]
    special = torch.tensor(task.special_token_ids())
    candidates = masking.candidate_mask(batch, special)
    starts = masking.word_starts(batch, candidates, table)
    gen = torch.Generator().manual_seed(0)
    chosen = masking.from_word_start(
        masking.uniform_select(starts, masking.budget(starts.sum(1), 0.3), gen), starts
    ) & candidates
    assert chosen.any()
    internal = candidates & ~table[batch]  # word-internal pieces (a block may begin mid-word:
    internal[:, 1:] &= candidates[:, :-1]  # a piece after bos or pad starts its own unit)
    internal[:, 0] = False
    assert internal.any()
    # a word-internal piece is masked exactly when the piece before it (same word) is
    assert torch.equal(chosen[:, 1:][internal[:, 1:]], chosen[:, :-1][internal[:, 1:]])


def test_gpt2_word_boundaries_need_the_local_encoder(exported, tmp_path):
    work = exported["gpt2"]
    for extra, message in (([], "pass --gpt2-encoder-json"),
                           (["--gpt2-encoder-json", str(tmp_path / "nope.json")],
                            "does not exist")):
        proc = subprocess.run(
            train_args(work / "bin", tmp_path / "c", "--mask-whole-words",
                       "--word-boundaries", "gpt2", *extra),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, timeout=300)
        assert proc.returncode != 0 and message in proc.stdout, proc.stdout[-2000:]
        assert "Downloading" not in proc.stdout and not list((tmp_path / "c").glob("*.pt"))
    from fairseq.data import Dictionary

    from amt_plugin.masking import symbol_starts_word

    d = Dictionary.load(str(work / "bin" / "dict.txt"))
    encoder = json.loads((work / "bpe" / "encoder.json").read_text())
    starts = symbol_starts_word(d.symbols, encoder)
    token = {str(i): t for t, i in encoder.items()}
    assert [starts[d.index(str(encoder["\u0120the"]))], starts[d.index(str(encoder["the"]))]] \
        == [True, False]
    assert all(starts[i] == token[s].startswith("\u0120")
               for i, s in enumerate(d.symbols) if s in token)


def test_scripts_choose_whole_words_like_the_criterion(exported):
    """show_masker and plot_masking choose through masking.choose with the checkpoint's own
    task: a whole-word checkpoint masks every piece of a word together."""
    import plot_masking
    import show_masker

    work = exported["sentencepiece"]
    checkpoint = work / "ckpt" / "checkpoint_last.pt"
    line = "The careful engineer discovers a wooden village near the northern mountain."
    (row,) = show_masker.masking_probabilities(checkpoint, work / "bin", [line], work / "bpe",
                                               draws=64)
    words = []
    for piece, p, _ in row:
        if piece.startswith("\u2581") or not words:
            words.append([])
        words[-1].append(p)
    assert any(len(w) > 1 for w in words)
    assert all(len(set(w)) == 1 for w in words), words  # a word's pieces go together
    curves = plot_masking.rank_curves(checkpoint, work / "bin", max_batches=2)
    assert set(curves) == {"learned", "random", "frequency"}
    assert all(0 <= y <= 1 for xs, ys in curves.values() for y in ys)
