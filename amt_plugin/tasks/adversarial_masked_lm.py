"""Task `adversarial_masked_lm`: fairseq's `masked_lm` data pipeline, without the masking.

The dataset yields the *unmasked* token blocks (with <s> prepended, padded on the right);
which positions get masked is decided per batch by the criterion, where the masker lives.
The task also owns the alternation's last step: `optimizer_step` steps only the parameter
groups the criterion asked for in this update (the wav2vec-U pattern); and the step's
precision and compilation: bf16 autocast around the forward (`--bf16-autocast`), a bf16
model stepped through amt_adam's fp32 master weights (`--bf16-weights`), torch.compile of the blocks
(`--torch-compile`, `--torch-compile-mode`, with the step marks CUDA graphs need, and
`--pad-to-multiple` for the few batch shapes they want).
"""


import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from fairseq.data import (
    BaseWrapperDataset,
    IdDataset,
    NestedDictionaryDataset,
    NumelDataset,
    NumSamplesDataset,
    RightPadDataset,
    SortDataset,
    data_utils,
)
from fairseq.dataclass import ChoiceEnum
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.optim.fp16_optimizer import (
    FP16Optimizer,
    _FP16OptimizerMixin,
    _MemoryEfficientFP16OptimizerMixin,
)
from fairseq.tasks import register_task
from fairseq.tasks.masked_lm import MaskedLMConfig, MaskedLMTask
from omegaconf import OmegaConf

from .. import masking
from ..errors import UsageError
from ..models.amt import PREDICTOR
from ..optimizer import AMTAdam

logger = logging.getLogger(__name__)

MASKING_STRATEGIES = ["learned", "random", "span", "frequency", "adaptive"]


COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
CUDA_GRAPH_MODES = {"reduce-overhead", "max-autotune"}  # torch.compile modes with CUDA graphs
_NO_ACCUMULATION = ("--torch-compile-mode {mode} (CUDA graphs) cannot accumulate gradients over "
                    "micro-batches: use --update-freq 1, or --torch-compile-mode default")


class EveryBlockSortDataset(SortDataset):
    """fairseq's SortDataset, batched without losing blocks.

    fairseq's `batch_by_size` drops the final batch when its size is not a multiple of
    --required-batch-size-multiple (default 8; fairseq issue 5036), so fairseq-validate
    silently left up to 7 held-out blocks unscored, and training up to 7 blocks per epoch
    unseen. Here those blocks form one more (smaller) batch.
    """

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None,
                      required_batch_size_multiple=1):
        batches = super().batch_by_size(indices, max_tokens, max_sentences,
                                        required_batch_size_multiple)
        batched = np.concatenate(batches) if len(batches) else np.zeros(0, dtype=np.int64)
        if len(batched) < len(indices):
            left_out = np.asarray(indices)[~np.isin(indices, batched)]
            batches = [*batches, left_out.astype(np.int64)]
        return batches


