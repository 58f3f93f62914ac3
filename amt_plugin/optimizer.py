"""Optimizer `amt_adam`: Adam with one parameter group per role, stepped independently.

fairseq's trainer knows one optimizer and one learning-rate schedule. AMT needs two players
with their own learning rates, and updates where only the predictor moves. `amt_adam` is
fairseq's Adam (AdamW-style decoupled weight decay, same flags) with:

- two torch parameter groups, "predictor" and "masker", taken from each parameter's
  `param_group` tag (set by the `amt` model);
- `--masker-lr`: the masker's peak learning rate. The lr scheduler drives the predictor's
  rate; the masker's follows the same schedule scaled by masker_lr / lr;
- `step(groups=...)`: groups left out are not touched at all (parameters and Adam moments),
  because their gradients are dropped before the step and torch optimizers skip parameters
  without a gradient. fairseq's FP16Optimizer passes `groups` through (fairseq's fp16_optimizer.py);
- gradient clipping per group (`--clip-norm` applies to each role on its own, so one player's
  gradient norm never shrinks the other's step). Under `--fp16` fairseq's FP16Optimizer asks
  this optimizer only for the norm and then scales every gradient by one joint clipping
  factor; the task tells this optimizer about its wrapper (`clip_roles_under`), and the norm
  request then also scales each role by its own factor over the joint one;
- fp32 master weights for bf16 parameters (`--bf16-weights`, where the task casts the model to
  bf16): Adam steps an fp32 copy of each bf16 weight, from an fp32 copy of its gradient, and
  writes the result back rounded to bf16, so updates smaller than bf16's resolution are not
  lost. Three foreach calls per update (gradients in, weights out; fairseq's FP16Optimizer
  loops over the parameters in Python, 1,700 extra operator calls per update at amt_small).
  The master weights are saved with the optimizer state, so a resumed run continues from
  them, not from the rounded weights. Each micro-batch's bf16 gradients are added to the
  masters' fp32 ones, and under data parallelism this optimizer all-reduces those fp32 sums
  itself, once per update (as Megatron-LM does for bf16): the data-parallel wrapper is told
  not to reduce the bf16 ones (see `reduce_gradients_of`).

The gradient norm is read one update late on GPUs (unless --sync-grad-norm): fairseq's
trainer checks it for NaN/inf on the host before each step, and that read waits for the
whole backward, so the CPU could never queue the next update while the GPU works. Instead
the norm is copied to the host without waiting and read at the next update. The trainer
checks and logs the previous update's norm (the first update's is read at once, and logged
again at the second). An update with a non-finite norm is skipped on the GPU (the fused
kernel's found_inf, as torch's GradScaler does: no weight, moment or step count moves) and
is logged one update later.

NaN/inf gradients skip their update instead of killing the run (fairseq raises, writes
crash.pt and exits with a traceback): no weight, Adam moment or step count moves, the update
count and the learning-rate schedule go on (as under torch's GradScaler), and a warning names
the role whose gradients were not finite. After --skip-nonfinite-updates such updates in a
row the run stops with an error; its checkpoints hold the last finite weights. Only where this
optimizer is the trainer's own (bf16 autocast, bf16 weights, fp32): fairseq's fp16/amp
wrappers have their loss scalers, which skip overflowed updates themselves.

Host overhead matters at small shapes on GPUs, where every kernel launch is issued by the
CPU: the Adam update uses torch's fused kernel (one launch per group and dtype; torch's
foreach kernels where fused is unsupported, `--no-fused-adam` to force them), and the
gradient norm and clipping use foreach kernels instead of fairseq's per-parameter loop.

fairseq's `composite` optimizer (hydra config with groups `predictor` and `masker`) works too;
see configs/.
"""


import ast
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.distributed import LegacyDistributedDataParallel, ModuleProxyWrapper
from fairseq.optim import FairseqOptimizer, register_optimizer
from fairseq.optim.adam import FairseqAdamConfig
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel

from .errors import UsageError

logger = logging.getLogger(__name__)

ROLES = ("predictor", "masker")
MASTER_WEIGHTS = "amt_fp32_master_weights"  # in the optimizer's state dict, --bf16-weights


class GroupSteppingAdamW(torch.optim.AdamW):
    """torch AdamW whose step can leave whole named parameter groups untouched."""

    supports_groups = True

    def step(self, closure=None, groups: Optional[Iterable[str]] = None):
        if groups is not None:
            groups = set(groups)
            for group in self.param_groups:
                if group["name"] not in groups:
                    for p in group["params"]:
                        p.grad = None  # AdamW skips it: no update, no moment update
        try:
            return super().step(closure)
        finally:
            self.found_inf = None  # set by AMTAdam for one step (see _read_late)


