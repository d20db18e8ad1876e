"""Whether the current call is being traced by ``torch.export`` (the exported graph may take another arrangement
of the same sums, one that suits the runtimes it goes to)."""

from __future__ import annotations

import torch

__all__ = ["exporting"]


def exporting() -> bool:
    """True while ``torch.export`` traces the call; always False on a torch without
    ``torch.compiler.is_exporting`` (before 2.6), whose exports then keep the eager arrangement."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())
