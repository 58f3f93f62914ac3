"""fairseq-train with faults injected: the tests' way of dying at chosen moments.

    python tests/e2e/faults.py DATA --user-dir amt_plugin ...   (fairseq-train's arguments)

What goes wrong is read from the environment variable AMT_TEST_FAULTS, a JSON object:

- "kill_in_save": N   SIGKILL during the N-th checkpoint write of this process, with half
                      of the file written (to fairseq's temporary name)
- "kill_in_copy": N   SIGKILL during the N-th checkpoint copy (checkpoint_last.pt,
                      checkpoint_best.pt), between its link and its rename
- "enospc_in_save": N the N-th checkpoint write fails half-way: "No space left on device"
- "nan_loss_at": [U]  the loss of updates U (0-based update numbers) is NaN
- "nan_masker_at": [U] the masker's logits at updates U are NaN
- "nan_weight_at": U  after update U a predictor weight holds NaN
- "trace": PATH       after every update, PATH.rank<R> gets a JSON line: the update, a digest
                      of every weight, a digest of the masks this rank drew, and whether
                      this rank's batch was empty (fairseq then trains on a dummy batch)
- "cuda_shim": true   `Tensor.cuda()` returns the tensor: fairseq's fp16 overflow branch puts
                      a zero on CUDA (trainer.py), which a GPU has and this CPU does not

Nothing of this is in the product: it patches fairseq and the plugin in this process only.
"""

import errno
import hashlib
import io
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import fairseq_cli.train  # noqa: E402,F401  (first: it sets up fairseq's log format)
import torch  # noqa: E402

import amt_plugin  # noqa: E402,F401  (as --user-dir would: fairseq sees it imported)
from amt_plugin import checkpoints, masking  # noqa: E402
from amt_plugin.criterions.adversarial_masked_lm import AdversarialMaskedLMCriterion  # noqa: E402
from amt_plugin.models.masker import Masker  # noqa: E402

FAULTS = json.loads(os.environ.get("AMT_TEST_FAULTS", "{}"))
calls = {"save": 0, "copy": 0}
state = {"update": -1, "masks": hashlib.sha256()}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def patch_saves() -> None:
    torch_save = torch.save

    def save(obj, f, *args, **kwargs):
        calls["save"] += 1
        n = calls["save"]
        if n in (FAULTS.get("kill_in_save"), FAULTS.get("enospc_in_save")):
            buffer = io.BytesIO()
            torch_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            if n == FAULTS.get("kill_in_save"):
                die()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return torch_save(obj, f, *args, **kwargs)

    torch.save = save
    atomic_copy = checkpoints.atomic_copy

    def copy(src_path, dst_path, overwrite=False):
        calls["copy"] += 1
        if calls["copy"] == FAULTS.get("kill_in_copy"):
            os.link(src_path, f"{dst_path}.tmp")
            die()
        return atomic_copy(src_path, dst_path, overwrite)

    from fairseq.file_io import PathManager

    PathManager.copy = staticmethod(copy)


def patch_nans() -> None:
    forward = AdversarialMaskedLMCriterion.forward

    def criterion_forward(self, model, sample, reduce=True):
        state["update"] = self.num_updates if model.training else -1
        loss, size, logs = forward(self, model, sample, reduce)
        if model.training and self.num_updates in FAULTS.get("nan_loss_at", []):
            loss = loss * float("nan")
        return loss, size, logs

    AdversarialMaskedLMCriterion.forward = criterion_forward
    masker_forward = Masker.forward

    def nan_masker(self, tokens, padded=None):
        logits = masker_forward(self, tokens, padded)
        if state["update"] in FAULTS.get("nan_masker_at", []):
            logits = logits * float("nan")
        return logits

    Masker.forward = nan_masker


def patch_trainer() -> None:
    from fairseq.trainer import Trainer

    train_step = Trainer.train_step

    def step(self, samples, raise_oom=False):
        state["masks"] = hashlib.sha256()
        out = train_step(self, samples, raise_oom)
        update = self.get_num_updates()
        model = self.get_model()
        if update == FAULTS.get("nan_weight_at"):
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "encoder" in n).fill_(float("nan"))
        if "trace" in FAULTS:
            weights = hashlib.sha256()
            for _, p in sorted(model.named_parameters(), key=lambda x: x[0]):
                weights.update(p.detach().float().cpu().numpy().tobytes())
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            with open(f"{FAULTS['trace']}.rank{rank}", "a") as f:
                f.write(json.dumps({"update": update, "weights": weights.hexdigest(),
                                    "masks": state["masks"].hexdigest(),
                                    "empty_batch": any(not s for s in samples)}) + "\n")
        return out

    Trainer.train_step = step
    choose = masking.choose

    def traced_choose(tokens, *args, **kwargs):
        choice = choose(tokens, *args, **kwargs)
        state["masks"].update(tokens.cpu().numpy().tobytes())
        state["masks"].update(choice.mask.cpu().numpy().tobytes())
        return choice

    masking.choose = traced_choose


def main() -> None:
    patch_saves()
    patch_nans()
    patch_trainer()
    if FAULTS.get("cuda_shim") and not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    from fairseq_cli.train import cli_main

    sys.argv = ["fairseq-train", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