@dataclass
class AMTAdamConfig(FairseqAdamConfig):
    masker_lr: Optional[float] = field(
        default=None,
        metadata={"help": "peak learning rate of the masker (default: the predictor's --lr); "
                  "it follows the predictor's schedule, scaled by masker_lr / lr"},
    )
    masker_weight_decay: Optional[float] = field(
        default=None, metadata={"help": "weight decay of the masker (default: --weight-decay)"}
    )
    no_fused_adam: bool = field(
        default=False,
        metadata={"help": "use torch's foreach AdamW kernels instead of the fused one"},
    )
    sync_grad_norm: bool = field(
        default=False,
        metadata={"help": "read each update's gradient norm before its step, as fairseq does "
                  "(a host-device sync per update that drains the GPU's queue). By default "
                  "on GPUs it is read one update late: the logged gnorm is the previous "
                  "update's, and NaN/inf gradients skip their step on the GPU and stop the "
                  "run one update later"},
    )
    skip_nonfinite_updates: int = field(
        default=5,
        metadata={"help": "how many updates in a row with NaN/inf gradients are skipped "
                  "(logged; no weight or optimizer state moves) before the run stops with an "
                  "error; 0 stops at the first. Not under --fp16/--amp, whose loss scalers "
                  "skip overflowed updates themselves"},
    )


