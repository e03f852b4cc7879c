"""Smoke test of the optimizer-step benchmark: ``dash-shampoo bench step --preset quick``."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

from dash_shampoo.bench import step
from dash_shampoo.bench.shapes import SET_NAMES
from dash_shampoo.cli import main
from dash_shampoo.linalg import METHODS, RootOptions
from dash_shampoo.optimizer import STACKINGS
from dash_shampoo.peers import PEERS


def test_step_quick_rows(tmp_path: Path) -> None:
    """AdamW, every DASH (stacking, solver, F) row and every peer row are reported, with reasons."""
    assert main(["bench", "step", "--preset", "quick", "--no-plot", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "step-cpu.json").read_text())
    for key in ("command", "device", "torch", "python", "date", "rows"):
        assert report[key]
    rows = report["rows"]
    fused = [r for r in rows if r["optimizer"] == "AdamW (fused)"]
    assert len(fused) == 1 and fused[0]["vs_adamw"] == 1.0
    dash = [r for r in rows if r["kind"] == "dash"]
    combos = {(r["stacking"], r["method"], r["frequency"]) for r in dash}
    assert combos == {(s, m, f) for s in ("global", "none") for m in ("ndb", "eigh") for f in (1, 10)}
    for row in dash:
        assert row["per_step"] > 0 and math.isfinite(row["per_step"])
        assert row["root_failures"] == 0
        assert row["vs_adamw"] > 1.0  # a Shampoo step does strictly more work than an AdamW step
        assert row["state_bytes_per_param"] > 8.0  # Adam's two moments plus the factors and roots
        assert row["speedup_vs_none"] > 0
        if row["stacking"] == "none":
            assert row["speedup_vs_none"] == 1.0
        if row["frequency"] > 1:
            # Steps between refreshes skip the solver, so they cost less than a refresh step.
            assert row["other"]["median"] < row["refresh"]["median"]
    # Batched stacking does the same work in fewer, larger solver calls than the per-block loop.
    for method in ("ndb", "eigh"):
        calls = {r["stacking"]: r["solver"]["calls_per_refresh"] for r in dash if r["method"] == method}
        assert calls["global"] < calls["none"]
    for row in rows:
        if row["kind"] == "peer":
            # A peer either ran with a finite time or says why not.
            assert (row.get("per_step") is not None and math.isfinite(row["per_step"])) or row["reason"]
    text = (tmp_path / "step-cpu.md").read_text()
    assert "| model | optimizer |" in text and report["device"] in text


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    step.add_arguments(parser)
    return parser.parse_args(argv)


def test_presets_name_known_models_solvers_and_stackings() -> None:
    for preset in step.PRESETS.values():
        for grid in preset.grids:
            assert set(grid.models) <= set(SET_NAMES)
            assert set(grid.methods) <= set(METHODS) and set(grid.stackings) <= set(STACKINGS)


def test_cpu_preset_rows() -> None:
    """The CPU preset has the rows the README quotes: mini at block 256, F = 10, every stacking and
    solver beside the peers, and one eigh row for each of the larger models."""
    rows = step.plan(step.PRESETS["cpu"], _args())
    by_model = Counter(row.model for row in rows)
    assert by_model == {"mini": 2 + 19 + len(PEERS), "small": 2 + 2, "124m": 2 + 1, "953m-rank": 2 + 1}
    mini = {(r.kind, r.block_size, r.frequency, r.stacking, r.method) for r in rows if r.model == "mini"}
    assert {("dash", 256, 10, s, m) for s in STACKINGS for m in ("ndb", "eigh", "newton")} <= mini
    assert [r.label for r in rows[:2]] == ["AdamW (foreach)", "AdamW (fused)"] and rows[1].fused
    peers = [r for r in rows if r.kind == "peer"]
    assert {(r.model, r.block_size, r.frequency) for r in peers} == {("mini", 256, 10)}


def test_filters_keep_matching_rows_only() -> None:
    rows = step.plan(step.PRESETS["cpu"], _args("--models", "mini", "--methods", "eigh", "--peers", "none"))
    assert {r.model for r in rows} == {"mini"} and not [r for r in rows if r.kind == "peer"]
    assert {r.method for r in rows if r.kind == "dash"} == {"eigh"}
    gpu = step.plan(
        step.PRESETS["gpu"], _args("--block-sizes", "1024", "--frequencies", "10", "--peers", "SOAP")
    )
    assert {r.block_size for r in gpu if r.kind != "adamw"} == {1024}
    assert {r.label for r in gpu if r.kind == "peer"} == {"pytorch_optimizer.SOAP", "heavyball.SOAP"}


def test_sampling_options_replace_the_presets() -> None:
    preset, device = step._resolve(_args("--preset", "quick", "--repeats", "7", "--device", "cpu"))
    assert (preset.repeats, preset.warmup, preset.grids) == (7, 1, step.PRESETS["quick"].grids)
    assert device.type == "cpu"


def test_root_flops_counts_matmuls_and_scaling() -> None:
    n = 8
    total, matmul, label = step.root_flops(RootOptions(method="ndb", steps=10), n, 4)
    assert label == "ndb 54 matmuls" and matmul == 54 * 2 * n**3
    assert total == matmul + 2 * n * n * 16 * 11  # power_multi: 16 vectors, 10 steps + 1
    assert step.root_flops(RootOptions(method="eigh"), n, 4)[2] == "eigh nominal 9n³+2n³"
