"""One training step and one validation step of every strategy on every device torch sees.

On a CPU-only machine this is the CPU; on a GPU machine (benchmarks/gpu.sh runs tests/unit
there) the same step also runs on CUDA: generators, buffers, the fused optimizer and bf16
autocast all have to agree on the device.
"""

import pytest
import torch

from amt_plugin.optimizer import AMTAdam, AMTAdamConfig
from tests.conftest import build, make_sample

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def to_device(sample: dict, device: str) -> dict:
    net_input = {k: v.to(device) for k, v in sample["net_input"].items()}
    return {**sample, "id": sample["id"].to(device), "net_input": net_input}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["learned", "random", "span", "frequency"])
@pytest.mark.parametrize("whole_words", [False, True])
def test_train_and_validation_step_on_device(device, strategy, whole_words):
    task, model, criterion = build(strategy, whole_words=whole_words, masker_warmup_updates=0)
    model, criterion = model.to(device), criterion.to(device)
    optimizer = AMTAdam(AMTAdamConfig(lr=[1e-3]), list(model.parameters()))
    assert optimizer.fused or device != "cuda"  # one kernel per group on GPUs
    sample = to_device(make_sample(task), device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    task.cfg.bf16_autocast = True
    loss, sample_size, log = task.train_step(sample, model, criterion, optimizer, update_num=0)
    assert torch.isfinite(loss) and sample_size > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.device.type == device and g.dtype == torch.float32 for g in grads)
    optimizer.clip_grad_norm(1.0)
    task.optimizer_step(optimizer, model, update_num=0)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("encoder.") for n in moved)
    assert any(n.startswith("masker.") for n in moved) == (strategy == "learned")

    _, _, valid_log = task.valid_step(sample, model, criterion)
    assert valid_log["fixed_n"] > 0
    assert torch.isfinite(torch.as_tensor(valid_log["fixed_nll"])).all()
    criterion.reduce_metrics([log, valid_log])  # the logged sums read back from the device
