"""Worker pools are sized by the cores a container may use, not by the node's core count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedhe.cpus import usable_cpus

AFFINITY = 8


@pytest.fixture(autouse=True)
def _eight_core_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs as on an 8-core host, so only the quota can lower the count."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(AFFINITY)))


def test_a_cgroup_v2_quota_caps_the_pool_rounded_up(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(tmp_path) == 2


def test_a_fractional_quota_still_gets_one_worker(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("10000 100000\n")
    assert usable_cpus(tmp_path) == 1


@pytest.mark.parametrize("limit", ["max 100000\n", "garbage\n"])
def test_no_quota_or_an_unreadable_one_leaves_the_affinity(tmp_path: Path, limit: str) -> None:
    (tmp_path / "cpu.max").write_text(limit)
    assert usable_cpus(tmp_path) == AFFINITY


def test_a_cgroup_v1_quota_is_read_when_there_is_no_v2_file(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cpus(tmp_path) == AFFINITY
