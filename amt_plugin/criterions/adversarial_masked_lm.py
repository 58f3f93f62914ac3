"""Criterion `adversarial_masked_lm`: the game between the masker and the predictor.

One forward, per batch of unmasked token blocks `tokens (B, T)`:

1. Budget: each sequence with n selectable units (tokens, or words with --mask-whole-words)
   gets exactly k = max(1, round(mask_prob * n)) of them masked.
2. Choice: k_rand = round(random_share * k) units uniformly at random (exploration), then
   k - k_rand from the masker's softmax(logits / temperature) over the rest, without
   replacement (Gumbel-top-k), keeping log pi(S), the log-probability of that ordered draw.
   During the first --masker-warmup-updates, and with --masking-strategy random, all k are
   uniform: fairseq's random masking through the same code and budget. The other baselines,
   same budget: `span` (SpanBERT-style geometric spans) and `frequency` (p ~ count^-a).
3. Corruption 80/10/10 (<mask> / random token / unchanged) and the predictor's forward.

Schedules (off by default): --mask-prob-start decays the masking rate linearly to --mask-prob
over --schedule-updates, for every strategy; --masker-random-share-start anneals the masker's
exploration share from the end of its warm-up to --masker-random-share.

Objective (both players minimise their own loss; gradients never cross; the masker's side is
in `amt_plugin/objectives.py`):

    predictor:  L_pred   = sum_{i in M} CE(predictor(x~)_i, x_i)           (summed, like masked_lm)
    masker:     L_masker = -1/B' sum_b (r_b - rbar_b) log pi(S_b) - beta * 1/B' sum_b H_b

    r_b    = mean CE of the predictor on the positions the masker chose in sequence b
             (detached: the masker maximises the predictor's loss, it does not backprop into it)
    rbar_b = leave-one-out mean of r over the other sequences of the batch (the baseline);
             in a micro-batch where only one sequence acted (--batch-size 1, an epoch's last
             batch), a running mean of past batches' rewards (decay 0.9, kept on the device
             and saved in checkpoints with the masker)
    H_b    = entropy of softmax(logits_b / temperature) over b's selectable units
    beta   = --masker-entropy-weight;  B' = sequences where the masker chose something

Stop-gradients: the predictor's input is discrete (token ids), so L_pred has no path to the
masker; r is detached, so L_masker has no path to the predictor. The returned loss is
L_pred + sample_size * L_masker, so that after fairseq divides every gradient by sample_size
the predictor gets the mean token loss and the masker the mean sequence loss.

Validation also scores the predictor on a *fixed* uniformly random 15% mask, every scored
position's input `<mask>`, seeded per sample id and independent of the strategy, the batch
and the worker count: the comparable yardstick `fixed_mask_loss` / `fixed_mask_acc`, beside
the context-free reference `fixed_mask_ref_loss` and `fixed_mask_below_ref`, overall and per
frequency bucket of the dictionary (top100 / next900 / rest); see `amt_plugin/yardstick.py`.

Alternation: the masker trains on updates warmup, warmup + N, warmup + 2N, ... (N =
--masker-update-freq); `groups_to_step` tells the task which parameter groups to step. On
other updates the masker runs without an autograd graph; under data parallelism its
parameters enter the loss as `0 * sum(p)` so every parameter gets a (zero) gradient and DDP
needs no find_unused_parameters. Either way the optimizer leaves the masker untouched.

Host-device syncs: none in the forward and backward of token-level masking. How many
positions the LM head scores is the batch's budget, which the task counts on the host
(`mask_budget`); whole-word masking reads it back with one `nonzero`. Everything else stays
on the device until the logged sums are read back together in `reduce_metrics`.
"""


import logging
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from omegaconf import II, OmegaConf
from torch import Tensor
from torch.profiler import record_function

from .. import masking, yardstick
from ..errors import UsageError
from ..models.predictor import PredictorEncoder
from ..objectives import masker_objective

logger = logging.getLogger(__name__)

TOP_TYPES = 100  # "frequent" = the 100 most frequent types of the dictionary


