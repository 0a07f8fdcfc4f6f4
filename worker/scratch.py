"""Per-job scratch folders in this stack's scratch folder, and removing the ones killed
workers left.

A job's scratch folder is ``<SCRATCH_DIR>/job-<job id>-pid<worker pid>-<random>``: the runner
removes it when the job ends, but a SIGKILLed process cannot, so the folders whose process is
gone are cleared when a worker starts and each time a pool process starts - also the
replacement Celery forks for a pool process that was killed, so what it left (with S3 storage:
the downloaded input and partial outputs) goes at once, not at the next worker restart. The
pid in the name keeps the folders of other live pool processes; the stack's own
``SCRATCH_DIR`` (``Settings.resolved_scratch_dir``: one per database, queue and storage)
keeps other stacks' folders on the same machine out of reach (issue 20). No TensorFlow here.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("heatmaps.worker")

SCRATCH_PREFIX = "job-"
_SCRATCH_RE = re.compile(rf"{SCRATCH_PREFIX}[0-9a-f]{{32}}-(?:pid(\d+)-)?.+")


def make_scratch_dir(job_id: str, root: Path) -> Path:
    """A new scratch folder for the job under this stack's `root` (made private if new)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{job_id}-pid{os.getpid()}-", dir=root))


def clean_stale_scratch(root: Path, older_than_s: float = 86400.0) -> list[Path]:
    """Remove the scratch folders under this stack's `root` whose process is gone, and
    unmarked ones (made before the pid was in the name) untouched for `older_than_s`.
    Returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for path in root.glob(f"{SCRATCH_PREFIX}*"):
        match = _SCRATCH_RE.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        try:
            if match.group(1) is not None:
                stale = not _process_exists(int(match.group(1)))
            else:
                stale = time.time() - path.stat().st_mtime > older_than_s
        except OSError:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d stale scratch folder(s) from %s", len(removed), root)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
