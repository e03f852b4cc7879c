"""The peers: found by name, built with the benchmark's block size and refresh period, optional."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dash_shampoo.peers import PEERS, Peer, find, state_bytes


def test_find_by_full_or_class_name() -> None:
    assert [p.name for p in find(["SOAP"])] == ["pytorch_optimizer.SOAP", "heavyball.SOAP"]
    assert [p.name for p in find(["heavyball.soap", "kLsHaMpOo"])] == [
        "heavyball.SOAP",
        "heavyball.KLShampoo",
    ]
    assert find(None) == list(PEERS)
    with pytest.raises(ValueError, match=r"unknown peer.*known: pytorch_optimizer\.DASH"):
        find(["adamw"])


def test_a_missing_package_is_a_reason_not_an_error() -> None:
    missing = Peer("no_such_package_here.Optimizer", "", lambda *args: None)
    reason = missing.unavailable([(4, 4)], 4, torch.device("cpu"))
    assert reason is not None and reason.startswith("not installed (ModuleNotFoundError")


@pytest.mark.skipif(
    importlib.util.find_spec("ista_daslab_optimizers") is None, reason="the authors' package is not installed"
)
@pytest.mark.parametrize("name", ["DashGpu", "DashGpu-evd"])
def test_authors_dash_gpu_steps_on_the_cpu(name: str) -> None:
    """Without CUDA, Triton or wandb the authors' package imports with its CUDA-only pieces stubbed,
    and its fp32 DashGpu steps on the CPU (what the counts and the CPU timings compare against)."""
    peer = find([name])[0]
    assert peer.unavailable([(8, 8)], 4, torch.device("cpu")) is None
    param = torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    optimizer = peer.build([param], 4, 1)
    before = param.detach().clone()
    for _ in range(3):
        param.grad = torch.ones_like(param)
        optimizer.step()
    assert not torch.equal(param, before) and torch.isfinite(param).all()


@pytest.mark.parametrize("name", ["pytorch_optimizer.SOAP", "pytorch_optimizer.DASH", "heavyball.SOAP"])
def test_installed_peers_build_with_block_size_frequency_and_lr(name: str) -> None:
    peer = find([name])[0]
    pytest.importorskip(name.partition(".")[0])
    assert peer.unavailable([(8, 8)], 4, torch.device("cpu")) is None
    param = torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    optimizer = peer.build([param], 4, 2, lr=0.5)
    assert optimizer.param_groups[0]["lr"] == 0.5
    before = param.detach().clone()
    for _ in range(3):
        param.grad = torch.ones_like(param)
        optimizer.step()
    assert not torch.equal(param, before) and torch.isfinite(param).all()
    assert "{B}" not in peer.describe(4, 2) and "{F}" not in peer.describe(4, 2)


def test_state_bytes_counts_each_tensor_once() -> None:
    shared = torch.zeros(10)
    state = {0: {"a": shared, "b": shared, "c": [torch.zeros(5, dtype=torch.float64)]}, 1: {"n": 3}}
    assert state_bytes(state) == 10 * 4 + 5 * 8
