"""``dash-shampoo bench gpu --dry-run``: every stage of the GPU command runs on the CPU, so the
command a lent GPU runs first cannot rot."""

from __future__ import annotations

import json
import tarfile

from dash_shampoo.cli import main


def test_gpu_command_dry_run_writes_three_files_with_every_stage(tmp_path):
    assert main(["bench", "gpu", "--dry-run", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.tar.gz", "summary.json", "summary.md"]
    stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert list(stages) == ["check", "sync", "step", "roots", "train"]
    check = stages["check"]
    # On the CPU the "device" run is the CPU reference run again, in another stacking mode: bitwise
    # for the iterative solvers; the CPU's batched eigh rounds by batch (1e-4 of the update, as in
    # tests/test_numerics.py; measured 2e-6).
    assert len(check["solvers"]) == 12
    for row in check["solvers"]:
        assert row["diff_over_update"] <= (1e-4 if row["method"] == "eigh" else 0.0), row
    assert all(p["finite"] for p in check["precisions"].values()) and check["round_trip"]
    assert "no CUDA device" in stages["sync"]["skipped"]
    assert all(stages[name]["exit"] == 0 for name in ("step", "roots", "train"))
    names = tarfile.open(tmp_path / "results.tar.gz").getnames()
    for expected in (
        "results/step/step-cpu.json",
        "results/roots/roots-cpu.json",
        "results/train/train-cpu.json",
    ):
        assert expected in names