@dataclass
class AdversarialMaskedLMCriterionConfig(FairseqDataclass):
    masker_temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature of the masker's choice"}
    )
    masker_random_share: float = field(
        default=0.2,
        metadata={"help": "share of each sequence's budget drawn uniformly at random "
                  "(exploration; 1.0 = random masking)"},
    )
    masker_warmup_updates: int = field(
        default=500,
        metadata={"help": "updates of plain random masking before the masker takes over "
                  "(the predictor first learns the easy tokens)"},
    )
    masker_update_freq: int = field(
        default=1,
        metadata={"help": "step the masker once every N predictor updates (1 = every update)"},
    )
    masker_entropy_weight: float = field(
        default=0.01,
        metadata={"help": "weight of the entropy bonus in the masker's loss (guards against "
                  "collapse onto a few positions)"},
    )
    adaptive_decay: float = field(
        default=0.9,
        metadata={"help": "--masking-strategy adaptive: the running accuracy per type keeps "
                  "this share of its old value at each batch where the type is masked"},
    )
    adaptive_floor: float = field(
        default=0.05,
        metadata={"help": "--masking-strategy adaptive: the smallest masking weight of a type "
                  "(weight = 1 - running accuracy)"},
    )
    masker_collapse_entropy: float = field(
        default=1.0,
        metadata={"help": "warn in the training log when the masker's entropy (nats) falls "
                  "below this, or when fewer than 20%% of its picks are distinct types"},
    )
    frequency_exponent: float = field(
        default=1.0,
        metadata={"help": "--masking-strategy frequency: p(token) ~ count(token)^-exponent"},
    )
    span_geometric_p: float = field(
        default=0.2, metadata={"help": "--masking-strategy span: span length ~ Geometric(p)"}
    )
    span_max_length: int = field(
        default=10, metadata={"help": "--masking-strategy span: longest span (units)"}
    )
    mask_prob_start: Optional[float] = field(
        default=None,
        metadata={"help": "masking rate at the first update, decayed linearly to --mask-prob "
                  "by --schedule-updates (Ankner et al., EACL 2024: 0.3 to 0.15); applies to "
                  "every strategy. Default: --mask-prob throughout"},
    )
    masker_random_share_start: Optional[float] = field(
        default=None,
        metadata={"help": "--masker-random-share when the masker starts choosing (after "
                  "--masker-warmup-updates), annealed linearly to --masker-random-share by "
                  "--schedule-updates. Default: --masker-random-share throughout"},
    )
    schedule_updates: int = field(
        default=0,
        metadata={"help": "the update at which --mask-prob-start and "
                  "--masker-random-share-start reach their final values (needed with "
                  "either; usually --max-update)"},
    )
    fixed_mask_prob: float = field(
        default=0.15,
        metadata={"help": "share of tokens the fixed validation mask scores; keep it equal "
                  "across runs that are compared (it does not follow --mask-prob on purpose)"},
    )
    fixed_mask_seed: int = field(
        default=0,
        metadata={"help": "seed of the fixed validation mask; keep it equal across runs that "
                  "are compared (it does not follow --seed on purpose)"},
    )
    seed: int = II("common.seed")


