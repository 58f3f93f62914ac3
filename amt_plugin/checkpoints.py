"""Checkpoints that survive a kill, applied to fairseq when the plugin is imported.

fairseq writes the first file of a save atomically (to `.tmp`, then a rename) but makes
`checkpoint_last.pt` and `checkpoint_best.pt` as plain copies of it: a kill during the copy
leaves a truncated file (seconds at RoBERTa-base size), and the next start dies in a pickle
traceback. And a finished run that is started again trains one more update and overwrites
`checkpoint_last.pt`, so a scheduler that restarts it changes the model.

1. `atomic_copy` replaces fairseq's `PathManager.copy`: a hard link under a temporary name
   (no bytes copied; a copy where the filesystem has no links), then an atomic rename. Every
   checkpoint file is complete or absent.
2. `load_checkpoint` first checks that `checkpoint_last.pt` is a complete archive (every
   member's CRC). If it is not, the run resumes from the newest intact checkpoint in the save
   directory and says so; with none, it stops with an error naming the file, which it leaves
   as it is. If it is missing while other checkpoints are there (the first save of a run was
   killed before its copy), the run resumes from the newest of those, not from scratch.
3. A run whose update count has already reached --max-update stops after loading, before
   training, and writes nothing.
4. `atomic_save` replaces fairseq's `torch_persistent_save`: the file is written under a
   temporary name, flushed to disk and renamed, as fairseq does, but a write that fails (the
   disk full, a quota) removes the partial file and stops the run with an error that names
   the file, the reason and the intact checkpoints, instead of retrying for 5 s and dying in
   a traceback. A state whose weights are not finite is never written: the run stops.
   Temporary files a killed save left behind are removed when the next run starts.
5. A checkpoint that cannot be read (cut short, corrupted, not a checkpoint) or does not fit
   the model it is loaded into (another dictionary, another architecture) stops the command
   with an error that says which and what to pass instead, wherever fairseq loads one
   (`--restore-file` and resuming, fairseq-validate, the project's scripts), instead of a
   pickle or size-mismatch traceback. Nothing is written or changed.
6. A run resumed from a checkpoint written at the end of an epoch takes that epoch's
   learning-rate step, which fairseq takes after the save and so loses on resume (the
   scheduler's best validation loss; reduce_lr_on_plateau's patience).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    """dst_path becomes src_path's content in one rename; never a partial file."""
    if os.path.exists(dst_path) and not overwrite:
        return False
    tmp = f"{dst_path}.tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    try:
        os.link(src_path, tmp)  # the same inode: later saves replace src by a rename
    except OSError:
        shutil.copyfile(src_path, tmp)
    os.replace(tmp, dst_path)
    return True


def damage(path: Path) -> str | None:
    """Why a torch checkpoint file is unreadable (truncated, corrupted), or None if intact."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{type(e).__name__}: {e}"
    return None if bad is None else f"member {bad} fails its CRC check"


def newest_intact(save_dir: Path, exclude: Path) -> Path | None:
    found = [p for p in save_dir.glob("checkpoint*.pt") if p != exclude and p.is_file()]
    # newest first; on a tie (checkpoint_best.pt is a link to one of the others), the
    # interval or epoch checkpoint, whose name says where it is
    order = sorted(found, key=lambda p: (p.stat().st_mtime_ns, "best" not in p.stem),
                   reverse=True)
    for p in order:
        if damage(p) is None:
            return p
    return None


class DamagedCheckpointError(SystemExit):
    """Stops the run with its message, without a traceback."""


class CheckpointWriteError(SystemExit):
    """Stops the run with its message, without a traceback."""


class UnusableCheckpointError(SystemExit):
    """Stops the command with its message, without a traceback."""


def guarded_load_checkpoint_to_cpu(original):
    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        try:
            return original(path, arg_overrides, load_on_all_ranks)
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
                pickle.UnpicklingError) as e:
            file = Path(path)
            if not file.is_file():
                raise UnusableCheckpointError(
                    f"error: checkpoint {path} does not exist: check the path") from None
            with open(file, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"  # torch's format since 1.6
            why = damage(file) if zipped else None
            if why is None and zipped:
                raise  # complete, and refused for what it holds: the loader's own words
            why = why or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise UnusableCheckpointError(
                f"error: {path} is not a readable checkpoint ({why}). A copy or save that was "
                "cut short leaves such a file: use an intact checkpoint (the interval "
                "checkpoints checkpoint_E_U.pt beside it, or checkpoint_best.pt)") from None

    load_checkpoint_to_cpu.__wrapped__ = original
    return load_checkpoint_to_cpu


def read(path: Path) -> dict:
    """A checkpoint file's contents (weights-only unpickling), or an error saying why not."""
    import torch
    from fairseq import checkpoint_utils

    if not Path(path).is_file():
        raise UnusableCheckpointError(f"error: checkpoint {path} does not exist: check the path")
    load = checkpoint_utils.load_checkpoint_to_cpu  # (the guarded one: its errors)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        load(str(path))  # raises the clear error
        raise


