"""A short version of the soak (bench/soak.py): mixed load, no unexpected error, flat memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_short_soak(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "8", "--clients", "8", "--warmup", "2",
         "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["unexpected_count"] == 0
    assert report["requests"] > 500
    assert report["deliberate_4xx"] > 0 and set(report["by_status"]) <= {"200", "400", "422", "503"}
    assert report["rss_growth"] <= 0.10
