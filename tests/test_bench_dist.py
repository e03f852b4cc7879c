"""Smoke test of the multi-process benchmark: `bench dist --preset quick` (1 and 2 gloo ranks)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch.distributed as dist

from dash_shampoo.bench.shapes import shape_set
from dash_shampoo.blocking import Blocking
from dash_shampoo.cli import main

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_dist_quick_rows_and_bitwise_agreement(tmp_path: Path) -> None:
    """Every (world, F, config, rank) row is there with finite timings; ranks agree bitwise."""
    assert main(["bench", "dist", "--preset", "quick", "--backend", "gloo", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "dist-cpu.json").read_text())
    for key in ("command", "device", "torch", "python", "date"):
        assert report[key]
    assert report["worlds"] == [1, 2] and report["frequencies"] == [1, 10]
    rows = report["rows"]
    expected = {
        (world, frequency, config, rank)
        for world in (1, 2)
        for frequency in (1, 10)
        for config in ("shared-fp32", "replicated")
        for rank in range(world)
    }
    assert {(r["world"], r["frequency"], r["config"], r["rank"]) for r in rows} == expected
    total = {}
    for row in rows:
        assert row["ranks_equal"], row["checksums"]
        assert row["per_step"] > 0 and math.isfinite(row["per_step"])
        assert row["refresh"]["n"] >= 1
        if row["frequency"] > 1:
            assert row["other"]["n"] >= 3  # until t = 10, the first timed refresh
        assert row["speedup_vs_replicated"] > 0
        assert row["root_failures"] == 0 and row["skipped_steps"] == 0
        stats = row["stats"]
        shared = row["config"] != "replicated"
        # replicated (no group): every rank is rank 0 of one.
        assert (stats["world_size"], stats["rank"]) == ((row["world"], row["rank"]) if shared else (1, 0))
        assert row["state_mib"] > 0
        if row["config"] == "replicated":
            assert stats["bytes_per_refresh"] == 0
            assert row["max_abs_diff_vs_replicated"] == 0.0
            total[row["world"], row["frequency"]] = stats["owned_blocks"]
    # Shared: the ranks' blocks partition the model's blocks.
    owned: dict[tuple, int] = {}
    for row in rows:
        if row["config"] != "replicated":
            key = (row["world"], row["frequency"], row["config"])
            owned[key] = owned.get(key, 0) + row["stats"]["owned_blocks"]
    for (world, frequency, _), count in owned.items():
        assert count == total[world, frequency]
    blockings = [
        Blocking.build(s, report["block_size"], "shampoo")
        for _, s in shape_set(report["model"]["name"]).shapes
    ]
    factor_elements = sum(r.count * n * n for b in blockings for r in b.regions for _, n in b.sides(r))
    for summary in report["summaries"]:
        assert summary["ranks_equal"]
        if summary["world"] == 2 and summary["config"] != "replicated":
            # All-gather of every refreshed root; padding to the largest share is small.
            size = 4
            assert factor_elements * size <= summary["bytes_per_refresh"] < 1.2 * factor_elements * size
            assert summary["bytes_per_step"] == summary["bytes_per_refresh"] / summary["frequency"]
            assert summary["imbalance"] < 1.5
    markdown = (tmp_path / "dist-cpu.md").read_text()
    assert "| W | F | config | rank |" in markdown
    assert "oversubscribe" in markdown
