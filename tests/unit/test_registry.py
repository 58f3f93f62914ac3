"""Registered names resolve to the plugin's classes; the predictor is a stock RoBERTa."""

import argparse
from unittest import mock

import torch
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY, MODEL_REGISTRY
from fairseq.optim import OPTIMIZER_REGISTRY
from fairseq.tasks import TASK_REGISTRY

from amt_plugin.criterions.adversarial_masked_lm import AdversarialMaskedLMCriterion
from amt_plugin.models.amt import AMTModel
from amt_plugin.optimizer import AMTAdam
from amt_plugin.tasks.adversarial_masked_lm import AdversarialMaskedLMTask
from tests.conftest import TOKENS_PER_SAMPLE, build, make_sample, stock_roberta


def test_names_resolve_to_our_classes():
    assert TASK_REGISTRY["adversarial_masked_lm"] is AdversarialMaskedLMTask
    assert CRITERION_REGISTRY["adversarial_masked_lm"] is AdversarialMaskedLMCriterion
    assert MODEL_REGISTRY["amt"] is AMTModel
    assert OPTIMIZER_REGISTRY["amt_adam"] is AMTAdam
    for arch in ("amt_tiny", "amt_small", "amt_base", "amt_large"):
        assert ARCH_MODEL_REGISTRY[arch] is AMTModel


def test_architecture_shapes():
    expected = {  # predictor (layers, width, heads, ffn), masker (layers, width, heads)
        "amt_tiny": ((2, 128, 2, 512), (2, 32, 1)),
        "amt_small": ((12, 256, 4, 1024), (2, 64, 1)),
        "amt_base": ((12, 768, 12, 3072), (2, 192, 3)),
        "amt_large": ((24, 1024, 16, 4096), (2, 256, 4)),
    }
    for arch, (pred, mask) in expected.items():
        a = argparse.Namespace()
        ARCH_CONFIG_REGISTRY[arch](a)
        assert (a.encoder_layers, a.encoder_embed_dim, a.encoder_attention_heads,
                a.encoder_ffn_embed_dim) == pred, arch
        assert (a.masker_layers, a.masker_embed_dim, a.masker_attention_heads) == mask, arch


def test_dropping_masker_keys_leaves_a_stock_roberta_state_dict():
    task, model, _ = build()
    predictor = model.predictor_state_dict()
    roberta = stock_roberta(task, model)
    reference = roberta.state_dict()
    assert predictor.keys() == reference.keys()
    assert all(predictor[k].shape == reference[k].shape for k in reference)
    roberta.load_state_dict(predictor, strict=True)
    model.eval()
    roberta.eval()
    tokens = make_sample(task)["net_input"]["src_tokens"]
    assert torch.allclose(model(tokens)[0], roberta(tokens)[0], atol=1e-6)


def test_every_parameter_is_tagged_with_its_role():
    _, model, _ = build()
    for name, p in model.named_parameters():
        assert p.param_group == ("masker" if name.startswith("masker.") else "predictor"), name


def test_each_data_parallel_rank_draws_its_own_masks():
    task, model, criterion = build(masker_warmup_updates=0)
    model.train()
    sample = make_sample(task)
    masks = []
    for rank in (0, 1):
        criterion.set_num_updates(7)
        criterion._calls_this_update = 0
        with mock.patch("torch.distributed.is_initialized", return_value=True), \
             mock.patch("torch.distributed.get_rank", return_value=rank):
            g = criterion._generator(torch.device("cpu"), sample, training=True)
        masks.append(torch.rand(TOKENS_PER_SAMPLE, generator=g))
    assert not torch.equal(masks[0], masks[1])


def test_attention_in_both_networks_goes_through_sdpa():
    task, model, _ = build()
    model.eval()
    tokens = make_sample(task)["net_input"]["src_tokens"]
    with torch.profiler.profile() as prof:
        model(tokens)
        model.masker(tokens)
    calls = sum(e.name == "aten::scaled_dot_product_attention" for e in prof.events())
    assert calls == len(model.encoder.sentence_encoder.layers) + len(model.masker.layers)