@register_optimizer("amt_adam", dataclass=AMTAdamConfig)
class AMTAdam(FairseqOptimizer):
    """Adam over the predictor and masker parameter groups; see the module docstring."""

    def __init__(self, cfg: AMTAdamConfig, params) -> None:
        super().__init__(cfg)
        by_role: dict[str, list] = {role: [] for role in ROLES}
        for p in params:
            role = getattr(p, "param_group", None)
            if role not in by_role:
                raise UsageError(
                    "--optimizer amt_adam needs every parameter tagged 'predictor' or "
                    f"'masker' (found {role!r}); use it with --arch amt_* models, and with "
                    "--fp16 also pass --fp16-no-flatten-grads"
                )
            by_role[role].append(p)
        # bf16 weights are stepped through fp32 copies: (model parameter, master) pairs
        self._masters = []
        for role, role_params in by_role.items():
            for i, p in enumerate(role_params):
                if p.dtype == torch.bfloat16:
                    master = p.detach().float()
                    master.param_group = role
                    self._masters.append((p, master))
                    role_params[i] = master
        # the masters' fp32 gradients: one flat buffer (one all-reduce), viewed per master;
        # kept across updates (zero_grad leaves it: each update's first copy overwrites it)
        masters = [m for _, m in self._masters]
        self._grad_buffer = torch.zeros(sum(m.numel() for m in masters), dtype=torch.float32,
                                        device=masters[0].device if masters else None)
        self._master_grads = [view.view_as(m) for view, m in zip(
            self._grad_buffer.split([m.numel() for m in masters]), masters)]
        self._folded = [False] * len(self._masters)  # holds this update's gradient so far
        self._grads_in = False  # master gradients hold this update's (see _take_grads)
        lr = self._peak_lr
        self.masker_lr_scale = (cfg.masker_lr / lr) if cfg.masker_lr is not None else 1.0
        wd = cfg.weight_decay
        masker_wd = cfg.masker_weight_decay if cfg.masker_weight_decay is not None else wd
        groups = [
            {"name": "predictor", "params": by_role["predictor"], "lr_scale": 1.0},
            {"name": "masker", "params": by_role["masker"], "lr_scale": self.masker_lr_scale,
             "weight_decay": masker_wd},
        ]
        groups = [g for g in groups if g["params"]]
        betas = adam_betas(cfg.adam_betas)
        fused = not cfg.no_fused_adam and fused_adam_supported(
            [p for g in groups for p in g["params"]]
        )
        self._optimizer = GroupSteppingAdamW(
            groups, lr=lr, betas=tuple(betas), eps=cfg.adam_eps, weight_decay=wd,
            fused=fused or None, foreach=None if fused else True,
        )
        self.set_lr(lr)
        # the parameters this optimizer steps directly (fp32 ones), found once for zero_grad
        mastered = {id(m) for _, m in self._masters}
        self._unmastered = [p for p in self.params if id(p) not in mastered]
        self._wrapper = None  # (FP16Optimizer, its max_norm): see clip_roles_under
        # Set by the task each update: this optimizer is the trainer's own, on a GPU, fused
        # (found_inf), and --sync-grad-norm is off. See _read_late.
        self.norm_read_late = False
        self._pending_norm = None  # (host copy, its CUDA event or None) of the last norm
        self._reducer = None  # (model, process group): see reduce_gradients_of
        # Set by the task each update: this optimizer is the trainer's own (no fp16/amp
        # wrapper), so NaN/inf gradients skip their update here (see _skip_if_not_finite).
        self.skips_nonfinite = False
        self._skip_step = False
        self._nonfinite_in_a_row = 0

    @property
    def _peak_lr(self) -> float:
        lr = self.cfg.lr
        return float(lr[0] if isinstance(lr, Collection) else lr)

    @property
    def optimizer_config(self) -> dict:
        # Values that override a checkpoint's optimizer state on resume. The lr is set again
        # by the scheduler (through set_lr, which rescales the masker) right after loading.
        betas = self.cfg.adam_betas
        return {
            "lr": self._peak_lr,
            "betas": adam_betas(betas),
            "eps": self.cfg.adam_eps,
        }

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr * group["lr_scale"]

    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        if self._masters:  # by position in self.params, like torch's own state
            stepped = list(self.params)
            masters = {id(m) for _, m in self._masters}
            state[MASTER_WEIGHTS] = {i: t.detach().clone() for i, t in enumerate(stepped)
                                     if id(t) in masters}
        return state

    def load_state_dict(self, state_dict, optimizer_overrides=None) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop(MASTER_WEIGHTS, None)
        super().load_state_dict(state_dict, optimizer_overrides)
        for group in self.param_groups:  # the scale comes from this run's flags, not the file
            group["lr_scale"] = 1.0 if group["name"] == "predictor" else self.masker_lr_scale
        if saved:
            self._load_master_weights(saved)

    @torch.no_grad()
    def _load_master_weights(self, saved: dict) -> None:
        """The fp32 weights a --bf16-weights run saved: into this run's master weights, or
        into its fp32 parameters if it trains without --bf16-weights; the bf16 weights
        follow from them."""
        stepped = list(self.params)
        for i, weight in saved.items():
            i = int(i)
            if i >= len(stepped) or stepped[i].shape != weight.shape:
                raise ValueError("the checkpoint's fp32 master weights do not fit this model's "
                                 "parameters; resume with --reset-optimizer to start them "
                                 "from the checkpoint's bf16 weights")
            stepped[i].copy_(weight)
        if self._masters:
            torch._foreach_copy_([p for p, _ in self._masters], [m for _, m in self._masters])

    @property
    def has_folded_grads(self) -> bool:
        """Whether a backward of this update has already been taken into the masters' fp32
        gradients (bf16 weights; the next backward is then a further micro-batch)."""
        return any(self._folded)

    @property
    def fused(self) -> bool:
        return bool(self._optimizer.defaults.get("fused"))

    def backward(self, loss) -> None:
        loss.backward()
        if self._masters:
            self._fold_grads()  # each micro-batch's bf16 gradients summed in fp32

    @torch.no_grad()
    def _fold_grads(self) -> None:
        """The bf16 parameters' gradients into their masters' fp32 ones, added to those of
        this update's earlier micro-batches; the bf16 ones are then freed."""
        copied, added = ([], []), ([], [])
        for i, (p, master) in enumerate(self._masters):
            if p.grad is None:
                continue
            if not self._folded[i]:
                master.grad = self._master_grads[i]
                self._folded[i] = True
                into = copied
            else:
                into = added
            into[0].append(master.grad)
            into[1].append(p.grad)
            p.grad = None
        if copied[0]:
            torch._foreach_copy_(*copied)
        if added[0]:
            torch._foreach_add_(*added)

    def _take_grads(self) -> None:
        """This update's gradients in the masters, before anything reads them (the trainer
        calls multiply_grads, clip_grad_norm and step, each after all micro-batches'
        backward): what is left in the bf16 parameters is folded in, and a master without a
        gradient this update has none."""
        if not self._masters or self._grads_in:
            return
        self._grads_in = True
        self._fold_grads()
        for (_, master), folded in zip(self._masters, self._folded):
            if not folded:
                master.grad = None

    def zero_grad(self) -> None:
        for p, _ in self._masters:  # the masters keep their gradients' storage
            p.grad = None
        for p in self._unmastered:  # as fairseq does
            p.grad = None
        self._folded = [False] * len(self._masters)
        self._grads_in = False

    def reduce_gradients_of(self, model) -> None:
        """Data parallelism with bf16 weights: this optimizer all-reduces the masters' fp32
        gradients itself (all_reduce_grads, once per update, after all micro-batches have
        been summed into them), and the data-parallel wrapper of `model` (the trainer's)
        reduces nothing. fairseq's legacy_ddp reduces only when the trainer asks
        all_reduce_grads, which this optimizer answers; torch's DDP (pytorch_ddp) gets a
        communication hook that communicates nothing (torch's noop_hook), so it neither
        sums the micro-batches nor reduces the last one in bf16.

        Called by the task before each forward; the wrapper is set up on the first call.
        The reduction is not overlapped with the backward: one all-reduce of 4 bytes per
        weight per update, after the update's last micro-batch."""
        if not self._masters or (self._reducer is not None and self._reducer[0] is model):
            return
        wrapper = model.module if isinstance(model, ModuleProxyWrapper) else model
        if isinstance(wrapper, DistributedDataParallel):
            wrapper.register_comm_hook(None, noop_hook)
        elif not isinstance(wrapper, LegacyDistributedDataParallel):
            return  # one process: nothing to reduce
        self._reducer = (model, wrapper.process_group)

    @torch.no_grad()
    def all_reduce_grads(self, module) -> None:
        if self._reducer is None or module is not self._reducer[0]:
            super().all_reduce_grads(module)
            return
        self._take_grads()
        # Every rank computes gradients for the same parameters (the game's schedule is the
        # same on all ranks; torch's DDP insists on it): a master without one here has none
        # anywhere, and stays without. Its stale slice of the buffer is zeroed, not summed.
        resting = [g for g, folded in zip(self._master_grads, self._folded) if not folded]
        if resting:
            torch._foreach_zero_(resting)
        group = self._reducer[1]
        reduced = [self._grad_buffer]
        others = [p.grad for p in self._unmastered if p.grad is not None]  # fp32 parameters
        if others:
            reduced.append(torch._utils._flatten_dense_tensors(others))
        for flat in reduced:
            torch.distributed.all_reduce(flat, group=group)
            # the mean, as the wrappers reduce: the trainer multiplies by world size next
            flat.div_(torch.distributed.get_world_size(group))
        if others:
            unflat = torch._utils._unflatten_dense_tensors(reduced[1], others)
            torch._foreach_copy_(others, list(unflat))

    def step(self, closure=None, scale=1.0, groups=None) -> None:
        self._take_grads()
        if self._skip_step:  # NaN/inf gradients (see _skip_if_not_finite): nothing moves
            self._skip_step = False
            return
        super().step(closure, scale=scale, groups=groups)
        if self._masters:  # the stepped masters (a group left out has no gradients) to bf16
            moved = [(p, m) for p, m in self._masters if m.grad is not None]
            if moved:
                with torch.no_grad():
                    torch._foreach_copy_([p for p, _ in moved], [m for _, m in moved])

    @torch.no_grad()
    def multiply_grads(self, c) -> None:
        """fairseq's, without its `p.grad.data` and its grouping by device and dtype per
        parameter (230 of each per update at amt_small; host time the GPU waits for when
        the host bounds the step): one foreach call, which groups in C++."""
        self._take_grads()
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, c.to(grads[0].device) if torch.is_tensor(c) else c)

    def clip_roles_under(self, wrapper, max_norm: float) -> None:
        """This optimizer runs inside fairseq's FP16Optimizer `wrapper` (`--fp16`), which
        clips to `max_norm` (the run's --clip-norm) jointly; see clip_grad_norm. Called by
        the task before each update."""
        self._wrapper = (wrapper, float(max_norm)) if max_norm > 0 else None

    def clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
        """Clip each role's gradient to max_norm on its own (0 = only measure); return the
        joint norm. fairseq's semantics, with foreach kernels: a few launches per group.

        Inside FP16Optimizer (see clip_roles_under) the request comes with max_norm 0 and
        gradients not yet multiplied by the wrapper's pending factor f, and the wrapper then
        multiplies everything by its joint clipping factor c. Each role is scaled here by
        c_role / c, so that it ends up clipped on its own, all on the device."""
        self._take_grads()
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True).float()
            if aggregate_norm_fn is not None:
                norm = aggregate_norm_fn(norm)
            if max_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
            groups.append((group["name"], grads, norm))
        if not groups:
            return torch.tensor(0.0)
        total = torch.stack([norm for _, _, norm in groups]).norm()
        if max_norm == 0 and self._wrapper is not None:
            self._clip_each_role_within([g[1:] for g in groups], total, *self._wrapper)
        elif self.norm_read_late and self._wrapper is None:
            return self._skip_if_not_finite(self._read_late(total), {}, skipped_on_device=True)
        elif self.skips_nonfinite:
            return self._skip_if_not_finite(total, {name: n for name, _, n in groups})
        return total

    def _skip_if_not_finite(self, total: torch.Tensor, by_role: dict,
                            skipped_on_device: bool = False) -> torch.Tensor:
        """A non-finite gradient norm: this update's step is skipped (the fused kernel has
        already skipped it on the device when the norm is read late), a warning says so, and
        the trainer gets a norm of 0 so that it carries on. Stops the run after
        --skip-nonfinite-updates such updates in a row. One host read of the norm, which
        fairseq's trainer makes anyway (its own NaN check)."""
        if torch.isfinite(total).all():
            self._nonfinite_in_a_row = 0
            return total
        self._nonfinite_in_a_row += 1
        self._skip_step = not skipped_on_device
        roles = [r for r, n in by_role.items() if not torch.isfinite(n).all()]
        which = f" ({', '.join(roles)})" if roles else ""
        limit = self.cfg.skip_nonfinite_updates
        if self._nonfinite_in_a_row > limit:
            raise NonFiniteGradientsError(
                f"error: {self._nonfinite_in_a_row} update(s) in a row had NaN/inf "
                f"gradients{which}, more than --skip-nonfinite-updates {limit}: the run stops. "
                "Its checkpoints hold the last finite weights. Lower --lr or --masker-lr, "
                "raise --warmup-updates or check the data, then rerun the same command to "
                "resume from checkpoint_last.pt")
        update = "the previous update (norm read late)" if skipped_on_device else "this update"
        logger.warning(f"NaN/inf gradients{which}: {update} is skipped, no weight or "
                       f"optimizer state moves ({self._nonfinite_in_a_row} in a row; the run "
                       f"stops after {limit})")
        return torch.zeros_like(total)

    def _read_late(self, total: torch.Tensor) -> torch.Tensor:
        """The previous update's norm, on the host; this update's starts its copy there.

        The trainer reads the returned norm at once (its NaN check); reading this update's
        would wait for the GPU to finish the backward. The previous one has long arrived. A
        non-finite norm makes the fused AdamW kernel skip this step on the device."""
        self._optimizer.found_inf = (~total.isfinite()).float()
        host = total.detach().to("cpu", non_blocking=True, copy=True)
        ready = None
        if total.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        previous, self._pending_norm = self._pending_norm, (host, ready)
        host, ready = previous or self._pending_norm  # the first update: its own
        if ready is not None:
            ready.synchronize()
        return host

    @staticmethod
    @torch.no_grad()
    def _clip_each_role_within(groups, total, wrapper, max_norm: float) -> None:
        f = wrapper._multiply_factor  # what the wrapper multiplies the gradients by later
        scaled = f * total
        # the joint factor the wrapper applies next (fairseq's fp16_optimizer.py)
        if wrapper.scaler is not None:  # fp16: a loss scaler; bf16: none
            joint = torch.where(scaled > max_norm, max_norm / scaled, torch.ones_like(scaled))
        else:
            joint = (max_norm / (scaled + 1e-6)).clamp(max=1)
        for grads, norm in groups:
            own = (max_norm / (f * norm + 1e-6)).clamp(max=1)
            # an overflowed step (non-finite norm) is skipped by the wrapper: leave it be
            ratio = torch.where(scaled.isfinite(), own / joint, torch.ones_like(own))
            torch._foreach_mul_(grads, ratio.to(grads[0].device))



class NonFiniteGradientsError(SystemExit):
    """Stops the run with its message and no traceback (and writes no checkpoint)."""


def adam_betas(value) -> tuple[float, float]:
    """--adam-betas as fairseq spells it ("(0.9, 0.98)"), read as a literal, never evaluated."""
    try:
        betas = tuple(ast.literal_eval(value) if isinstance(value, str) else value)
    except (ValueError, SyntaxError, TypeError):
        betas = ()
    if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
        raise UsageError(f"--adam-betas must be two numbers in [0, 1) such as '(0.9, 0.98)', "
                         f"got {value!r}")
    return float(betas[0]), float(betas[1])


def fused_adam_supported(params: list) -> bool:
    """torch's fused AdamW: floating-point parameters on one device type that has the kernel."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = {p.device.type for p in params}
    return (
        len(devices) == 1
        and devices <= set(_get_fused_kernels_supported_devices())
        and all(p.is_floating_point() for p in params)
    )
