"""`make demo`'s script end to end: embedded Redis, migrations, gunicorn API, Celery worker,
a generated 4096x3072 scene through the HTTP API, and everything stopped afterwards."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psutil
import pytest

from shared.settings import REPO_ROOT

pytestmark = pytest.mark.slow


def test_demo_runs_and_cleans_up(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "STORAGE_URL")}
    env["DATA_DIR"] = str(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "scripts/devstack.py", "demo"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    found = re.search(r"objects\s+(\d+)/(\d+) objects", out)
    assert found and found.group(1) == found.group(2) == "10", out
    heatmap = re.search(r"heatmaps\s+(\S+heatmap\.npz)", out).group(1)
    assert os.path.getsize(heatmap) > 0
    assert len(re.findall(r"^overlay ", out, flags=re.M)) == 4
    assert "stopped" in out
    assert re.search(r"^web page   http://127\.0\.0\.1:\d+/ ", out, flags=re.M), out  # the page's address
    assert re.search(r"^web page   .*/jobs/[0-9a-f]{32} ", out, flags=re.M), out  # and the job's
    assert [p for p in psutil.process_iter() if _data_dir(p) == env["DATA_DIR"]] == []  # nothing left running


def _data_dir(process) -> str | None:
    try:
        return process.environ().get("DATA_DIR")
    except (psutil.Error, OSError):
        return None
