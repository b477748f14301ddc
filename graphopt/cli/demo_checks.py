"""``graphopt demo``'s checks before its long work (a fine-tune, then minutes of benchmarks):
``-p`` pipelines and the model cache, each refused in one line (exit 2) before step 1 instead of
after the run (the report folder, its parent included, is :func:`graphopt.outputs.check_replaceable`'s);
and the cached model's own checks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from graphopt.errors import ArtifactError, first_line
from graphopt.outputs import check_replaceable

__all__ = ["check_pipelines", "check_cache", "check_cache_entry", "unreadable"]


def check_pipelines(specs: list[str] | None) -> None:
    """Every ``-p LABEL=PIPELINE`` parses and no two share a label (as ``graphopt bench`` checks):
    a bad one was benchmarked as a skipped variant (exit 0), a duplicate refused after the fine-tune."""
    from graphopt.bench.pipelines import check_unique_labels, parse_pipeline_spec
    from graphopt.transform.pipeline import parse_pipeline

    parsed = [parse_pipeline_spec(spec) for spec in specs or ()]
    for spec in parsed:
        if spec.text:
            parse_pipeline(spec.text)
    check_unique_labels(parsed)


def _why(e: OSError, folder: Path) -> str:
    """What stops making or writing in ``folder``, in a few words (a file in the way, read-only...)."""
    for p in [folder, *folder.parents]:
        if os.path.lexists(p) and not p.is_dir():
            return f"{p} is a file, not a folder"
    return (e.strerror or str(e)).lower()


def check_cache(root: Path) -> str | None:
    """Make the model cache's ``demo`` folder under ``root``; refuse a ``root`` that cannot be one (a
    file, /proc). Returns why it cannot be written in (None: it can): a read-only cache still serves
    a model it holds, so that is refused only where a model must be trained and cached."""
    demo = root / "demo"
    try:
        demo.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"--cache-dir {root} cannot hold the model cache: {_why(e, demo)}; "
                            "pick another --cache-dir") from None
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".graphopt-probe-", dir=demo))
    except OSError as e:
        return f"--cache-dir {root} cannot be written ({_why(e, demo)}); pick a writable --cache-dir"
    return None


def check_cache_entry(ckpt_dir: Path, cannot_write: str | None) -> None:
    """Before fine-tuning a model to cache at ``ckpt_dir``: the cache takes it (not after the run)."""
    if cannot_write:
        raise ArtifactError(cannot_write)
    try:
        check_replaceable(ckpt_dir, force=True, flag=None)
    except ArtifactError as e:  # a damaged entry holding a file graphopt did not write: never deleted
        why = str(e).split("; ")[0].replace(f"{ckpt_dir} ", "it ", 1)
        raise ArtifactError(f"cannot cache the model at {ckpt_dir}: {why}; move it away or pick another --cache-dir") from None


def unreadable(e: Exception) -> str:
    """Why a cached model could not be loaded, without the advice meant for `graphopt finetune`'s
    own checkpoints (``re-create it with graphopt finetune --fresh``)."""
    return first_line(e).split("; ")[0]
