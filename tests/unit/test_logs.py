"""The one reader of fairseq's logs: both formats, both prefixes, TensorBoard files."""

import pytest

from amt_plugin import logs
from amt_plugin.optimizer import adam_betas

PLAIN = "2026-12-05 21:53:40 | INFO | {kind} | {body}"
HYDRA = "[2026-12-05 21:53:40,726][{kind}][INFO] - {body}"
INNER_SIMPLE = ("epoch 001:    100 / 335 loss=11.755, masker_entropy=4.656, wps=1.10675e+06, "
                "num_updates=100, lr=0.0004")
INNER_JSON = ('{"epoch": 1, "update": 0.299, "loss": "11.755", "masker_entropy": "4.656", '
              '"wps": "1.10675e+06", "num_updates": "100", "lr": "0.0004"}')
VALID_SIMPLE = ("epoch 002 | valid on 'valid' subset | loss 8.69 | fixed_mask_loss 9.161 | "
                "ppl 412.9 | wps 6.1e+04 | num_updates 500 | best_loss 8.69")
VALID_JSON = ('{"epoch": 2, "valid_loss": "8.69", "valid_fixed_mask_loss": "9.161", '
              '"valid_ppl": "412.9", "valid_wps": "61000", "valid_num_updates": "500", '
              '"valid_best_loss": "8.69"}')


@pytest.mark.parametrize("prefix", [PLAIN, HYDRA])
@pytest.mark.parametrize("inner,valid", [(INNER_SIMPLE, VALID_SIMPLE), (INNER_JSON, VALID_JSON)])
def test_both_formats_and_prefixes_give_the_same_records(prefix, inner, valid):
    text = "\n".join([
        "some unrelated line | loss=3",
        prefix.format(kind="train_inner", body=inner),
        prefix.format(kind="valid", body=valid),
        prefix.format(kind="train_inner", body=inner.replace("100", "200")),
        prefix.format(kind="valid1",  # json prefixes each key with its subset
                      body=valid.replace("8.69", "7.5").replace("valid_", "valid1_")),
    ])
    assert [e["num_updates"] for e in logs.records(text, "train_inner")] == [100.0, 200.0]
    first = logs.records(text, "train_inner")[0]
    assert (first["loss"], first["masker_entropy"], first["wps"]) == (11.755, 4.656, 1106750.0)
    (v,) = logs.records(text, "valid")
    assert (v["loss"], v["fixed_mask_loss"], v["num_updates"], v["best_loss"]) == \
        (8.69, 9.161, 500.0, 8.69)
    assert logs.records(text, "valid1")[0]["loss"] == 7.5  # another subset, another kind
    assert logs.series(logs.records(text, "valid"), "fixed_mask_loss") == [(500, 9.161)]
    assert logs.records(text, "train") == []


def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboardX import SummaryWriter

    w = SummaryWriter(str(tmp_path / "train_inner"))
    for step in (100, 200, 300):
        w.add_scalar("masker_entropy", 5.0 - step / 100, step)
    w.close()
    got = logs.scalars(tmp_path, ("masker_entropy", "absent"))
    assert got == {"masker_entropy": [(100, 4.0), (200, 3.0), (300, 2.0)], "absent": []}


def test_adam_betas_are_read_as_literals_never_evaluated():
    assert adam_betas("(0.9, 0.98)") == (0.9, 0.98) and adam_betas([0.9, 0.999]) == (0.9, 0.999)
    for bad in ('__import__("os").getcwd()', "(0.9,)", "(0.9, 1.5)", "beta"):
        with pytest.raises(ValueError, match="--adam-betas must be two numbers"):
            adam_betas(bad)
