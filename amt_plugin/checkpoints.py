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
   as it is.
3. A run whose update count has already reached --max-update stops after loading, before
   training, and writes nothing.
"""

from __future__ import annotations

import logging
import os
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


class DamagedCheckpointError(RuntimeError):
    pass


def guarded_load_checkpoint(original):
    def load_checkpoint(cfg, trainer, **passthrough_args):
        last = Path(cfg.save_dir) / f"checkpoint_last{trainer.checkpoint_suffix}.pt"
        if cfg.restore_file == "checkpoint_last.pt" and last.is_file():
            why = damage(last)
            if why is not None:
                fallback = newest_intact(Path(cfg.save_dir), last)
                if fallback is None:
                    raise DamagedCheckpointError(
                        f"{last} is damaged ({why}), and {cfg.save_dir} holds no intact "
                        "checkpoint to resume from. It was left as it is: move it away to "
                        "start this run afresh, or pass --restore-file with a good copy")
                logger.warning(f"{last} is damaged ({why}); resuming from {fallback}, the "
                               "newest intact checkpoint (the damaged file is left as it is)")
                cfg = _with(cfg, restore_file=str(fallback))
        extra_state, epoch_itr = original(cfg, trainer, **passthrough_args)
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

    PathManager.copy = staticmethod(atomic_copy)
    if not hasattr(checkpoint_utils.load_checkpoint, "__wrapped__"):
        checkpoint_utils.load_checkpoint = guarded_load_checkpoint(
            checkpoint_utils.load_checkpoint)
