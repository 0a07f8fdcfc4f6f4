"""Per-job scratch folders in the temp folder, and removing the ones killed workers left.

A job's scratch folder is ``<tmp>/job-<job id>-pid<worker pid>-<random>``: the runner removes
it when the job ends, but a SIGKILLed worker cannot, so every worker clears at start the
folders whose process is gone. The pid in the name is what keeps the folders of other live
workers on the same machine. No TensorFlow here: the worker's main process calls it.
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


def make_scratch_dir(job_id: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{job_id}-pid{os.getpid()}-"))


def clean_stale_scratch(root: Path | None = None, older_than_s: float = 86400.0) -> list[Path]:
    """Remove scratch folders whose process is gone, and unmarked ones (made before the pid
    was in the name) untouched for `older_than_s`. Returns what was removed."""
    root = Path(root or tempfile.gettempdir())
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
