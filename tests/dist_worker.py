"""Scenarios run inside real ``torch.distributed`` gloo process groups by tests/test_distributed.py.

Each scenario is a module-level function ``name(rank, world, out_dir)`` so spawned processes can
import it; results are written with ``torch.save`` to ``out_dir/<name>-<rank>.pt``.
"""

from __future__ import annotations

import copy
import os
import traceback

import torch
import torch.distributed as dist

from dash_shampoo import DASH, distributed
from dash_shampoo.distributed import exit_without_finalizing

OPTIONS = dict(
    lr=1e-2,
    block_size=8,
    root_method="eigh",
    root_eps=1e-4,
    precondition_frequency=2,
    weight_decay=0.01,
)


def mixed_model() -> torch.nn.Module:
    """Every kind of shape: full/edge/corner blocks, a matrix smaller than a block, 1-D, 0-D, 4-D."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.randn(20, 13) * 0.1)
    model.b = torch.nn.Parameter(torch.randn(13) * 0.1)
    model.c = torch.nn.Parameter(torch.randn(5, 20) * 0.1)
    model.d = torch.nn.Parameter(torch.randn(3, 2, 2, 2) * 0.1)
    model.s = torch.nn.Parameter(torch.tensor(0.5))
    model.unused_on_odd_steps = torch.nn.Parameter(torch.randn(9, 4) * 0.1)
    return model


def loss_fn(model: torch.nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
    """A deterministic loss touching every parameter (one of them only on even steps)."""
    x = torch.randn(16, 13, generator=generator)
    h = torch.tanh(x @ model.a.T + model.s)  # (16, 20)
    h = h * (1 + model.b.sum())
    out = h @ model.c.T  # (16, 5)
    loss = (out**2).mean() + (model.d**2).sum() * out.mean()
    if step % 2 == 0:
        loss = loss + (model.unused_on_odd_steps**3).mean()
    return loss


def train(model: torch.nn.Module, optimizer: DASH, steps: range) -> None:
    """Run the given steps; the data depend only on the step index (the same on every rank)."""
    for step in steps:
        generator = torch.Generator().manual_seed(1000 + step)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, step, generator).backward()
        optimizer.step()


def flat(model: torch.nn.Module) -> torch.Tensor:
    """All parameters in one vector."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def scenario_train(rank: int, world: int, out_dir: str) -> dict:
    model = mixed_model()
    optimizer = DASH(model.parameters(), **OPTIONS)
    train(model, optimizer, range(1, 7))
    plan = optimizer._layout
    # process_group=False: this rank computes every block, exactly as one process would.
    local_model = mixed_model()
    local = DASH(local_model.parameters(), process_group=False, **OPTIONS)
    train(local_model, local, range(1, 7))
    local.load_state_dict(local.state_dict())  # the optimizer keeps its process group
    return {
        "loaded_kind": distributed.group_kind(local._process_group),
        "params": flat(model),
        "local_params": flat(local_model),
        "local_stats": local.distribution_stats(),
        "copy_kinds": [
            copy.deepcopy(optimizer).distribution_stats()["world_size"],
            copy.deepcopy(local).distribution_stats()["world_size"],
        ],
        "imbalance": plan.ownership.imbalance(),
        "bytes": plan.exchange.bytes_per_refresh,
        "stats": optimizer.distribution_stats(),
    }


