"""FSDP2 scenarios for tests/test_fsdp.py, run in real gloo process groups.

``python tests/fsdp_worker.py WORLD OUT_DIR SCENARIO...`` spawns ``WORLD`` ranks; each runs the
scenarios in order and writes ``OUT_DIR/<scenario>-<rank>.pt`` (its result or its traceback).

Every rank builds the same model, shards it with ``fully_shard`` and, at each step, gives every
parameter the same full gradient as a DTensor of this rank's rows, so the update can be compared
exactly with one process (FSDP's own reduce-scatter would average identical gradients, which is
not exact in floating point for 3 ranks).
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dash_shampoo import DASH

sys.path.insert(0, os.path.dirname(__file__))
import dist_worker

OPTIONS = dict(lr=1e-2, block_size=8, precondition_frequency=2, weight_decay=0.01)
#: Rows that are multiples of the block size at 1, 2 and 3 ranks: the shards hold whole blocks.
ALIGNED = {"a": (48, 20), "b": (48,), "c": (96, 8)}
#: Uneven shards (torch.chunk: 16 + 15 rows at 2 ranks, 16 + 16 + 14 at 3) that still start on
#: block boundaries and end on the full parameter's bottom edge, so they hold whole blocks.
UNEVEN_ALIGNED = {2: {"e": (31, 8)}, 3: {"e": (46, 8)}}
#: Shards that cut through blocks (20 rows over 2 or 3 ranks; 5 rows over 3), and a (1, 24)
#: parameter that FSDP leaves whole on rank 0.
UNALIGNED = {"u": (20, 13), "v": (5, 16), "w": (1, 24)}


class Model(torch.nn.Module):
    """One module per parameter, so each can be sharded by ``fully_shard``."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.parts = torch.nn.ModuleDict()
        for name, shape in shapes.items():
            part = torch.nn.Module()
            part.weight = torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.1)
            self.parts[name] = part


def gradients(shapes: dict[str, tuple[int, ...]], step: int) -> dict[str, torch.Tensor]:
    """The full gradients of a step (the same on every rank and in the one-process reference)."""
    generator = torch.Generator().manual_seed(1000 + step)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def sharded(shapes: dict[str, tuple[int, ...]], mesh) -> Model:
    model = Model(shapes)
    for part in model.parts.values():
        fully_shard(part, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def set_gradients(model: Model, step: int, shapes: dict[str, tuple[int, ...]]) -> None:
    """Each parameter's gradient: this rank's rows of the step's full gradient."""
    for name, full in gradients(shapes, step).items():
        p = model.parts[name].weight
        if isinstance(p, DTensor):
            local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            index = tuple(slice(o, o + n) for o, n in zip(offset, local_shape))
            p.grad = DTensor.from_local(
                full[index].contiguous(),
                p.device_mesh,
                p.placements,
                run_check=False,
                shape=p.shape,
                stride=p.stride(),
            )
        else:
            p.grad = full.clone()


def train(model: Model, optimizer: DASH, steps: range, shapes: dict[str, tuple[int, ...]]) -> None:
    for step in steps:
        set_gradients(model, step, shapes)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def full_params(model: Model) -> dict[str, torch.Tensor]:
    out = {}
    for name, part in model.parts.items():
        p = part.weight.detach()
        out[name] = p.full_tensor() if isinstance(p, DTensor) else p.clone()
    return out


def reference(shapes: dict[str, tuple[int, ...]], steps: range, **options) -> dict[str, torch.Tensor]:
    """One-process DASH on the unsharded model."""
    model = Model(shapes)
    optimizer = DASH(model.parameters(), process_group=False, **{**OPTIONS, **options})
    train(model, optimizer, steps, shapes)
    return {name: part.weight.detach().clone() for name, part in model.parts.items()}


def mesh_1d():
    return init_device_mesh("cpu", (dist.get_world_size(),))


def scenario_equal(rank: int, world: int, out_dir: str) -> dict:
    """Shards of whole blocks: the same parameters as one process, for every solver."""
    out = {}
    shapes = {**ALIGNED, **UNEVEN_ALIGNED.get(world, {})}
    for method in ("ndb", "eigh"):
        model = sharded(shapes, mesh_1d())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer = DASH(model.parameters(), root_method=method, **OPTIONS)
            train(model, optimizer, range(1, 5), shapes)
        out[method] = {
            "params": full_params(model),
            "local_rows": [p.to_local().shape[0] for p in model.parameters()],
            "reference": reference(shapes, range(1, 5), root_method=method),
            "warnings": [str(w.message) for w in caught],
            "stats": optimizer.distribution_stats(),
        }
    return out


def scenario_unaligned(rank: int, world: int, out_dir: str) -> dict:
    """Shards that cut through blocks: DASH runs, stays finite and says so. Saved and loaded through
    DCP at the same world size, the elementwise state comes back and the factors restart."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    shapes = {**ALIGNED, **UNALIGNED}
    model = sharded(shapes, mesh_1d())
    initial = full_params(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = DASH(model.parameters(), **OPTIONS)
        train(model, optimizer, range(1, 4), shapes)
        saved = {"optim": get_optimizer_state_dict(model, optimizer)}
        path = os.path.join(out_dir, f"dcp-unaligned-{world}")
        dcp.save(saved, checkpoint_id=path)
        at_3 = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]
        train(model, optimizer, range(4, 7), shapes)
        resumed = sharded(shapes, mesh_1d())
        fresh = DASH(resumed.parameters(), **OPTIONS)
        loaded = {"optim": get_optimizer_state_dict(resumed, fresh)}
        dcp.load(loaded, checkpoint_id=path)
        set_optimizer_state_dict(resumed, fresh, loaded["optim"])
    restored = {}  # per parameter: the state keys that came back equal
    for (name, part), before in zip(resumed.parts.items(), at_3):
        after = fresh.state[part.weight]
        restored[name] = sorted(
            {key.split(".")[0] for key, v in before.items() if torch.equal(after[key], v)}
        )
    state = [v for entry in optimizer.state.values() for v in entry.values() if v.is_floating_point()]
    return {
        "finite": all(bool(torch.isfinite(v).all()) for v in [*full_params(model).values(), *state]),
        "moved": {name: float((p - initial[name]).abs().max()) for name, p in full_params(model).items()},
        "warnings": [str(w.message) for w in caught],
        "saved_keys": {fqn: sorted(entry) for fqn, entry in saved["optim"]["state"].items()},
        "restored": restored,
    }


def scenario_dcp_save(rank: int, world: int, out_dir: str) -> dict:
    """torch.distributed.checkpoint of the sharded model and DASH after 3 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = sharded(ALIGNED, mesh_1d())
    optimizer = DASH(model.parameters(), **OPTIONS)
    train(model, optimizer, range(1, 4), ALIGNED)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=os.path.join(out_dir, "dcp"))
    train(model, optimizer, range(4, 7), ALIGNED)
    return {"params": full_params(model)}