@register_criterion("adversarial_masked_lm", dataclass=AdversarialMaskedLMCriterionConfig)
class AdversarialMaskedLMCriterion(FairseqCriterion):
    """Masked-LM loss for the predictor and REINFORCE loss for the masker; see module doc."""

    def __init__(self, cfg: AdversarialMaskedLMCriterionConfig, task) -> None:
        super().__init__(task)
        if not hasattr(task, "is_word_start"):
            raise UsageError(
                "--criterion adversarial_masked_lm needs --task adversarial_masked_lm "
                "(it masks inside the criterion; other tasks mask in the dataset)"
            )
        if cfg.masker_temperature <= 0:
            raise UsageError(f"--masker-temperature must be > 0, got {cfg.masker_temperature}")
        if not 0.0 <= cfg.masker_random_share <= 1.0:
            raise UsageError(
                f"--masker-random-share must be in [0, 1], got {cfg.masker_random_share}"
            )
        for flag, start in (("--mask-prob-start", cfg.mask_prob_start),
                            ("--masker-random-share-start", cfg.masker_random_share_start)):
            if start is not None and not 0.0 <= start <= 1.0:
                raise UsageError(f"{flag} must be in [0, 1], got {start}")
            if start is not None and not cfg.schedule_updates > 0:
                raise UsageError(f"{flag} needs --schedule-updates N: the update at which "
                                 "the schedule ends (usually --max-update)")
        if cfg.masker_update_freq < 1:
            raise UsageError(f"--masker-update-freq must be >= 1, got {cfg.masker_update_freq}")
        if cfg.masker_warmup_updates < 0:
            raise UsageError("--masker-warmup-updates must be >= 0")
        if not 0.0 <= cfg.adaptive_decay < 1.0 or not 0.0 < cfg.adaptive_floor <= 1.0:
            raise UsageError("--adaptive-decay must be in [0, 1) and --adaptive-floor in "
                             f"(0, 1], got {cfg.adaptive_decay} and {cfg.adaptive_floor}")
        # plain copies of the two configs: the step reads them a dozen times per update,
        # and each read of an omegaconf node costs tens of microseconds of host time
        self.cfg = plain(cfg)
        self.task_cfg = plain(task.cfg)
        _collapse["threshold"] = cfg.masker_collapse_entropy
        self.strategy = task.cfg.masking_strategy
        self.learned = self.strategy == "learned"
        self.mask_idx = task.mask_idx
        self.num_updates = 0
        self._calls_this_update = 0
        self._compiled_fns = {}  # see _compiled

        d = task.source_dictionary
        special_ids = torch.tensor(task.special_token_ids(), dtype=torch.long)
        is_special = torch.zeros(len(d), dtype=torch.bool)
        is_special[special_ids] = True
        counts = torch.tensor(d.count, dtype=torch.long)  # the training split's
        rank = yardstick.frequency_rank(counts, is_special)  # 0 = most frequent
        # Not part of any checkpoint: they are rebuilt from the dictionary.
        self.register_buffer("special_ids", special_ids, persistent=False)
        self.register_buffer("replacement_ids", (~is_special).nonzero().squeeze(1),
                             persistent=False)
        self.register_buffer("freq_rank", rank, persistent=False)
        self.register_buffer("is_top", (rank < TOP_TYPES) & ~is_special, persistent=False)
        self.register_buffer("counts", counts, persistent=False)
        self.register_buffer("unigram_nll", yardstick.unigram_nll(counts, is_special),
                             persistent=False)  # the context-free reference
        ws = task.is_word_start
        self.register_buffer("is_word_start", ws if ws is not None else torch.zeros(0),
                             persistent=False)
        self.whole_words = ws is not None

    # --- the schedule -------------------------------------------------------------------

    def set_num_updates(self, num_updates: int) -> None:
        if num_updates != self.num_updates:
            self._calls_this_update = 0
        self.num_updates = num_updates

    def masker_chooses(self, update_num: int) -> bool:
        return self.learned and update_num >= self.cfg.masker_warmup_updates

    def masker_trains(self, update_num: int) -> bool:
        past = update_num - self.cfg.masker_warmup_updates
        return self.masker_chooses(update_num) and past % self.cfg.masker_update_freq == 0

    def mask_prob(self, training: bool) -> float:
        """This update's masking rate: --mask-prob, or its decay from --mask-prob-start.
        Validation masks at the final rate."""
        final, start = self.task_cfg.mask_prob, self.cfg.mask_prob_start
        if start is None or not training:
            return final
        return masking.linear_schedule(start, final, self.num_updates, 0,
                                       self.cfg.schedule_updates)

    def random_share(self) -> float:
        """The masker's exploration share this update (see --masker-random-share-start)."""
        final, start = self.cfg.masker_random_share, self.cfg.masker_random_share_start
        if start is None:
            return final
        return masking.linear_schedule(start, final, self.num_updates,
                                       self.cfg.masker_warmup_updates,
                                       self.cfg.schedule_updates)

    def groups_to_step(self, update_num: int) -> set[str]:
        """Parameter groups the optimizer steps after this update (see optimizer_step)."""
        self.set_num_updates(update_num)
        return {"predictor", "masker"} if self.masker_trains(update_num) else {"predictor"}

    def _generator(self, device: torch.device, sample: dict, training: bool) -> torch.Generator:
        """Fresh generator per micro-batch: reproducible, resumable, different per rank.

        fairseq reseeds torch with seed + num_updates on every rank alike, so masks drawn from
        the global generator would be identical across data-parallel ranks.
        """
        if training:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            key = [self.cfg.seed, 0, self.num_updates, rank, self._calls_this_update]
            self._calls_this_update += 1
        else:  # validation: the same masks for the same samples, whatever the update
            ids = sample["id"].tolist() if "id" in sample else [0]
            key = [self.cfg.seed, 1, len(ids), *ids[:8]]
        seed = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1)
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g

    def _compiled(self, fn, model):
        """`fn` (masker_draw, masker_objective), compiled in the model's torch.compile mode
        when its blocks are (--torch-compile), so that each runs as one fused graph."""
        mode = getattr(model, "compile_mode", None)
        if mode is None:
            return fn
        if fn not in self._compiled_fns:
            # dynamic shapes from the start: batches of other lengths reuse the one graph
            # (no static first variant), leaving room under torch's limit of 8 variants for
            # grad on / off (a resting masker) and padded / unpadded batches
            self._compiled_fns[fn] = torch.compile(fn, dynamic=True,
                                                   mode=None if mode == "default" else mode)
        return self._compiled_fns[fn]

    # --- one forward ----------------------------------------------------------------------

    def forward(self, model, sample, reduce: bool = True):
        """Returns L_pred + sample_size * L_masker (when the masker trains this update)."""
        outcome = self.play(model, sample)
        loss = outcome.mlm_loss
        if outcome.masker_trains:
            loss = loss + outcome.masker_loss * outcome.sample_size
        masker = getattr(model, "masker", None)
        if masker is not None and model.training and not outcome.masker_trains and _ddp():
            # every masker parameter in the graph with a zero gradient (see module docstring);
            # without data parallelism the optimizer simply skips parameters without one
            loss = loss + 0.0 * sum(p.sum() for p in masker.parameters())
        logging_output = outcome.logging_output
        if model.training and not _ddp():  # (fairseq sums the logs across ranks itself)
            logging_output = start_host_copy(logging_output)
        return loss, outcome.sample_size, logging_output

    def play(self, model, sample) -> "Outcome":
        """One round of the game on a batch: choose, corrupt, predict, score both players."""
        tokens = sample["net_input"]["src_tokens"]  # (B, T) unmasked
        g = self._generator(tokens.device, sample, model.training)

        # Whether the batch has padding, known on the host for free: the task's `ntokens`
        # counts the non-pad tokens. Unpadded batches attend without a mask (flash kernels).
        ntokens = sample.get("ntokens")
        padded = ntokens != tokens.numel() if isinstance(ntokens, int) else None

        masker = getattr(model, "masker", None)
        # Validation uses the masker whenever the strategy is learned (an untrained masker is
        # uniform, so during warm-up that is random masking too).
        chooses = self.learned and (not model.training or self.masker_chooses(self.num_updates))
        trains = model.training and self.learned and self.masker_trains(self.num_updates)
        if self.learned and masker is None:
            raise UsageError(
                "--masking-strategy learned needs a model with a masker: use --arch amt_tiny, "
                "amt_small, amt_base or amt_large (or --masking-strategy random)"
            )

        def draw_masker(available: Tensor, k: Tensor, u: Tensor) -> masking.Draw:
            with torch.set_grad_enabled(trains), record_function("masker"):
                return masking.Draw(*self._compiled(masker_draw, model)(
                    masker, tokens, padded, available, k, self.cfg.masker_temperature, u))

        # --- choose: which positions to mask (the masker, or a baseline) ---
        accuracy = self.type_accuracy(tokens.device) if self.strategy == "adaptive" else None
        choice = masking.choose(
            tokens, self.special_ids, self.mask_prob(model.training),
            "learned" if chooses else "random" if self.learned else self.strategy, g,
            is_word_start=self.is_word_start if self.whole_words else None,
            draw_masker=draw_masker, random_share=self.random_share(),
            counts=self.counts, frequency_exponent=self.cfg.frequency_exponent,
            type_weights=None if accuracy is None else masking.adaptive_weights(
                accuracy, self.cfg.adaptive_floor),
            span_p=self.cfg.span_geometric_p, span_max_length=self.cfg.span_max_length,
        )
        # --- corrupt: 80/10/10, per word in whole-word mode ---
        corrupted = masking.corrupt(
            tokens, choice.mask, self.mask_idx, self.replacement_ids,
            self.task_cfg.leave_unmasked_prob, self.task_cfg.random_token_prob, g,
            choice.starts,
        )
        # --- predict: the predictor's loss on the masked positions ---
        flat, targets, token_loss, logits = self.predict(model, tokens, corrupted, choice,
                                                         sample, padded)
        mlm_loss = token_loss.sum()
        if accuracy is not None and model.training:  # what the adaptive baseline learns from
            self.task.type_accuracy = masking.update_type_accuracy(
                accuracy, targets, logits.detach().argmax(-1) == targets,
                self.cfg.adaptive_decay)
        # --- reward and masker loss: REINFORCE on the predictor's detached loss ---
        masker_loss, logging_output = None, {}
        if choice.draw is not None:
            masker_loss, logging_output = self.masker_loss(model, tokens, choice, flat,
                                                           token_loss)
        else:  # the selection distribution is uniform over the units: entropy log n
            n = choice.units.sum(dim=1)
            logging_output["masker_entropy"] = n.clamp(min=1).double().log().sum()

        logging_output.update(self.diagnostics(tokens, choice, targets, sample))
        logging_output.update(loss=mlm_loss.detach(), masker_chooses=int(chooses),
                              masker_trains=int(trains))
        if not model.training:
            logging_output.update(self.fixed_mask_metrics(model, sample, tokens,
                                                          choice.candidates))
        return Outcome(mlm_loss, masker_loss, trains, targets.numel(), logging_output)

    def predict(self, model, tokens: Tensor, corrupted: Tensor, choice: masking.Choice,
                sample: dict, padded: bool | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The predictor on the corrupted batch, scored where the mask is: (flat positions
        (M,) row-major over (B, T), their targets (M,), cross-entropy (M,) in nats, the
        logits (M, V)), like
        fairseq's masked_lm. M is the batch's budget, which the task counted on the host, when
        every unit is one token; whole words mask a number of pieces known only on the device,
        read back by nonzero (a host-device sync), and so does a rate that --mask-prob-start
        still decays (the task counted the budget at --mask-prob)."""
        mask = choice.mask
        at_task_rate = self.mask_prob(model.training) == self.task_cfg.mask_prob
        budget_total = (sample.get("mask_budget") if choice.starts is None and at_task_rate
                        else None)
        if budget_total is not None:
            flat = masking.true_positions(mask.flatten(), budget_total)
        else:
            flat = mask.flatten().nonzero().squeeze(1)
        with record_function("predictor"):
            if isinstance(getattr(model, "encoder", None), PredictorEncoder):
                logits = model(corrupted, masked_tokens=flat, padded=padded)[0]  # (M, V)
            else:  # a stock RoBERTa predictor (--masking-strategy random with --arch roberta)
                logits = model(corrupted, masked_tokens=mask)[0]
        targets = tokens.flatten().index_select(0, flat)  # (M,)
        loss = F.cross_entropy(logits.float(), targets, reduction="none")
        return flat, targets, loss, logits

    def type_accuracy(self, device: torch.device) -> Tensor:
        """The adaptive strategy's running accuracy per type, kept by the task (it travels in
        checkpoints); zero, i.e. uniform masking, before the first batch."""
        acc = self.task.type_accuracy
        if acc is None:
            acc = torch.zeros(len(self.task.source_dictionary), device=device)
        elif acc.device != device:
            acc = acc.to(device, torch.float32)
        self.task.type_accuracy = acc
        return acc

    def masker_loss(self, model, tokens: Tensor, choice: masking.Choice, flat: Tensor,
                    token_loss: Tensor) -> tuple[Tensor, dict]:
        """The masker's REINFORCE loss (amt_plugin/objectives.py) from the predictor's
        detached loss on the positions it chose, and its logged sums. Updates the running
        reward mean, the fallback baseline saved with the masker."""
        masker, draw = model.masker, choice.draw
        by_masker = draw.selected
        if choice.starts is not None:
            by_masker = masking.from_word_start(by_masker, choice.starts) & choice.candidates
        loss_grid = torch.zeros(tokens.numel(), dtype=token_loss.dtype, device=tokens.device)
        loss_grid = loss_grid.index_copy(0, flat, token_loss.detach()).view_as(tokens)
        previous = masker.reward_mean
        if previous is None:  # NaN: no running mean yet (one compiled variant, not two)
            previous = torch.full((), float("nan"), device=tokens.device)
        loss, reward_mean, logs = self._compiled(masker_objective, model)(
            loss_grid, by_masker, draw.selected, tokens, draw.log_prob, draw.entropy,
            previous, self.cfg.masker_entropy_weight, self.is_top.numel(),
        )
        if model.training:  # a copy: under CUDA graphs the next replay reuses the output;
            # a non-finite reward (a skipped update's NaN loss) leaves the mean as it was
            masker.reward_mean = torch.where(reward_mean.isfinite(), reward_mean, previous)
        return loss, logs

    def diagnostics(self, tokens: Tensor, choice: masking.Choice, targets: Tensor,
                    sample: dict) -> dict:
        """Logged sums: does the choice prefer rare tokens (against uniform masking of the same
        batch and budget), how many positions, how frequent."""
        candidates = choice.candidates
        n = choice.units.sum(dim=1)
        top_share_of_candidates = (self.is_top[tokens] & candidates).sum(1) / n.clamp(min=1)
        return dict(
            ntokens=sample["ntokens"],
            nsentences=tokens.size(0),
            sample_size=targets.numel(),
            n_masked=targets.numel(),
            n_candidates=candidates.sum(),
            n_masked_top=self.is_top[targets].sum(),
            # expected count under uniform random masking of the same batch and budget
            n_rand_top=(choice.mask.sum(1) * top_share_of_candidates).sum().detach(),
            mask_rank_sum=self.freq_rank[targets].sum(),
            batches=1,
        )

    def fixed_mask_metrics(self, model, sample, tokens: Tensor, candidates: Tensor) -> dict:
        """The yardstick's sums for this batch (see `amt_plugin.yardstick`)."""
        ids = sample.get("id", torch.arange(tokens.size(0)))
        return yardstick.score(model, tokens, candidates, ids, self.cfg.fixed_mask_prob,
                               self.cfg.fixed_mask_seed, self.mask_idx, self.freq_rank,
                               self.unigram_nll)

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        sums = sum_logs(logging_outputs)

        def total(key: str) -> float:
            return sums.get(key, 0.0)

        sample_size = total("sample_size")
        nsentences = total("nsentences")
        n_masked = max(total("n_masked"), 1.0)
        metrics.log_scalar("loss", total("loss") / max(sample_size, 1) / math.log(2),
                           sample_size, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["loss"].avg))
        acted = total("masker_acted")
        if acted > 0:
            metrics.log_scalar("masker_loss", total("masker_loss") / max(nsentences, 1),
                               nsentences, round=4)
            # in bits, like `loss`
            metrics.log_scalar("masker_reward", total("masker_reward") / acted / math.log(2),
                               acted, round=3)
        metrics.log_scalar("masker_entropy", total("masker_entropy") / max(nsentences, 1),
                           nsentences, round=3)
        metrics.log_scalar("mask_top100_share", total("n_masked_top") / n_masked,
                           n_masked, round=4)
        metrics.log_scalar("mask_rand_top100_share", total("n_rand_top") / n_masked,
                           n_masked, round=4)
        metrics.log_scalar("mask_freq_rank", total("mask_rank_sum") / n_masked, n_masked,
                           round=1)
        metrics.log_scalar("masked_share", n_masked / max(total("n_candidates"), 1.0),
                           round=4)
        yardstick.log_metrics(sums)  # validation only: the comparable yardstick
        picks = total("masker_picks")
        if picks > 0:
            metrics.log_scalar("masker_distinct_types", total("masker_distinct") / picks, picks,
                               round=3)
        warn_if_collapsing(total("masker_entropy") / max(nsentences, 1),
                           total("masker_distinct") / picks if picks else 1.0,
                           total("masker_trains") > 0)
        # guard rails: is the masker choosing / training in these batches (0 during warm-up)
        batches = max(total("batches"), 1.0)
        metrics.log_scalar("masker_chooses", total("masker_chooses") / batches, round=2)
        metrics.log_scalar("masker_trains", total("masker_trains") / batches, round=2)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def masker_draw(masker, tokens: Tensor, padded: bool | None, available: Tensor, k: Tensor,
                temperature: float, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The masker's forward and its Gumbel-top-k draw of k[b] of the `available` units from
    the uniform draw u: (selected, log_prob, entropy) of `masking.Draw`. One function without
    a generator, so that torch.compile traces the whole of it."""
    logits = masker(tokens, padded=padded)  # (B, T)
    draw = masking.gumbel_top_k_from_uniform(logits, available, k, temperature, u)
    return draw.selected, draw.log_prob, draw.entropy


def plain(cfg):
    """An omegaconf config's values, resolved now, as plain attributes (for reading only);
    anything else (a dataclass built in Python) as it is."""
    if not OmegaConf.is_config(cfg):
        return cfg
    return SimpleNamespace(**OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


def _ddp() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def start_host_copy(logging_output: dict) -> dict:
    """Start copying the logged device tensors to the host, right after the forward that
    made them, without waiting (a CUDA event marks their arrival). fairseq reads the logs
    after the optimizer step; a read then would wait for the GPU to finish the whole update,
    so the CPU could not queue the next one meanwhile. This one waits for the forward only.
    The copy goes under "_host_copy" (keys, host values, event), which `sum_logs` reads; the
    device tensors stay for anyone else."""
    keys = [k for k, v in logging_output.items() if torch.is_tensor(v)]
    if not keys or not logging_output[keys[0]].is_cuda:
        return logging_output
    ready = torch.cuda.Event()
    host = stack_scalars([logging_output[k] for k in keys]).to("cpu", non_blocking=True)
    ready.record()
    return {**logging_output, "_host_copy": (keys, host, ready)}


def sum_logs(logging_outputs) -> dict[str, float]:
    """Sum every key over the logging outputs, reading device tensors back in one transfer
    (one host-device sync per update instead of one per key), or from the copies that
    `start_host_copy` began."""
    sums = {}
    for log in logging_outputs:
        copy = log.get("_host_copy")
        if copy is not None:
            keys, host, ready = copy
            if ready is not None:
                ready.synchronize()
            log = {**log, **dict(zip(keys, host.tolist()))}
        for key, value in log.items():
            if key.startswith("_"):
                continue
            sums[key] = sums[key] + value if key in sums else value
    tensors = [k for k, v in sums.items() if torch.is_tensor(v)]
    if tensors:
        sums.update(zip(tensors, stack_scalars([sums[k] for k in tensors]).tolist()))
    return {k: float(v) for k, v in sums.items()}


def stack_scalars(values: list[Tensor]) -> Tensor:
    """One float64 tensor of the scalar tensors `values`, on the first one's device: what is
    moved to the host in one transfer (float64 keeps counts exact up to 2**53)."""
    device = values[0].device
    return torch.stack([v.detach().to(device, torch.float64).reshape(()) for v in values])


_collapse = {"threshold": 1.0, "calls": 0, "warned_at": None}  # threshold set from the config


def warn_if_collapsing(entropy: float, distinct_share: float, masker_trained: bool) -> None:
    """Log a warning when the masker looks collapsed (then at most every 200 reductions)."""
    _collapse["calls"] += 1
    if not masker_trained:
        return
    if entropy >= _collapse["threshold"] and distinct_share >= 0.2:
        return
    last = _collapse["warned_at"]
    if last is not None and _collapse["calls"] - last < 200:
        return
    _collapse["warned_at"] = _collapse["calls"]
    logger.warning(
        "masker may be collapsing: entropy %.3f nats (threshold %.2f), %.0f%% of its picks "
        "are distinct types. Raise --masker-entropy-weight or --masker-random-share, or "
        "lower --masker-lr.", entropy, _collapse["threshold"], 100 * distinct_share)


@dataclass
class Outcome:
    """What one round of the game produced."""

    mlm_loss: Tensor  # L_pred, summed over the masked positions
    masker_loss: Tensor | None  # L_masker (None when the masker did not choose)
    masker_trains: bool  # whether L_masker enters this update's gradient
    sample_size: int  # masked positions: fairseq divides gradients by it
    logging_output: dict