def mismatch(model_state: dict, loaded: dict) -> str:
    """What keeps a checkpoint's weights out of a model, and what to do about it."""
    shapes = [(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in loaded.items()
              if k in model_state and torch_shape(v) != torch_shape(model_state[k])]
    missing = [k for k in model_state if k not in loaded]
    unexpected = [k for k in loaded if k not in model_state]
    parts = []
    if shapes:
        k, have, want = shapes[0]
        parts.append(f"{len(shapes)} tensor(s) differ in shape (first: {k}: {have} in the "
                     f"checkpoint, {want} in the model)")
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the model (first: {unexpected[0]})")
    embed = [(have, want) for k, have, want in shapes
             if k.endswith("embed_tokens.weight") and have[1:] == want[1:]]
    if embed:
        fix = (f"its dictionary has {embed[0][0][0]} entries and this command's has "
               f"{embed[0][1][0]}: use the binarized data (dict.txt) the checkpoint was "
               "trained on")
    else:
        fix = ("it was trained as another architecture or model: pass the --arch (or "
               "config) it was trained with, or start without it")
    return (f"error: the checkpoint does not fit the model: {'; '.join(parts)}. Probably {fix}. "
            "Nothing was loaded or changed")


def torch_shape(t) -> tuple:
    return tuple(t.shape) if hasattr(t, "shape") else ()


def guarded_load_state_dict(original):
    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        try:
            return original(self, state_dict, strict=strict, model_cfg=model_cfg, args=args)
        except RuntimeError as e:
            if not any(s in str(e) for s in ("size mismatch", "Missing key", "Unexpected key")):
                raise
            raise UnusableCheckpointError(mismatch(self.state_dict(), state_dict)) from None

    load_state_dict.__wrapped__ = original
    return load_state_dict


def atomic_save(obj, filename: str, async_write: bool = False) -> None:
    """fairseq's torch_persistent_save for local files: complete or absent, and a clear
    error when the disk cannot take it (see the module docstring)."""
    import torch

    path = Path(filename)
    bad = nonfinite_weights(obj.get("model", {}) if isinstance(obj, dict) else {})
    if bad:
        raise CheckpointWriteError(
            f"error: not writing {path}: {len(bad)} weight tensor(s) are not finite "
            f"(first: {bad[0]}). The checkpoints written before are left as they are. Lower "
            "--lr or --masker-lr, or raise --warmup-updates, and rerun the same command to "
            "resume from checkpoint_last.pt")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        intact = sorted(p.name for p in path.parent.glob("checkpoint*.pt") if p != path)
        raise CheckpointWriteError(
            f"error: could not write {path}: {e.strerror or e}. The partial file was removed; "
            f"the checkpoints written before are intact ({', '.join(intact) or 'none yet'}). "
            f"Free space in {path.parent} (or pass another --save-dir) and rerun the same "
            "command to resume") from None
    os.replace(tmp, path)


def nonfinite_weights(state: dict) -> list[str]:
    """Names of floating-point tensors in a model state dict that hold NaN or inf."""
    import torch

    return [k for k, t in state.items() if torch.is_tensor(t) and t.is_floating_point()
            and not torch.isfinite(t).all()]


def remove_stale_temporaries(save_dir: Path) -> None:
    """`.tmp` files that a save killed midway left behind (never loaded; as large as a
    checkpoint each)."""
    for tmp in save_dir.glob("checkpoint*.pt.tmp"):
        logger.info(f"removing {tmp}, left by a save that was interrupted")
        tmp.unlink(missing_ok=True)


def guarded_load_checkpoint(original):
    def load_checkpoint(cfg, trainer, **passthrough_args):
        last = Path(cfg.save_dir) / f"checkpoint_last{trainer.checkpoint_suffix}.pt"
        if trainer.is_data_parallel_master and last.parent.is_dir():
            remove_stale_temporaries(last.parent)
        if cfg.restore_file != "checkpoint_last.pt" and not Path(cfg.restore_file).is_file():
            # fairseq would start from scratch without a word (and overwrite checkpoint_last)
            raise UnusableCheckpointError(
                f"error: --restore-file {cfg.restore_file} does not exist: check the path")
        if cfg.restore_file == "checkpoint_last.pt" and not last.exists():
            # killed before checkpoint_last.pt was first made: the checkpoint it was to copy
            fallback = newest_intact(last.parent, last) if last.parent.is_dir() else None
            if fallback is not None:
                logger.warning(f"{last} is missing but {fallback} is there (a run was stopped "
                               "while saving): resuming from it")
                cfg = _with(cfg, restore_file=str(fallback))
        elif cfg.restore_file == "checkpoint_last.pt" and last.is_file():
            why = damage(last)
            if why is not None:
                fallback = newest_intact(Path(cfg.save_dir), last)
                if fallback is None:
                    raise DamagedCheckpointError(
                        f"error: {last} is damaged ({why}), and {cfg.save_dir} holds no intact "
                        "checkpoint to resume from. It was left as it is: move it away to "
                        "start this run afresh, or pass --restore-file with a good copy")
                logger.warning(f"{last} is damaged ({why}); resuming from {fallback}, the "
                               "newest intact checkpoint (the damaged file is left as it is)")
                cfg = _with(cfg, restore_file=str(fallback))
        extra_state, epoch_itr = original(cfg, trainer, **passthrough_args)
        position = (extra_state or {}).get("train_iterator") or {}
        if (position.get("iterations_in_epoch") == 0 and position.get("epoch", 1) > 1
                and not cfg.reset_lr_scheduler and not cfg.reset_dataloader):
            # saved at the end of an epoch, which fairseq does before that epoch's lr step
            # (fairseq_cli/train.py): the step a run that was not stopped takes next, then
            # again the new epoch's, which fairseq's load already took (its second call
            # leaves the schedule where an uninterrupted run's begins that epoch)
            trainer.lr_step(position["epoch"] - 1, extra_state.get("val_loss"))
            trainer.lr_step(position["epoch"])
        max_update = trainer.cfg.optimization.max_update or 0
        if max_update and trainer.get_num_updates() >= max_update:
            logger.info(f"this run has finished: {trainer.get_num_updates()} updates of "
                        f"--max-update {max_update}; nothing to train, nothing written")
            raise SystemExit(0)
        return extra_state, epoch_itr

    load_checkpoint.__wrapped__ = original
    return load_checkpoint


def _with(cfg, **changes):
    """A copy of a checkpoint config (omegaconf or dataclass) with some fields changed."""
    from omegaconf import DictConfig, OmegaConf, open_dict

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(OmegaConf.to_container(cfg))
        with open_dict(cfg):
            for k, v in changes.items():
                cfg[k] = v
        return cfg
    import copy

    cfg = copy.copy(cfg)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def apply() -> None:
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager
    from fairseq.models import BaseFairseqModel

    if not hasattr(checkpoint_utils.load_checkpoint_to_cpu, "__wrapped__"):
        checkpoint_utils.load_checkpoint_to_cpu = guarded_load_checkpoint_to_cpu(
            checkpoint_utils.load_checkpoint_to_cpu)
    if not hasattr(BaseFairseqModel.load_state_dict, "__wrapped__"):
        BaseFairseqModel.load_state_dict = guarded_load_state_dict(
            BaseFairseqModel.load_state_dict)

    PathManager.copy = staticmethod(atomic_copy)
    if not hasattr(checkpoint_utils.torch_persistent_save, "__wrapped__"):
        original_save = checkpoint_utils.torch_persistent_save

        def torch_persistent_save(obj, filename, async_write: bool = False):
            if isinstance(filename, str) and not async_write and os.path.isdir(
                    os.path.dirname(os.path.abspath(filename))):
                return atomic_save(obj, filename)
            return original_save(obj, filename, async_write)  # other storage backends

        torch_persistent_save.__wrapped__ = original_save
        checkpoint_utils.torch_persistent_save = torch_persistent_save
    if not hasattr(checkpoint_utils.load_checkpoint, "__wrapped__"):
        checkpoint_utils.load_checkpoint = guarded_load_checkpoint(
            checkpoint_utils.load_checkpoint)
