"""Which code made a result file: the git commit of this checkout, marked when it was edited.

Result files (``results/*.json``) record it in ``meta.git_commit``.  A run made from a working
tree with uncommitted changes to tracked files (a copy of a tree being worked on, say) is not the
commit it started from, so its hash gets a ``-dirty`` suffix, as ``git describe --dirty`` writes.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """``HEAD``'s hash, with ``-dirty`` if tracked files differ from it; None outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=10)
        return sha + ("-dirty" if changed.returncode == 0 and changed.stdout.strip() else "")
    except Exception:  # noqa: BLE001  (no git, a timeout: the file just records no commit)
        return None
