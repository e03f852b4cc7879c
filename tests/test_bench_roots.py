"""Smoke test of the solver study: `bench roots --preset quick` writes its JSON, markdown and PNG."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from dash_shampoo.cli import main
from dash_shampoo.linalg import METHODS


def test_roots_quick_writes_finite_results(tmp_path: Path) -> None:
    """Every method has accuracy rows with finite errors and times; the scaling study has rows too."""
    assert main(["bench", "roots", "--preset", "quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "roots-cpu.json").read_text())
    assert report["device_type"] == "cpu"
    for key in ("command", "device", "torch", "python", "date"):
        assert report[key]
    accuracy = [r for r in report["rows"] if r["study"] == "accuracy"]
    assert {r["method"] for r in accuracy} == set(METHODS)
    for row in accuracy:
        for key in ("err_median", "err_max", "dir_err_median", "time_s"):
            assert row[key] is not None and math.isfinite(row[key]), (key, row)
    # fp64 eigh on the ridged matrix matches the float64 reference up to the fp32 output rounding.
    exact = [r for r in accuracy if r["method"] == "eigh" and r["precision"] == "fp64"]
    assert exact and all(r["err_max"] < 1e-6 for r in exact)
    iterations = [r for r in report["rows"] if r["study"] == "iterations"]
    assert {r["method"] for r in iterations} == {"newton", "ndb"}
    assert all(r["s_over_lmax_median"] > 0 and len(r["iterations"]) == r["count"] for r in iterations)
    assert "| n | p | method |" in (tmp_path / "roots-cpu.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "roots-cpu.png").stat().st_size > 0