def scenario_tiny(rank: int, world: int, out_dir: str) -> dict:
    """Fewer blocks than ranks: some ranks own nothing; a param has no gradient on odd steps."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.randn(3, 3))
    model.v = torch.nn.Parameter(torch.randn(3))
    optimizer = DASH(model.parameters(), lr=0.1, block_size=8, root_method="eigh", root_eps=1e-3)
    for step in range(1, 5):
        optimizer.zero_grad(set_to_none=True)
        loss = (model.w**2).sum()
        if step % 2 == 0:
            loss = loss + (model.v**2).sum()
        loss.backward()
        optimizer.step()
    return {"params": flat(model), "owned": optimizer.distribution_stats()["owned_blocks"]}


def scenario_save(rank: int, world: int, out_dir: str) -> dict:
    model = mixed_model()
    optimizer = DASH(model.parameters(), **OPTIONS)
    train(model, optimizer, range(1, 4))
    if rank == 0:  # rank 0 alone, as nanoGPT, the HF Trainer and Lightning save: no collective
        checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        torch.save(checkpoint, os.path.join(out_dir, "checkpoint.pt"))
    return {"params": flat(model)}


def scenario_resume(rank: int, world: int, out_dir: str) -> dict:
    checkpoint = torch.load(os.path.join(out_dir, "checkpoint.pt"), weights_only=True)
    model = mixed_model()
    model.load_state_dict(checkpoint["model"])
    optimizer = DASH(model.parameters(), **OPTIONS)
    optimizer.load_state_dict(checkpoint["optimizer"])
    train(model, optimizer, range(4, 7))
    return {"params": flat(model)}


def scenario_dcp_save(rank: int, world: int, out_dir: str) -> dict:
    """torch.distributed.checkpoint of the model and DASH after 3 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = mixed_model()
    optimizer = DASH(model.parameters(), **OPTIONS)
    train(model, optimizer, range(1, 4))
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=os.path.join(out_dir, "dcp"))
    return {"params": flat(model)}


def dcp_resume(model: torch.nn.Module, optimizer: DASH, path: str) -> None:
    """Load a checkpoint of scenario_dcp_save into a fresh model and optimizer (any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def scenario_dcp_resume(rank: int, world: int, out_dir: str) -> dict:
    model = mixed_model()
    optimizer = DASH(model.parameters(), **OPTIONS)
    dcp_resume(model, optimizer, os.path.join(out_dir, "dcp"))
    train(model, optimizer, range(4, 7))
    return {"params": flat(model)}


def scenario_mismatch(rank: int, world: int, out_dir: str) -> dict:
    """Rank 1 has a parameter of another shape: every rank must raise a clear ValueError."""
    param = torch.nn.Parameter(torch.randn(4, 4 + rank))
    try:
        DASH([param], process_group="world")
    except TypeError as error:
        type_error = str(error)
    optimizer = DASH([param], lr=0.1)
    param.grad = torch.ones_like(param)
    try:
        optimizer.step()
    except ValueError as error:
        return {"error": str(error), "type_error": type_error}
    return {"error": None, "type_error": type_error}


#: The shapes of the layout report (edge and corner blocks, 3-D, 1-D, size-1 dimensions, a scalar).
LAYOUT_SHAPES = [(37, 23), (5, 3, 7), (100,), (1,), (2, 64), (16, 16), (3, 1, 40), ()]
LAYOUT_METHODS = ("ndb", "newton", "chebyshev", "eigh")


def layout_case(root_method: str, lr: float = 1e-2) -> list[torch.Tensor]:
    """Default DASH with ``block_size=16`` and lr 1e-2 on LAYOUT_SHAPES after 4 steps of random
    gradients, on one torch thread (the results are compared bitwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=generator).requires_grad_() for s in LAYOUT_SHAPES]
        optimizer = DASH(params, lr=lr, block_size=16, root_method=root_method)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        return [p.detach() for p in params]
    finally:
        torch.set_num_threads(threads)


def scenario_layouts(rank: int, world: int, out_dir: str) -> dict:
    return {method: layout_case(method) for method in LAYOUT_METHODS}


def worker(rank: int, world: int, init_file: str, out_dir: str, names: list[str]) -> None:
    """Join the gloo group and run each named scenario of this module."""
    run_scenarios(globals(), rank, world, init_file, out_dir, names)


def run_scenarios(
    scenarios: dict, rank: int, world: int, init_file: str, out_dir: str, names: list[str], **group: object
) -> None:
    """Join the gloo group (``group``: more ``init_process_group`` options) and run each named
    ``scenario_<name>`` of ``scenarios``, saving its result or its traceback."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, **group)
    try:
        for name in names:
            try:
                result = scenarios[f"scenario_{name}"](rank, world, out_dir)
            except Exception:
                result = {"traceback": traceback.format_exc()}
            torch.save(result, os.path.join(out_dir, f"{name}-{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_without_finalizing()
