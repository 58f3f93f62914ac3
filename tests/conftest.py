"""Shared helpers: a tiny task + amt model + criterion built in-process, no CLI."""

import argparse

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY
from fairseq.models.roberta import RobertaModel

import amt_plugin  # noqa: F401  (registers everything)
from amt_plugin.criterions.adversarial_masked_lm import (
    AdversarialMaskedLMCriterion,
    AdversarialMaskedLMCriterionConfig,
)
from amt_plugin.models.amt import AMTModel
from amt_plugin.tasks.adversarial_masked_lm import (
    AdversarialMaskedLMConfig,
    AdversarialMaskedLMTask,
    block_budget,
)

VOCAB = 60
TOKENS_PER_SAMPLE = 32


def tiny_dictionary() -> Dictionary:
    """SentencePiece-like symbols: even ids start a word ("\u2581w0"), odd ones continue it."""
    d = Dictionary()
    for i in range(VOCAB):
        # frequency falls with the index
        d.add_symbol(f"\u2581w{i}" if i % 2 == 0 else f"w{i}", n=1000 - 10 * i)
    return d


def build(strategy: str = "learned", whole_words: bool = False, **criterion_overrides):
    """(task, model, criterion) for amt_tiny on a synthetic dictionary."""
    torch.manual_seed(0)
    task_cfg = AdversarialMaskedLMConfig(
        data="unused", tokens_per_sample=TOKENS_PER_SAMPLE, seed=1, masking_strategy=strategy,
        mask_whole_words=whole_words,
    )
    task = AdversarialMaskedLMTask(task_cfg, tiny_dictionary())
    args = argparse.Namespace(arch="amt_tiny", max_positions=TOKENS_PER_SAMPLE)
    ARCH_CONFIG_REGISTRY["amt_tiny"](args)
    args.dropout = args.attention_dropout = 0.0
    model = AMTModel.build_model(args, task)
    crit_cfg = AdversarialMaskedLMCriterionConfig(seed=1, **criterion_overrides)
    criterion = AdversarialMaskedLMCriterion(crit_cfg, task)
    return task, model, criterion


def stock_roberta(task, model: AMTModel) -> RobertaModel:
    """fairseq's own RoBERTa at the amt model's predictor shape (no masker, no role tags)."""
    args = argparse.Namespace(**vars(model.args))
    args.arch = "roberta"
    return RobertaModel.build_model(args, task)


def make_sample(task, B: int = 8, T: int = TOKENS_PER_SAMPLE, seed: int = 0) -> dict:
    d = task.source_dictionary
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(d.nspecial, d.nspecial + VOCAB, (B, T), generator=g)
    tokens[:, 0] = d.bos()
    tokens[:, -1] = d.eos()
    tokens[0, T // 2:] = d.pad()  # one shorter row
    tokens[0, T // 2 - 1] = d.eos()
    return {
        "id": torch.arange(B),
        "net_input": {"src_tokens": tokens, "src_lengths": tokens.ne(d.pad()).sum(1)},
        "nsentences": B,
        "ntokens": int(tokens.ne(d.pad()).sum()),
        "mask_budget": sum(block_budget(row, task.special_token_ids(), task.cfg.mask_prob)
                           for row in tokens),
    }


@pytest.fixture
def tiny():
    return build()