class PadToMultipleDataset(RightPadDataset):
    """RightPadDataset whose batches are padded to a length that is a multiple of `multiple`,
    but not past `longest` (the block size) unless a block is longer: a handful of batch
    shapes instead of one per length. torch.compile specializes on shapes, and under CUDA
    graphs (--torch-compile-mode reduce-overhead) each new batch shape records new graphs."""

    def __init__(self, dataset, pad_idx: int, multiple: int, longest: int) -> None:
        super().__init__(dataset, pad_idx)
        self.multiple, self.longest = multiple, longest

    def collater(self, samples):
        size = max(len(s) for s in samples)
        length = min(-(-size // self.multiple) * self.multiple, max(size, self.longest))
        return data_utils.collate_tokens(samples, self.pad_idx, left_pad=False,
                                         pad_to_length=length)


class MaskBudgetDataset(BaseWrapperDataset):
    """How many tokens the criterion masks in each block, counted on the host: the budget
    k = max(1, round(mask_prob * n)) of its n maskable tokens (`masking.budget`). A batch
    collates to the sum, a Python int, so the criterion knows how many positions its LM head
    scores without reading the mask back from the GPU (see `masking.true_positions`)."""

    def __init__(self, dataset, special_ids: list[int], mask_prob: float) -> None:
        super().__init__(dataset)
        self.special_ids = torch.tensor(special_ids)
        self.mask_prob = mask_prob

    def __getitem__(self, index: int) -> int:
        return block_budget(self.dataset[index], self.special_ids, self.mask_prob)

    def collater(self, samples: list[int]) -> int:
        return int(sum(samples))


def block_budget(tokens, special_ids, mask_prob: float) -> int:
    """`masking.budget` of one block (1-D ids, padding allowed), on the host."""
    n = masking.candidate_mask(torch.as_tensor(tokens), torch.as_tensor(special_ids)).sum()
    return int(masking.budget(n.reshape(1), mask_prob))


@dataclass
class AdversarialMaskedLMConfig(MaskedLMConfig):
    masking_strategy: ChoiceEnum(MASKING_STRATEGIES) = field(
        default="learned",
        metadata={"help": "who picks the positions to mask: the learned masker; or a baseline "
                  "through the same criterion and budget: random (fairseq's masked_lm), span "
                  "(SpanBERT-style geometric spans), frequency (p ~ count^-exponent), "
                  "adaptive (p ~ the predictor's running error rate on the token's type); "
                  "whole-word variants of each with --mask-whole-words"},
    )
    bf16_autocast: bool = field(
        default=False,
        metadata={"help": "bf16 mixed precision: forward passes under bf16 autocast, fp32 "
                  "weights, gradients and optimizer state, no loss scaling. Use instead of "
                  "--fp16/--amp/--bf16 (fairseq's --bf16 implies --tpu)"},
    )
    bf16_weights: bool = field(
        default=False,
        metadata={"help": "bf16 weights and activations, with fp32 master weights and Adam "
                  "state in --optimizer amt_adam (which this needs), no loss scaling. Moves "
                  "half the bytes of --bf16-autocast, whose residual stream stays fp32, and "
                  "has no casts. The checkpoint's model holds the bf16 weights; its optimizer "
                  "state holds the fp32 master weights, which a resumed run continues from. "
                  "Gradients are summed over --update-freq micro-batches and all-reduced "
                  "across GPUs in fp32 (--ddp-backend pytorch_ddp or legacy_ddp)"},
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the predictor's layers and the masker (fused "
                  "kernels; compiling takes a minute or two at start-up). Needs triton on GPUs"},
    )
    torch_compile_mode: ChoiceEnum(COMPILE_MODES) = field(
        default="default",
        metadata={"help": "torch.compile mode under --torch-compile: reduce-overhead replays "
                  "each compiled block as a CUDA graph, which removes most of the per-kernel "
                  "launch cost that bounds small shapes on GPUs (more GPU memory; no effect "
                  "on CPUs); max-autotune also searches kernel configurations (slow start)"},
    )
    pad_to_multiple: int = field(
        default=1,
        metadata={"help": "pad each batch's length up to a multiple of this (not past "
                  "--tokens-per-sample): a few batch shapes instead of one per length, for "
                  "--torch-compile-mode reduce-overhead, whose CUDA graphs are recorded per "
                  "shape. Costs the extra padding's compute"},
    )
    word_boundaries: ChoiceEnum(["sentencepiece", "gpt2"]) = field(
        default="sentencepiece",
        metadata={"help": "how --mask-whole-words finds word starts in the dictionary: "
                  "SentencePiece pieces starting with '\u2581', or GPT-2 BPE token ids "
                  "(read from --gpt2-encoder-json)"},
    )
    gpt2_encoder_json: Optional[str] = field(
        default=None,
        metadata={"help": "GPT-2 BPE's encoder.json, for --word-boundaries gpt2: a local "
                  "file, never downloaded"},
    )


@register_task("adversarial_masked_lm", dataclass=AdversarialMaskedLMConfig)
class AdversarialMaskedLMTask(MaskedLMTask):
    """Unmasked token blocks for adversarial masking; see the module docstring."""

    cfg: AdversarialMaskedLMConfig

    def __init__(self, cfg: AdversarialMaskedLMConfig, dictionary=None) -> None:
        if not 0.0 < cfg.mask_prob <= 1.0:
            raise UsageError(f"--mask-prob must be in (0, 1], got {cfg.mask_prob}")
        if cfg.pad_to_multiple < 1:
            raise UsageError(f"--pad-to-multiple must be 1 or more, got {cfg.pad_to_multiple}")
        if cfg.leave_unmasked_prob + cfg.random_token_prob > 1.0:
            raise UsageError(
                "--leave-unmasked-prob + --random-token-prob must not exceed 1 "
                f"(got {cfg.leave_unmasked_prob} + {cfg.random_token_prob})"
            )
        super().__init__(cfg, dictionary)
        self._clip_norm = 0.0  # the run's --clip-norm, read by setup_task
        self.is_word_start = self._word_start_table() if cfg.mask_whole_words else None
        self.groups_to_step: set[str] | None = None  # set by train_step, used by optimizer_step
        self._roles = None  # (model, its parameter groups): see _roles_of
        # --masking-strategy adaptive: the predictor's running accuracy per type (V,), kept
        # by the criterion and saved in checkpoints (get_checkpoint_dict)
        self.type_accuracy: torch.Tensor | None = None

    @classmethod
    def setup_task(cls, cfg: AdversarialMaskedLMConfig, **kwargs):
        if cfg.bf16_weights and not kwargs.get("from_checkpoint"):
            check_bf16_weights(cfg)
        optimization = run_config(cfg, "optimization")
        update_freq = list(getattr(optimization, "update_freq", None) or [1])
        if (cfg.torch_compile and cfg.torch_compile_mode in CUDA_GRAPH_MODES
                and not kwargs.get("from_checkpoint") and max(update_freq) > 1):
            raise UsageError(_NO_ACCUMULATION.format(mode=cfg.torch_compile_mode))
        task = super().setup_task(cfg, **kwargs)
        # the run's --clip-norm, for clipping per role under FP16Optimizer (see train_step)
        task._clip_norm = float(getattr(optimization, "clip_norm", 0.0) or 0.0)
        return task

    def get_checkpoint_dict(self) -> dict:
        """What fairseq saves in a checkpoint's extra_state for this task: the adaptive
        strategy's running accuracy per type, so that a resumed run masks as before."""
        if self.type_accuracy is None:
            return {}
        return {type(self).__name__: {"type_accuracy": self.type_accuracy.detach().cpu()}}

    def set_checkpoint_dict(self, state: dict) -> None:
        if "type_accuracy" in state:
            self.type_accuracy = state["type_accuracy"]

    def special_token_ids(self) -> list[int]:
        """Symbols that are never masked: fairseq's specials (bos, pad, eos, unk), <mask>,
        and the madeupword fillers that pad the dictionary."""
        d = self.dictionary
        ids = set(range(d.nspecial)) | {self.mask_idx}
        ids |= {i for i, s in enumerate(d.symbols) if s.startswith("madeupword")}
        return sorted(ids)

    def _word_start_table(self) -> torch.Tensor:
        """(V,) bool: does this dictionary symbol begin a word?"""
        d = self.dictionary
        if self.cfg.word_boundaries == "gpt2":
            path = self.cfg.gpt2_encoder_json
            if not path or not os.path.isfile(path):
                missing = f" ({path} does not exist)" if path else ""
                raise UsageError(
                    "--mask-whole-words with --word-boundaries gpt2 reads word starts from "
                    f"GPT-2's encoder.json, which is never downloaded{missing}: pass "
                    "--gpt2-encoder-json PATH, the file the corpus was encoded with"
                )
            with open(path, encoding="utf-8") as f:
                begins = masking.symbol_starts_word(d.symbols, json.load(f))
        else:
            if not any(s.startswith("\u2581") for s in d.symbols):
                raise UsageError(
                    "--mask-whole-words with --word-boundaries sentencepiece needs a dictionary "
                    "of SentencePiece pieces (symbols starting with '\u2581'); this one has "
                    "none. Encode the corpus with SentencePiece, or pass "
                    "--word-boundaries gpt2 for GPT-2 BPE data"
                )
            begins = masking.symbol_starts_word(d.symbols)
        table = [
            i < d.nspecial or sym.startswith("madeupword") or sym == "<mask>" or begins[i]
            for i, sym in enumerate(d.symbols)
        ]
        return torch.tensor(table, dtype=torch.bool)

    def build_model(self, cfg, from_checkpoint: bool = False):
        model = super().build_model(cfg, from_checkpoint)
        if (self.cfg.masking_strategy == "learned" and not from_checkpoint
                and getattr(model, "masker", None) is None):
            raise UsageError(
                "--masking-strategy learned needs a model with a masker: use --arch amt_tiny, "
                "amt_small, amt_base or amt_large (or another --masking-strategy)")
        if self.cfg.bf16_weights and not from_checkpoint:
            # amt_adam keeps the fp32 master weights (see amt_plugin/optimizer.py); tools
            # that load a checkpoint to evaluate or fine-tune it keep their own precision
            model = model.to(torch.bfloat16)
        if self.cfg.torch_compile_mode != "default" and not self.cfg.torch_compile:
            raise UsageError(f"--torch-compile-mode {self.cfg.torch_compile_mode} needs "
                             "--torch-compile as well")
        # Training only: tools that load a checkpoint to evaluate or fine-tune it
        # (from_checkpoint) run eager instead of paying the compile time.
        if self.cfg.torch_compile and not from_checkpoint:
            if not hasattr(model, "compile_blocks"):
                raise UsageError("--torch-compile works with the amt_* architectures only")
            if torch.cuda.is_available():
                from torch.utils._triton import has_triton

                if not has_triton():
                    raise UsageError("--torch-compile on a GPU needs triton (pip install "
                                     "triton matching your torch), or leave the flag out")
            model.compile_blocks(self.cfg.torch_compile_mode)
            if (self.cfg.torch_compile_mode in CUDA_GRAPH_MODES and torch.cuda.is_available()
                    and self.cfg.pad_to_multiple == 1 and self.cfg.sample_break_mode != "none"):
                logger.warning(
                    "--torch-compile-mode %s records CUDA graphs for every batch shape, and "
                    "--sample-break-mode %s makes batches of many lengths: pass "
                    "--pad-to-multiple (e.g. 32) to pad them to a few",
                    self.cfg.torch_compile_mode, self.cfg.sample_break_mode)
        return model

    def _begin_step(self, model, optimizer) -> None:
        """Under CUDA graphs (--torch-compile-mode reduce-overhead / max-autotune on a GPU),
        tell torch that a new training step begins: the graphs then reuse the buffers of the
        previous step's outputs, which no one holds any more (the trainer has stepped and
        logged). setup_task refuses --update-freq > 1; this catches a second micro-batch
        however it comes (fairseq's trainer also splits a batch that runs out of memory)."""
        if not (self.cfg.torch_compile and self.cfg.torch_compile_mode in CUDA_GRAPH_MODES):
            return
        first = next(model.parameters())
        if not first.is_cuda:
            return
        # This update already has gradients: in the parameters (they live in the graphs'
        # output buffers, which the next replay overwrites: accumulation would silently go
        # wrong), or, with --bf16-weights, already taken into amt_adam's masters. That case
        # is refused too: every other output of the earlier micro-batch's replays would be
        # overwritten as well, and accumulating under CUDA graphs has never been checked.
        if first.grad is not None or (isinstance(optimizer, AMTAdam)
                                      and optimizer.has_folded_grads):
            raise UsageError(_NO_ACCUMULATION.format(mode=self.cfg.torch_compile_mode))
        torch.compiler.cudagraph_mark_step_begin()

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs) -> None:
        src = self._load_dataset_split(split, epoch, combine)  # token blocks, <s> prepended
        too_long = src.sizes > self.cfg.tokens_per_sample
        if too_long.any():  # fairseq skips them with a one-line count; say what it costs
            share = src.sizes[too_long].sum() / max(1, src.sizes.sum())
            logger.warning(
                f"{split}: {int(too_long.sum()):,} lines longer than --tokens-per-sample "
                f"{self.cfg.tokens_per_sample} ({share:.1%} of the tokens) will be skipped, "
                f"because --sample-break-mode {self.cfg.sample_break_mode} keeps lines whole: "
                "use --sample-break-mode none (blocks across lines) or shorter lines")
        with data_utils.numpy_seed(self.cfg.seed):
            shuffle = np.random.permutation(len(src))
        dataset = NestedDictionaryDataset(
            {
                "id": IdDataset(),
                "net_input": {
                    "src_tokens": self._padded(src),
                    "src_lengths": NumelDataset(src, reduce=False),
                },
                "nsentences": NumSamplesDataset(),
                "ntokens": NumelDataset(src, reduce=True),
                "mask_budget": MaskBudgetDataset(src, self.special_token_ids(),
                                                 self.cfg.mask_prob),
            },
            sizes=[src.sizes],
        )
        self.datasets[split] = EveryBlockSortDataset(dataset, sort_order=[shuffle, src.sizes])

    def _padded(self, src) -> RightPadDataset:
        """src's blocks right-padded into batches, to a multiple of --pad-to-multiple."""
        if self.cfg.pad_to_multiple == 1:
            return RightPadDataset(src, pad_idx=self.dictionary.pad())
        return PadToMultipleDataset(src, self.dictionary.pad(), self.cfg.pad_to_multiple,
                                    self.cfg.tokens_per_sample)

    def autocast(self, model, optimizer=None):
        """The forward pass's precision: bf16 autocast if asked, fp16 autocast under --amp
        (as fairseq does), else none."""
        device = next(model.parameters()).device.type
        if self.cfg.bf16_autocast:
            half = (AMPOptimizer, _FP16OptimizerMixin, _MemoryEfficientFP16OptimizerMixin)
            if isinstance(optimizer, half):
                raise UsageError("--bf16-autocast replaces --fp16 / --amp / "
                                 "--memory-efficient-fp16: pass only one of them")
            if device == "cuda" and not torch.cuda.is_bf16_supported():
                raise UsageError("--bf16-autocast needs a GPU with bf16 support (Ampere or "
                                 "newer); on this one use --fp16 --fp16-no-flatten-grads")
            return torch.autocast(device, dtype=torch.bfloat16)
        return torch.autocast(device, dtype=torch.float16,
                              enabled=isinstance(optimizer, AMPOptimizer))

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        # FairseqTask.train_step, with our autocast (its own would switch bf16 autocast off)
        if hasattr(criterion, "groups_to_step"):
            self.groups_to_step = criterion.groups_to_step(update_num)
        model.train()
        model.set_num_updates(update_num)
        self._begin_step(model, optimizer)
        fp32_optimizer = getattr(optimizer, "fp32_optimizer", None)
        if isinstance(optimizer, FP16Optimizer) and isinstance(fp32_optimizer, AMTAdam):
            # fairseq's FP16Optimizer clips all roles jointly: let amt_adam clip each role
            fp32_optimizer.clip_roles_under(optimizer, self._clip_norm)
        elif isinstance(optimizer, AMTAdam):  # the trainer's own optimizer: no fp16/amp wrapper
            optimizer.skips_nonfinite = True  # NaN/inf gradients skip their update
            # on a GPU, read the gradient norm one update late (see amt_plugin.optimizer)
            synced = getattr(optimizer.cfg, "sync_grad_norm", False)
            optimizer.norm_read_late = (optimizer.fused and not synced
                                        and next(model.parameters()).is_cuda)
            # bf16 weights under data parallelism: it all-reduces their fp32 gradients itself
            optimizer.reduce_gradients_of(model)
        with torch.autograd.profiler.record_function("forward"), self.autocast(model, optimizer):
            loss, sample_size, logging_output = criterion(model, sample)
        if ignore_grad:
            loss *= 0
        with torch.autograd.profiler.record_function("backward"):
            optimizer.backward(loss)
        return loss, sample_size, logging_output

    def valid_step(self, sample, model, criterion):
        model.eval()
        # Under --torch-compile validation runs eager: its modes (eval, no grad) would double
        # each compiled block's variants, and past 8 torch stops compiling and falls back to
        # eager for every new one, in training too.
        eager = torch.compiler.set_stance("force_eager") if self.cfg.torch_compile \
            else contextlib.nullcontext()
        with torch.no_grad(), self.autocast(model), eager:
            return criterion(model, sample)

    def _roles_of(self, model) -> set:
        """The parameter groups ("predictor", "masker") of the model's parameters; found once
        per model (walking the module tree for them every update costs host time)."""
        if self._roles is None or self._roles[0] is not model:
            self._roles = (model, {role_of(p) for p in model.parameters()})
        return self._roles[1]

    def optimizer_step(self, optimizer, model, update_num) -> None:
        """Step the parameter groups chosen for this update; the others do not move at all."""
        groups = self.groups_to_step
        if groups is None or self._roles_of(model) <= groups:
            optimizer.step()
            return
        # AMPOptimizer.step() takes no `groups` (fairseq's amp_optimizer.py) although it
        # reports supports_groups; it is handled below with the plain optimizers.
        if optimizer.supports_groups and not isinstance(optimizer, AMPOptimizer):
            optimizer.step(groups=groups)
            return
        if isinstance(optimizer, FP16Optimizer):
            raise UsageError(
                "this optimizer cannot step the predictor without moving the masker under "
                "--fp16 (its fp32 copies get zero gradients, and Adam momentum would still "
                "move them). Use --optimizer amt_adam --fp16-no-flatten-grads, or "
                "--optimizer composite with groups 'predictor' and 'masker'"
            )
        # These optimizers work on the model's own parameters, and torch optimizers skip a
        # parameter without a gradient (no update, no moment update): drop the frozen ones.
        for p in model.parameters():
            if role_of(p) not in groups:
                p.grad = None
        optimizer.step()


