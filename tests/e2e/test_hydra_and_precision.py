"""fairseq-hydra-train with the shipped config; fairseq's composite optimizer; fp16 paths.

The fp16 tests run fairseq's FP16Optimizer / AMPOptimizer on the CPU: slow arithmetic, but the
same optimizer wrappers, loss scaling and group-selective stepping as on a GPU.
"""

import argparse
import math
import re
import sys

import pytest
import torch

from amt_plugin.optimizer import MASTER_WEIGHTS
from tests.e2e.conftest import BIN, PLUGIN, ROOT, json_logs, run, train, train_args

pytestmark = pytest.mark.slow


def has_setting(log: str, key: str, printed: str) -> bool:
    """Whether fairseq's start-up print of its config has key: value (as it prints there:
    True, 32, or a choice unquoted)."""
    return f"'{key}': {printed}," in log


def masker_and_predictor_steps(opt_state: dict) -> dict[str, set[int]]:
    """AdamW step counts per group of an amt_adam state dict."""
    return {g["name"]: {int(opt_state["state"][i]["step"]) for i in g["params"]}
            for g in opt_state["param_groups"]}


def test_hydra_train_with_the_shipped_tiny_config(zipf_data, tmp_path):
    proc = run([str(BIN / "fairseq-hydra-train"), "--config-dir", str(ROOT / "configs"),
                "--config-name", "amt_tiny", f"task.data={zipf_data}",
                f"common.user_dir={PLUGIN}", "optimization.max_update=12",
                "criterion.masker_warmup_updates=4", "task.tokens_per_sample=64",
                "model.max_positions=64", "common.log_format=json", "common.log_interval=4",
                "common.cpu=true",
                f"checkpoint.save_dir={tmp_path / 'ck'}", f"hydra.run.dir={tmp_path}"])
    inner = json_logs(proc.stdout, "train_inner")
    assert inner and all(math.isfinite(float(x["loss"])) for x in inner)
    state = torch.load(tmp_path / "ck" / "checkpoint_last.pt", weights_only=True)
    assert masker_and_predictor_steps(state["last_optimizer_state"]) == {
        "predictor": {12}, "masker": {8}}


# the overrides amt_small.yaml's comment gives for CUDA graphs
CUDA_GRAPHS = ["task.torch_compile=true", "task.torch_compile_mode=reduce-overhead",
               "task.pad_to_multiple=32"]


@pytest.mark.parametrize("config,extra", [("amt_small", []), ("amt_small", CUDA_GRAPHS),
                                          ("amt_base", [])])
def test_shipped_gpu_configs_train_in_bf16(config, extra, zipf_data, tmp_path):
    # the GPU configs at their real shapes, two updates of 2 x 64 tokens on the CPU; with
    # CUDA graphs as amt_small's comment says (on a CPU the mode compiles without graphs)
    proc = run([str(BIN / "fairseq-hydra-train"), "--config-dir", str(ROOT / "configs"),
                "--config-name", config, f"task.data={zipf_data}", *extra,
                f"common.user_dir={PLUGIN}", "optimization.max_update=2",
                "optimization.update_freq=[1]", "dataset.batch_size=2",
                "criterion.masker_warmup_updates=1", "task.tokens_per_sample=64",
                "model.max_positions=64", "common.log_format=json", "common.log_interval=1",
                "common.cpu=true", "checkpoint.no_save=true",
                f"hydra.run.dir={tmp_path}"])
    assert has_setting(proc.stdout, "bf16_weights", "True")
    assert has_setting(proc.stdout, "torch_compile", str(bool(extra)))
    inner = json_logs(proc.stdout, "train_inner")
    assert len(inner) == 2 and all(math.isfinite(float(x["loss"])) for x in inner)