def scenario_dcp_resume(rank: int, world: int, out_dir: str) -> dict:
    """Load the checkpoint of ``dcp_save`` (saved at any world size) and finish the run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = sharded(ALIGNED, mesh_1d())
    optimizer = DASH(model.parameters(), **OPTIONS)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "dcp"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    steps = sorted({int(entry["step"]) for entry in optimizer.state.values()})
    train(model, optimizer, range(4, 7), ALIGNED)
    return {"params": full_params(model), "steps_after_load": steps}


def scenario_full_state(rank: int, world: int, out_dir: str) -> dict:
    """The full (unsharded) state: ``get_optimizer_state_dict(full_state_dict=True)`` gathers the
    one-process state dict; it loads back with ``broadcast_from_rank0``, and a one-process DASH
    state dict loads directly with ``load_state_dict`` on every rank."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model = sharded(ALIGNED, mesh_1d())
    optimizer = DASH(model.parameters(), **OPTIONS)
    train(model, optimizer, range(1, 4), ALIGNED)
    full = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    after_3 = {name: part.weight.detach().full_tensor() for name, part in model.parts.items()}

    one = Model(ALIGNED)
    one_optimizer = DASH(one.parameters(), process_group=False, **OPTIONS)
    train(one, one_optimizer, range(1, 4), ALIGNED)
    expected = one_optimizer.state_dict()["state"]
    full_equal = rank != 0 or all(
        torch.equal(full["state"][f"parts.{name}.weight"][key], value)
        for index, name in enumerate(ALIGNED)
        for key, value in expected[index].items()
    )

    def fresh() -> tuple[Model, DASH]:
        resumed = sharded(ALIGNED, mesh_1d())
        for name, part in resumed.parts.items():
            local_shape, offset = compute_local_shape_and_global_offset(
                part.weight.shape, part.weight.device_mesh, part.weight.placements
            )
            rows = after_3[name][offset[0] : offset[0] + local_shape[0]] if local_shape else after_3[name]
            with torch.no_grad():
                part.weight.to_local().copy_(rows)
        return resumed, DASH(resumed.parameters(), **OPTIONS)

    broadcast, broadcast_optimizer = fresh()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(broadcast, broadcast_optimizer, full if rank == 0 else {}, options=options)
    train(broadcast, broadcast_optimizer, range(4, 7), ALIGNED)
    direct, direct_optimizer = fresh()
    direct_optimizer.load_state_dict(one_optimizer.state_dict())
    train(direct, direct_optimizer, range(4, 7), ALIGNED)
    return {
        "full_equal": full_equal,
        "broadcast": full_params(broadcast),
        "direct": full_params(direct),
        "reference": reference(ALIGNED, range(1, 7)),
    }


def scenario_hsdp(rank: int, world: int, out_dir: str) -> dict:
    """HSDP: a (replicas, shards) mesh, (Replicate, Shard(0)) placements."""
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = Model(ALIGNED)
    for part in model.parts.values():
        fully_shard(part, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = DASH(model.parameters(), **OPTIONS)
    train(model, optimizer, range(1, 5), ALIGNED)
    placements = [str(p.placements) for p in model.parameters()]
    return {
        "params": full_params(model),
        "reference": reference(ALIGNED, range(1, 5)),
        "placements": placements,
    }


def worker(rank: int, world: int, init_file: str, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    dist_worker.run_scenarios(globals(), rank, world, init_file, out_dir, names, timeout=timeout)


if __name__ == "__main__":
    world, out_dir, *names = sys.argv[1:]
    init = os.path.join(out_dir, f"init-{world}-{names[0]}")
    mp.start_processes(
        worker, args=(int(world), init, out_dir, names), nprocs=int(world), start_method="spawn"
    )
