"""The memory budget: detection from (fake) cgroup files and the admission counter."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.dataplane import memory
from service.dataplane.memory import MARGIN, MIN_BUDGET, MemoryBudget, detect_budget, own_rss

GiB = 1 << 30


def fake_root(tmp_path: Path, *, v2: str | None = None, v1: str | None = None, meminfo_kb: int | None = None):
    root = tmp_path / "cgroup"
    root.mkdir()
    if v2 is not None:
        (root / "memory.max").write_text(v2 + "\n")
    if v1 is not None:
        (root / "memory").mkdir()
        (root / "memory" / "memory.limit_in_bytes").write_text(v1 + "\n")
    meminfo = tmp_path / "meminfo"
    if meminfo_kb is not None:
        meminfo.write_text(f"MemTotal:       {meminfo_kb} kB\nMemFree:        1234 kB\n")
    return root, meminfo


def test_cgroup_v2_limit_minus_own_footprint_and_margin(tmp_path):
    root, meminfo = fake_root(tmp_path, v2=str(4 * GiB), meminfo_kb=64 * 1024 * 1024)
    budget, source = detect_budget(500 << 20, cgroup_root=root, meminfo=meminfo)
    assert source == "cgroup"
    assert budget == int(4 * GiB * (1 - MARGIN)) - (500 << 20)


def test_cgroup_v1_limit(tmp_path):
    root, meminfo = fake_root(tmp_path, v1=str(2 * GiB))
    assert detect_budget(0, cgroup_root=root, meminfo=meminfo) == (int(2 * GiB * (1 - MARGIN)), "cgroup")


@pytest.mark.parametrize(("v2", "v1"), [("max", None), (None, "9223372036854771712"), (None, None), ("garbage", None)])
def test_no_limit_falls_back_to_the_default(tmp_path, v2, v1):
    root, meminfo = fake_root(tmp_path, v2=v2, v1=v1, meminfo_kb=64 * 1024 * 1024)  # 64 GiB machine
    assert detect_budget(300 << 20, cgroup_root=root, meminfo=meminfo) == (memory.DEFAULT_BUDGET, "default")


def test_no_limit_on_a_small_machine_takes_a_share_of_memtotal(tmp_path):
    root, meminfo = fake_root(tmp_path, v2="max", meminfo_kb=2 * 1024 * 1024)  # 2 GiB machine
    assert detect_budget(0, cgroup_root=root, meminfo=meminfo) == (int(2 * GiB * memory.HOST_FRACTION), "meminfo")


def test_no_files_at_all_gives_the_default(tmp_path):
    budget, source = detect_budget(0, cgroup_root=tmp_path / "absent", meminfo=tmp_path / "absent-meminfo")
    assert (budget, source) == (memory.DEFAULT_BUDGET, "default")


def test_a_limit_smaller_than_the_footprint_keeps_a_floor(tmp_path):
    root, meminfo = fake_root(tmp_path, v2=str(512 << 20))
    assert detect_budget(600 << 20, cgroup_root=root, meminfo=meminfo) == (MIN_BUDGET, "cgroup")


def test_the_setting_overrides_detection():
    assert memory.budget_from_settings(12345) == (12345, "setting")
    budget, source = memory.budget_from_settings(None)
    assert source in {"cgroup", "default", "meminfo"}
    assert budget >= MIN_BUDGET


def test_own_rss_reads_proc(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmRSS:\t  2048 kB\n")
    assert own_rss(status) == 2 << 20
    assert own_rss(tmp_path / "absent") == 0
    assert own_rss() > 0  # this process, on Linux


def test_budget_admits_until_full_and_releases():
    b = MemoryBudget(100)
    assert (b.capacity, b.in_use) == (100, 0)
    assert b.try_acquire(60)
    assert not b.try_acquire(41)  # would be 101
    assert b.in_use == 60  # a refusal reserves nothing
    assert b.try_acquire(40)
    assert b.in_use == 100
    assert not b.try_acquire(1)
    b.release(60)
    assert b.in_use == 40
    assert b.available == 60
    assert b.try_acquire(0)
    assert not b.try_acquire(101)  # larger than the whole capacity: never
    b.release(40)
    assert b.in_use == 0
    assert b.peak == 100


def test_budget_refuses_bad_amounts():
    b = MemoryBudget(10)
    assert b.try_acquire(5)
    with pytest.raises(ValueError, match="releasing 6 bytes"):
        b.release(6)
    with pytest.raises(ValueError, match="negative"):
        b.try_acquire(-1)
    with pytest.raises(ValueError, match="capacity"):
        MemoryBudget(-1)
    assert b.in_use == 5