def test_run_sh_trains_a_gpu_config_eager_and_in_fp32_on_a_cpu(zipf_data, tmp_path):
    # amt_small with CUDA graphs switched on, as its comment says, under what run.sh --cpu
    # passes: no bf16 emulation, no compile time
    sys.path.insert(0, str(ROOT / "scripts"))
    import pipeline

    config = (ROOT / "configs" / "amt_small.yaml").read_text()
    for override in CUDA_GRAPHS:
        key, value = override.removeprefix("task.").split("=")
        config = re.sub(rf"(?m)^  {key}: .*$", f"  {key}: {value}", config)
    assert "  torch_compile: true\n" in config
    (tmp_path / "graphs.yaml").write_text(config)
    cpu = pipeline.device_overrides(argparse.Namespace(cpu=True, gpus=None))
    proc = run([str(BIN / "fairseq-hydra-train"), "--config-dir", str(tmp_path),
                "--config-name", "graphs", f"task.data={zipf_data}",
                f"common.user_dir={PLUGIN}", *cpu, "optimization.max_update=2",
                "dataset.batch_size=2", "criterion.masker_warmup_updates=1",
                "task.tokens_per_sample=64", "model.max_positions=64",
                "common.log_format=json", "common.log_interval=1", "checkpoint.no_save=true",
                f"hydra.run.dir={tmp_path}"])
    for key, value in (("bf16_weights", "False"), ("torch_compile", "False"),
                       ("torch_compile_mode", "default"), ("pad_to_multiple", "1")):
        assert has_setting(proc.stdout, key, value)
    inner = json_logs(proc.stdout, "train_inner")
    assert len(inner) == 2 and all(math.isfinite(float(x["loss"])) for x in inner)


COMPOSITE = """
optimizer:
  _name: composite
  groups:
    predictor:
      lr_float: 1e-3
      optimizer: {_name: adam, adam_betas: [0.9, 0.98]}
      lr_scheduler: {_name: fixed}
    masker:
      lr_float: 3e-3
      optimizer: {_name: adam, adam_betas: [0.9, 0.98]}
      lr_scheduler: {_name: fixed}
lr_scheduler:
  _name: pass_through
"""


def test_fairseqs_composite_optimizer_steps_the_groups_the_criterion_asks_for(
        zipf_data, tmp_path):
    config = (ROOT / "configs" / "amt_tiny.yaml").read_text()
    head = config[: config.index("optimizer:")]
    tail = config[config.index("optimization:"):]
    (tmp_path / "composite.yaml").write_text(head + COMPOSITE + "\n" + tail)
    run([str(BIN / "fairseq-hydra-train"), "--config-dir", str(tmp_path),
         "--config-name", "composite", f"task.data={zipf_data}", f"common.user_dir={PLUGIN}",
         "optimization.max_update=10", "criterion.masker_warmup_updates=4",
         "criterion.masker_update_freq=3", "task.tokens_per_sample=64",
         "model.max_positions=64", "common.cpu=true", f"checkpoint.save_dir={tmp_path / 'ck'}",
         f"hydra.run.dir={tmp_path}"])
    state = torch.load(tmp_path / "ck" / "checkpoint_last.pt", weights_only=True)
    opt = state["last_optimizer_state"]  # {group: fairseq Adam state}
    steps = {group: {int(s["step"]) for s in opt[group]["state"].values()} for group in opt}
    # predictor every update; masker at update_num 4 and 7
    assert steps == {"predictor": {10}, "masker": {2}}
    assert [g["lr"] for g in opt["masker"]["param_groups"]] == [3e-3]


@pytest.mark.parametrize("precision", [["--fp16", "--fp16-no-flatten-grads"], ["--amp"],
                                       ["--bf16-weights"]])
def test_half_precision_wrappers_keep_the_resting_masker_still(zipf_data, tmp_path, precision):
    ck = tmp_path / "ck"
    proc = train(zipf_data, ck, "--max-update", "10", "--masker-warmup-updates", "4",
                 "--masker-update-freq", "3", "--save-interval-updates", "4",
                 "--keep-interval-updates", "5", *precision)
    inner = json_logs(proc.stdout, "train_inner")
    assert all(math.isfinite(float(x["loss"])) for x in inner)
    at_4 = torch.load(ck / "checkpoint_1_4.pt", weights_only=True)
    at_8 = torch.load(ck / "checkpoint_1_8.pt", weights_only=True)
    # masker trained at update_num 4 and 7 only: it moved between the two checkpoints, and
    # its step count is 2 at the end while the predictor's is 10
    masker = [k for k in at_8["model"] if k.startswith("masker.")]
    assert any(not torch.equal(at_4["model"][k], at_8["model"][k]) for k in masker)
    last = torch.load(ck / "checkpoint_last.pt", weights_only=True)["last_optimizer_state"]
    assert masker_and_predictor_steps(last) == {"predictor": {10}, "masker": {2}}