def role_of(parameter) -> str:
    """The parameter's role, "predictor" or "masker", as the `amt` model tags it. A model
    without tags (a stock `roberta`, with --masking-strategy random) is all predictor."""
    return getattr(parameter, "param_group", PREDICTOR)


def run_config(task_cfg: AdversarialMaskedLMConfig, section: str):
    """A section of the whole run's config (`common`, `optimization`, ...) that this task
    config is part of under fairseq-train / fairseq-hydra-train; None when it stands alone."""
    root = task_cfg._get_parent() if OmegaConf.is_config(task_cfg) else None
    return getattr(root, section, None) if root is not None else None


def check_bf16_weights(task_cfg: AdversarialMaskedLMConfig) -> None:
    """--bf16-weights: a training flag, the run's only precision flag, with amt_adam (which
    keeps the fp32 master weights of the bf16 model build_model makes), on a bf16 GPU.
    fairseq's own bf16 training (--bf16) cannot be used on GPUs: it implies --tpu."""
    common = run_config(task_cfg, "common")
    if common is None:
        raise UsageError("--bf16-weights is a training flag (fairseq-train, "
                         "fairseq-hydra-train): it configures the trainer")
    clashes = [flag for flag, on in (
        ("--fp16", common.fp16), ("--memory-efficient-fp16", common.memory_efficient_fp16),
        ("--amp", common.amp), ("--bf16 / --tpu", common.bf16 or common.tpu),
        ("--bf16-autocast", task_cfg.bf16_autocast)) if on]
    if clashes:
        raise UsageError(f"--bf16-weights replaces {', '.join(clashes)}: pass only one "
                         "precision flag")
    optimizer = getattr(run_config(task_cfg, "optimizer"), "_name", None)
    if optimizer != "amt_adam":
        raise UsageError(f"--bf16-weights needs --optimizer amt_adam, which keeps the fp32 "
                         f"master weights of the bf16 model (got {optimizer!r}); or train "
                         "with --bf16-autocast")
    distributed = run_config(task_cfg, "distributed_training")
    if distributed is not None:  # amt_adam all-reduces the fp32 gradients itself
        if distributed.ddp_backend not in ("pytorch_ddp", "c10d", "legacy_ddp", "no_c10d"):
            raise UsageError(f"--bf16-weights works with --ddp-backend pytorch_ddp or "
                             f"legacy_ddp (got {distributed.ddp_backend}); or train with "
                             "--bf16-autocast")
        if distributed.ddp_comm_hook != "none":
            raise UsageError(f"--bf16-weights all-reduces the gradients in fp32 itself: "
                             f"leave out --ddp-comm-hook {distributed.ddp_comm_hook}")
    if getattr(run_config(task_cfg, "optimization"), "use_bmuf", False):
        raise UsageError("--bf16-weights cannot be used with --use-bmuf (BMUF averages "
                         "amt_adam's fp32 master weights, not the model's bf16 ones); train "
                         "with --bf16-autocast")
    if torch.cuda.is_available() and not common.cpu and not torch.cuda.is_bf16_supported():
        raise UsageError("--bf16-weights needs a GPU with bf16 support (Ampere or newer); on "
                         "this one use --fp16 --fp16-no-flatten-grads")
