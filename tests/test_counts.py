"""The step counter (kernels, host syncs, FLOPs, bytes on meta tensors) and DASH's counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dash_shampoo import DASH
from dash_shampoo.bench import counts
from dash_shampoo.bench.counts import StepCounter, count_optimizer, meta_parameters
from dash_shampoo.cli import main

META = torch.device("meta")


def _count(fn) -> counts.Counts:
    with StepCounter() as counter:
        fn()
    return counter.counts


def test_kernels_bytes_and_flops_of_simple_ops() -> None:
    x, y = torch.empty(4, 8, device=META), torch.empty(4, 8, device=META)
    a, b = torch.empty(3, 4, 5, device=META), torch.empty(3, 5, 6, device=META)
    # Views and allocations launch nothing.
    assert _count(lambda: (x.view(8, 4), x.t(), x[1:], torch.empty_like(x))).kernels == 0
    # An in-place add reads both operands and writes its target: 3 × 128 bytes.
    c = _count(lambda: x.add_(y))
    assert (c.kernels, c.bytes, c.syncs) == (1, 3 * 128, 0)
    # copy_ only writes its target; a foreach op's in-place writes count too.
    assert _count(lambda: x.copy_(y)).bytes == 2 * 128
    assert _count(lambda: torch._foreach_mul_([x, y], 2.0)).bytes == 4 * 128
    c = _count(lambda: torch.bmm(a, b))
    assert c.matmul_flops == 2 * 3 * 4 * 5 * 6 and c.bytes == 4 * (60 + 90 + 72)
    c = _count(lambda: torch.baddbmm(torch.empty(3, 4, 6, device=META), a, b, beta=0.5))
    assert c.matmul_flops == 2 * 3 * 4 * 5 * 6 and c.ops["baddbmm"] == 1
    # eigh is counted apart, with its matrices.
    c = _count(lambda: torch.linalg.eigh(torch.empty(7, 5, 5, device=META)))
    assert (c.kernels, c.eigh_calls, c.eigh_matrices) == (0, 1, 7)
    # Host tensors launch nothing on the device.
    c = _count(lambda: torch.ones(3).add_(1))
    assert (c.kernels, c.host_ops) == (0, 2)  # ones and add_


def test_every_host_read_of_device_data_is_a_sync() -> None:
    x = torch.empty(4, device=META)
    reads = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "tolist": lambda: x.tolist(),
        "cpu": lambda: x.cpu(),
        "nonzero": lambda: torch.nonzero(x),
        "host-to-device": lambda: torch.tensor([1.0, 2.0], device=META),
        "to device": lambda: torch.ones(2).to(META),
    }
    for name, read in reads.items():
        assert _count(read).syncs == 1, name
    # A read answers zeros, so code that branches on it goes on.
    with StepCounter():
        assert x.tolist() == [0.0] * 4 and x.sum().item() == 0.0
    # A copy the host does not wait for is not a sync.
    assert _count(lambda: torch.ones(2).to(META, non_blocking=True)).syncs == 0


SHAPES = [(96, 64), (64, 64), (64,), (130, 70)]


@pytest.mark.parametrize("method", ["ndb", "eigh"])
def test_dash_step_has_one_host_sync_and_batching_cuts_kernels(method: str) -> None:
    """The accelerator path's one host read per step is the gradient check (the decision to skip a
    non-finite step); the batched stackings launch far fewer kernels for the same FLOPs and bytes."""
    results = {}
    for stacking in ("global", "layer", "none"):

        def build(params, stacking=stacking):
            return DASH(
                params, block_size=32, precondition_frequency=2, root_method=method, stacking=stacking
            )

        results[stacking] = count_optimizer(build, SHAPES, frequency=2)
    for result in results.values():
        for step in ("refresh", "other"):
            assert result[step]["syncs"] == 1 and result[step]["sync_ops"] == {"device-to-host copy": 1}
        assert result["other"]["kernels"] < result["refresh"]["kernels"]
        assert result["other"]["matmul_flops"] < result["refresh"]["matmul_flops"]
    kernels = {name: r["refresh"]["kernels"] for name, r in results.items()}
    assert kernels["global"] < kernels["layer"] < kernels["none"]
    flops = {r["refresh"]["matmul_flops"] for r in results.values()}
    assert len(flops) == 1  # the same maths in every stacking
    per_step = results["global"]["per_step"]
    refresh, other = results["global"]["refresh"], results["global"]["other"]
    assert per_step["kernels"] == (refresh["kernels"] + other["kernels"]) / 2


def test_minimum_bytes_of_a_step_without_refresh() -> None:
    # 10 elements (28 B each) and 6 factor entries (12 B each).
    assert counts.minimum_other_step_bytes(10, 6) == 280 + 72


def test_meta_parameters_have_gradients_and_no_data() -> None:
    params = meta_parameters([(3, 4), (5,)])
    assert [p.shape for p in params] == [(3, 4), (5,)]
    assert all(p.is_meta and p.grad is not None and p.grad.shape == p.shape for p in params)


def test_bench_step_counts_only(tmp_path: Path) -> None:
    """``bench step --counts-only`` counts every row on the meta device and writes its table."""
    argv = ["bench", "step", "--preset", "quick", "--counts-only", "--out", str(tmp_path)]
    assert main([*argv, "--peers", "none"]) == 0
    report = json.loads((tmp_path / "step-counts.json").read_text())
    assert report["counts_only"] is True
    dash = [r for r in report["rows"] if r["kind"] == "dash"]
    assert dash and all(r["counts"]["per_step"]["syncs"] == 1 for r in dash)
    for row in dash:
        if row["frequency"] > 1:
            assert row["counts"]["other_vs_minimum"] > 1.0  # no step moves fewer bytes than it must
    foreach = [r for r in report["rows"] if r["optimizer"] == "AdamW (foreach)"]
    assert foreach[0]["counts"]["per_step"]["syncs"] == 0
    text = (tmp_path / "step-counts.md").read_text()
    assert "kernels refresh" in text and "How to read the counts" in text
