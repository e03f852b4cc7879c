"""The peers: found by name, built with the benchmark's block size and refresh period, optional."""

from __future__ import annotations

import pytest
import torch

from dash_shampoo.peers import PEERS, find, state_bytes


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
    authors = find(["DashGpu"])[0]
    reason = authors.unavailable([(4, 4)], 4, torch.device("cpu"))
    assert reason is not None and ("not installed" in reason or "needs CUDA" in reason)


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
