"""Telling a saved Program from a damaged one, or from a file that only looks like one."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["weights_digest", "is_aoti_package"]


def weights_digest(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over the distinct contents of ``tensors`` (order, names and tying do not count), so a
    saved Program whose weights changed on disk is told from the one that was written."""
    digests = set()
    for t in tensors:
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy())
        digests.add(h.hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()


def is_aoti_package(path: Path) -> bool:
    """Whether ``path`` is a zip holding an AOTInductor package (a lowered artifact's model.pt2)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/data/aotinductor/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
