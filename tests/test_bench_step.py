"""Smoke test of the optimizer-step benchmark: ``dash-shampoo bench step --quick``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dash_shampoo.cli import main


def test_step_quick_rows(tmp_path: Path) -> None:
    """AdamW, every DASH (stacking, solver, F) row and every peer row are reported, with reasons."""
    assert main(["bench", "step", "--quick", "--no-plot", "--out", str(tmp_path)]) == 0
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
