"""docs/development.md's figure of the test suite's size stays true as tests are added or removed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "development.md"
SLACK = 1.4  # "over N tests" is still a fair figure up to 40 % more tests; past that it is updated


def stated() -> int:
    m = re.search(r"over ([\d,]+) tests", PAGE.read_text())
    assert m is not None, "docs/development.md states no test count"
    return int(m[1].replace(",", ""))


def whole_suite(config) -> bool:
    """Whether this run collected every test (`make test`: pytest's testpaths, nothing deselected)."""
    o = config.option
    return (
        config.args_source is pytest.Config.ArgsSource.TESTPATHS
        and not o.markexpr and not o.keyword and not o.deselect and not getattr(o, "lf", False)
    )


def collected(request) -> int:
    if whole_suite(request.config):
        return request.session.testscollected
    r = subprocess.run(  # what `pytest --collect-only -q` counts for the whole suite
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"],
        cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=300,
    )
    m = re.search(r"^(\d+) tests? collected", r.stdout, re.M)
    assert m is not None, r.stdout[-2000:] + r.stderr[-2000:]
    return int(m[1])


@pytest.mark.slow  # alone it collects the suite in a subprocess; in `make test` it reads this run's count
def test_the_suite_has_over_the_stated_number_of_tests_and_not_far_over(request):
    n, count = stated(), collected(request)
    assert n <= count < n * SLACK, f"docs/development.md says over {n} tests; the suite has {count}"
