"""torch's DistributedDataParallel (fairseq's default --ddp-backend pytorch_ddp) with the game.

fairseq's pytorch_ddp wrapper passes GPU device ids and cannot run on a CPU, so this drives
torch DDP directly (gloo, 2 processes) the way fairseq's trainer does: the criterion calls
the masker beside the DDP forward, and a resting masker enters the loss as 0 * sum(p). With
find_unused_parameters=False, DDP raises if any parameter misses its gradient; gradients must
come out identical on both ranks.
"""

import subprocess
import sys
import textwrap

import pytest

from tests.e2e.conftest import ENV, ROOT

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    sys.path.insert(0, {root!r})
    from tests.conftest import build, make_sample

    def worker(rank, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        task, model, criterion = build(masker_warmup_updates=1, masker_update_freq=2)
        if {compiled}:  # --torch-compile: compiled layers, the masker's draw compiled whole
            model.compile_blocks()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        # fairseq's ModuleProxyWrapper forwards attributes like this
        ddp.masker, ddp.compile_mode = model.masker, getattr(model, "compile_mode", None)
        ddp.train()
        for update in range(4):  # rests at 0 (warm-up) and 2, trains at 1 and 3
            model.zero_grad()
            criterion.groups_to_step(update)
            loss, _, log = criterion(ddp, make_sample(task, seed=10 * rank + update))
            loss.backward()
            assert log["masker_trains"] == int(update in (1, 3)), (update, log)
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            gathered = [torch.empty_like(grads) for _ in range(2)]
            dist.all_gather(gathered, grads)
            assert torch.equal(gathered[0], gathered[1]), update
            masker_grad = sum(p.grad.abs().sum() for p in model.masker.parameters())
            assert (masker_grad > 0) == (update in (1, 3)), update
        assert len(criterion._compiled_fns) == (2 if {compiled} else 0)
        dist.barrier()  # no rank tears gloo down while the other still talks to it
        dist.destroy_process_group()
        if rank == 0:
            print("DDP OK", flush=True)
        # gloo's threads sometimes abort the interpreter's own exit ("terminate called
        # without an active exception", about 1 run in 12 here), after everything above
        # has passed: leave without it
        os._exit(0)

    if __name__ == "__main__":
        mp.spawn(worker, args=(int(sys.argv[1]),), nprocs=2)
""")


@pytest.mark.parametrize("compiled", [False, True])
def test_masker_beside_the_ddp_forward_gets_synchronised_gradients(tmp_path, compiled):
    from tests.e2e.test_train import free_port

    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT.format(root=str(ROOT), compiled=compiled))
    proc = subprocess.run([sys.executable, str(script), str(free_port())],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == 0 and "DDP OK" in proc.stdout, proc.stdout[-4000:]


BF16_SCRIPT = textwrap.dedent("""
    import contextlib, os, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from fairseq.distributed import LegacyDistributedDataParallel, ModuleProxyWrapper
    sys.path.insert(0, {root!r})
    from amt_plugin.optimizer import AMTAdam, AMTAdamConfig

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
            self.weight.param_group = "predictor"
            self.fp32 = torch.nn.Parameter(torch.ones(2))  # stepped without a master
            self.fp32.param_group = "predictor"

        def forward(self, c):
            return self.weight.sum() * c + self.fp32.sum() * c

    # each rank's micro-batches. Their mean over ranks, 1 + 3 * 2^-9, is not a bf16 number
    # (bf16's step at 1 is 2^-7). In bf16, rank 0's first three sum to 1, and the mean
    # rounds to 1 again. The last micro-batch's mean, 1/2 + 2^-10, rounds to 1/2 in bf16:
    # a wrapper that reduced that one (in DDP's backward) would make it 1 + 5 * 2^-10.
    TERMS = [(1.0, 2.0**-9, 2.0**-9, 1.0), (2.0**-9, 2.0**-9, 2.0**-9, 2.0**-9)]

    def worker(rank, port, backend):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        module = Scale()
        if backend.startswith("pytorch_ddp"):  # fairseq's --gradient-as-bucket-view too
            views = backend.endswith("bucket_view")
            wrapper = torch.nn.parallel.DistributedDataParallel(
                module, gradient_as_bucket_view=views)
        else:
            wrapper = LegacyDistributedDataParallel(module, dist.group.WORLD)
        model = ModuleProxyWrapper(wrapper)  # what fairseq's trainer hands the task
        optimizer = AMTAdam(AMTAdamConfig(lr=[1e-3]), list(module.parameters()))
        master = next(p for p in optimizer.params if p.shape == (4,))
        for update in range(2):
            optimizer.zero_grad()
            terms = TERMS[rank]
            for i, c in enumerate(terms):  # fairseq's trainer: no_sync but for the last
                last = i == len(terms) - 1
                optimizer.reduce_gradients_of(model)
                with contextlib.nullcontext() if last else model.no_sync():
                    optimizer.backward(model(c))
                assert module.weight.grad is None  # folded into the master's fp32 one
            optimizer.all_reduce_grads(model)
            assert master.grad.dtype == torch.float32
            assert torch.equal(master.grad, torch.full((4,), 1 + 3 * 2.0**-9)), master.grad
            assert torch.equal(module.fp32.grad, torch.full((2,), 1 + 3 * 2.0**-9))
            optimizer.step()
        both = [torch.empty(4) for _ in range(2)]
        dist.all_gather(both, master.detach())
        assert torch.equal(both[0], both[1])
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            print("BF16 OK", flush=True)
        os._exit(0)  # see SCRIPT

    if __name__ == "__main__":
        mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
""")


@pytest.mark.parametrize("backend", ["pytorch_ddp", "pytorch_ddp_bucket_view", "legacy_ddp"])
def test_bf16_weights_all_reduce_the_fp32_sum_of_all_micro_batches(tmp_path, backend):
    # --bf16-weights under data parallelism: amt_adam sums each rank's micro-batches in fp32
    # and all-reduces that sum in fp32; the wrapper (torch's DDP, or fairseq's legacy_ddp)
    # reduces nothing in bf16.
    from tests.e2e.test_train import free_port

    script = tmp_path / "bf16.py"
    script.write_text(BF16_SCRIPT.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(script), str(free_port()), backend],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == 0 and "BF16 OK" in proc.stdout, proc.stdout[-4000:]
