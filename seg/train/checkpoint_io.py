"""Atomic checkpoint files: a ``CheckpointIO`` plugin that writes ``<path>.tmp`` beside the target, fsyncs it and
renames it over the target, so a kill while saving never leaves a truncated ``last.ckpt``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``<path>.tmp`` in the target folder, fsync, then ``os.replace`` onto ``path``.

    Lightning's own writer serialises into memory and moves a file from the system temp folder into place:
    atomic only when both live on one file system. On clusters the temp folder is often node-local while
    checkpoints go to a shared file system; the move then copies, and a kill during the copy leaves a
    truncated checkpoint. Here the rename never crosses file systems, the data is on disk before it becomes
    visible, and a failed write leaves the previous file untouched. Remote (``scheme://``) paths fall back
    to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_folder(target.parent)


def _fsync_folder(folder: Path) -> None:
    """Persist a rename: fsync the folder entry (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
