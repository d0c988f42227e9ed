"""Whose checkpoints these are: a run resumes only from its own FineTuneJob's (same uid's) checkpoints.

Re-applying a job from Git (delete, apply) makes a new object with a new uid and the same
``output.location``. Keyed on the directory alone, the new job would resume the old run, or
"finish" it at once without training. The checkpoints directory therefore records the uid of
the job that wrote it; a job with another uid starts fresh there, and its final model replaces
the old one (atomically) only at its end. Torch-free.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from finetune_trainer.atomic import atomic_file

OWNER_FILE = "owner.json"


def checkpoint_owner(checkpoints_dir: Path) -> str | None:
    """The uid recorded in ``checkpoints_dir``; None when there is none (or it is unreadable)."""
    try:
        owner = json.loads((checkpoints_dir / OWNER_FILE).read_text()).get("uid")
    except (OSError, ValueError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None


def claim_checkpoints(checkpoints_dir: Path, uid: str | None, *, remove: bool) -> list[str]:
    """Make ``checkpoints_dir`` belong to job ``uid``; returns the names of another job's entries.

    Without a uid (a run outside Kubernetes) whatever is there is resumed, as before. Entries
    of another job (or of an unrecorded one) are deleted when ``remove`` (the main process),
    then the uid is recorded; other ranks only learn that they must not resume.
    """
    if uid is None or checkpoint_owner(checkpoints_dir) == uid:
        return []
    foreign = sorted(p.name for p in checkpoints_dir.iterdir() if p.name != OWNER_FILE)
    if remove:
        for name in foreign:
            path = checkpoints_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        atomic_file(checkpoints_dir / OWNER_FILE, (json.dumps({"uid": uid}) + "\n").encode())
    return foreign