def test_bf16_autocast_trains_and_refuses_to_stack_with_fp16(zipf_data, tmp_path):
    proc = train(zipf_data, tmp_path / "ck", "--max-update", "4", "--masker-warmup-updates",
                 "1", "--bf16-autocast", "--log-interval", "2", "--disable-validation")
    inner = json_logs(proc.stdout, "train_inner")
    assert inner and all(math.isfinite(float(x["loss"])) for x in inner)
    with pytest.raises(AssertionError, match="--bf16-autocast replaces --fp16"):
        train(zipf_data, tmp_path / "ck2", "--max-update", "2", "--bf16-autocast", "--fp16",
              "--fp16-no-flatten-grads")


def test_bf16_weights_train_a_bf16_model_and_resume_from_its_fp32_master_weights(zipf_data,
                                                                                   tmp_path):
    flags = ["--masker-warmup-updates", "1", "--bf16-weights", "--log-interval", "2",
             "--disable-validation"]
    proc = train(zipf_data, tmp_path / "ck", "--max-update", "4", *flags)
    inner = json_logs(proc.stdout, "train_inner")
    assert inner and all(math.isfinite(float(x["loss"])) for x in inner)
    state = torch.load(tmp_path / "ck" / "checkpoint_last.pt", weights_only=True)
    weights = [v for k, v in state["model"].items()
               if v.is_floating_point() and k != "masker._extra_state"]  # not a weight
    # the model trained in bf16: fairseq saves its weights as fp32, each one a bf16 value
    assert weights and all(torch.equal(v, v.bfloat16().float()) for v in weights)
    opt = state["last_optimizer_state"]
    moments = [s["exp_avg"] for s in opt["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert "loss_scale" not in opt  # bf16: no loss scaling
    # one fp32 master per weight, which the model holds rounded to bf16; the updates
    # smaller than bf16's resolution are kept in the masters
    masters = list(opt[MASTER_WEIGHTS].values())
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert all(any(w.shape == m.shape and torch.equal(w, m.bfloat16().float())
                   for w in weights) for m in masters)
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters)

    # resumed to 6 updates, the run continues from the masters: it ends where an
    # uninterrupted run does, to the bit
    train(zipf_data, tmp_path / "ck", "--max-update", "6", *flags)
    train(zipf_data, tmp_path / "straight", "--max-update", "6", *flags)
    resumed, straight = (torch.load(tmp_path / d / "checkpoint_last.pt", weights_only=True)
                         ["last_optimizer_state"][MASTER_WEIGHTS] for d in ("ck", "straight"))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[i], straight[i]) for i in resumed)

    # evaluation loads it like any other checkpoint
    valid = run([str(BIN / "fairseq-validate"), str(zipf_data), "--user-dir", PLUGIN,
                 "--path", str(tmp_path / "ck" / "checkpoint_last.pt"), "--cpu",
                 "--task", "adversarial_masked_lm", "--batch-size", "16",
                 "--log-format", "json"])
    fixed = float(json_logs(valid.stdout, "valid")[-1]["fixed_mask_loss"])
    assert math.isfinite(fixed)
    with pytest.raises(AssertionError, match="--bf16-weights replaces --bf16-autocast"):
        train(zipf_data, tmp_path / "ck2", "--max-update", "2", "--bf16-weights",
              "--bf16-autocast")
    args = train_args(zipf_data, tmp_path / "ck3", "--max-update", "2", "--bf16-weights",
                      "--optimizer", "adam")
    at = args.index("--masker-lr")  # an amt_adam flag
    with pytest.raises(AssertionError, match="--bf16-weights needs --optimizer amt_adam"):
        run(args[:at] + args[at + 2:])
    # amt_adam all-reduces the fp32 gradients itself: wrappers that reduce their own way,
    # or average the optimizer's parameters (BMUF), are refused
    for flags, error in ((["--ddp-comm-hook", "fp16"], "leave out --ddp-comm-hook fp16"),
                         (["--ddp-backend", "fully_sharded"], "works with --ddp-backend"),
                         (["--use-bmuf"], "cannot be used with --use-bmuf")):
        with pytest.raises(AssertionError, match=error):
            train(zipf_data, tmp_path / "ck4", "--max-update", "2", "--bf16-weights", *flags)
