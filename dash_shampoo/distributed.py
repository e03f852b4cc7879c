"""Sharing the preconditioner work across ranks: who owns which blocks, and one exchange per step.

This is the one module that knows about ranks. With data parallelism (DDP) every rank holds the
same averaged gradients, so each rank only needs to refresh the roots and compute the updates of
*its* blocks; the ranks then all-gather the updates and every rank applies all of them, so the
parameters stay identical everywhere.

Ownership is planned once, from the blocks in a canonical order (parameter groups, parameters,
regions, blocks row-major), each with a cost estimate. The sequence is cut into ``world_size``
contiguous segments of nearly equal cost, so a rank owns at most one contiguous run of blocks per
region, its stacks stay batched, and one huge embedding is shared by several ranks. The plan is a
pure function of the parameter shapes and options, identical on every rank.

Here too: the update exchange (:class:`Exchange`), the checks that every rank agrees, and the
gathering of each rank's share of the state into one per-parameter state (:func:`merge_states`)
for ``state_dict`` and for re-planning.

Fully sharded parameters (FSDP2 ``fully_shard``, DTensor) fit the same scheme: the owner of a block
must then also hold its gradient rows, so the plan would cut at shard boundaries (each rank owns
the blocks inside its shard, ``Shard(0)`` rows of the matrix view), the gradient gather reads the
local shard, and the exchange becomes unnecessary (each rank updates its own shard). Only this
module and the run gather/scatter would change.
"""

from __future__ import annotations

import bisect
import ctypes
import math
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .layout import Layout
    from .stacks import BlockRun, Stack


def block_cost(block: tuple[int, int], sides: list[int], frequency: int, solver_matmuls: int) -> float:
    """Estimated flops of one block per step.

    Refresh: ``solver_matmuls · 2 s³`` per factor of size ``s``, paid once every ``frequency``
    steps. Step: the factor products ``g gᵀ``, ``gᵀ g`` and the preconditioning ``L G R``, about
    ``4 m n (m + n)``.
    """
    m, n = block
    refresh = sum(solver_matmuls * 2.0 * s**3 for s in sides) / frequency
    return refresh + 4.0 * m * n * (m + n)


def split_costs(costs: list[float], parts: int) -> list[int]:
    """Cut ``costs`` into ``parts`` contiguous segments of nearly equal sum.

    Returns the ``parts + 1`` boundaries ``b`` (segment ``r`` is ``costs[b[r]:b[r+1]]``): boundary
    ``k`` is the first index whose prefix sum reaches ``k/parts`` of the total, so no segment
    exceeds its share by more than one element's cost. Segments may be empty.
    """
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    total = prefix[-1]
    bounds = [0]
    for k in range(1, parts):
        target = total * k / parts
        index = bisect.bisect_left(prefix, target) if total > 0 else len(costs) * k // parts
        # Choose the nearer of the two prefix points around the target.
        if 0 < index <= len(costs) and target - prefix[index - 1] < prefix[index] - target:
            index -= 1
        bounds.append(min(max(index, bounds[-1]), len(costs)))
    bounds.append(len(costs))
    return bounds


@dataclass
class Ownership:
    """Which rank owns which blocks: ``bounds`` cut the canonical block sequence per rank."""

    bounds: list[int]
    costs: list[float]

    def owner_of(self, index: int) -> int:
        """Rank owning block ``index`` of the canonical sequence."""
        return bisect.bisect_right(self.bounds, index) - 1

    def chunks(self, start: int, count: int) -> list[tuple[int, int, int]]:
        """Split blocks ``[start, start + count)`` by owner: ``(rank, first, count)`` with ``first``
        relative to ``start``."""
        out = []
        index = start
        while index < start + count:
            rank = self.owner_of(index)
            end = min(self.bounds[rank + 1], start + count)
            out.append((rank, index - start, end - index))
            index = end
        return out

    def imbalance(self) -> float:
        """``max / mean`` of the ranks' total costs (1.0 is perfect balance)."""
        loads = [sum(self.costs[a:b]) for a, b in zip(self.bounds, self.bounds[1:])]
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0


def resolve_group(process_group: Any) -> Any:
    """The process group to use: the given one, the default one if initialised, or ``None``.

    ``False`` opts out: ``None`` (this process computes every block) even when a group exists.
    """
    if process_group is False:
        return None
    if process_group is None:
        if dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialised")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be None, False or a torch.distributed.ProcessGroup; "
            f"got {type(process_group).__name__}"
        )
    if dist.get_rank(process_group) < 0:
        raise ValueError("process_group does not contain this rank")
    return process_group


def world(group: Any) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (``(0, 1)`` without distribution)."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_same_everywhere(group: Any, fingerprint: list) -> None:
    """Raise ``ValueError`` unless every rank has the same parameter shapes and layout options."""
    if group is None:
        return
    gathered = all_gather_object(group, fingerprint)
    for rank, other in enumerate(gathered):
        if other != fingerprint:
            for mine, theirs in zip(fingerprint, other):
                if mine != theirs:
                    raise ValueError(
                        f"DASH needs the same parameters and options on every rank; rank {rank} has "
                        f"{theirs} where this rank has {mine}"
                    )
            raise ValueError(
                f"DASH needs the same parameters on every rank; rank {rank} has {len(other)} parameters "
                f"where this rank has {len(fingerprint)}"
            )


def all_finite(group: Any, local: torch.Tensor) -> bool:
    """True when ``local`` (a 0-d bool tensor) is true on every rank (one host synchronisation)."""
    if group is None:
        return bool(local)
    flag = local.to(device=_collective_device(group), dtype=torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def all_gather_updates(group: Any, send: torch.Tensor) -> torch.Tensor:
    """All ranks' equally sized flat update buffers, concatenated in rank order (one collective)."""
    _, size = world(group)
    received = send.new_empty(size * send.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(received, send, group=group)
    return received


def gather_state(group: Any, local: dict[int, dict[str, Any]]) -> list[dict[int, dict[str, Any]]]:
    """Every rank's per-parameter state (tensors moved to the CPU), in rank order."""
    cpu = {
        index: {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        for index, entry in local.items()
    }
    return all_gather_object(group, cpu)


def _collective_device(group: Any) -> torch.device:
    """Where the tensors of a collective on ``group`` must live (the GPU for NCCL)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(group: Any, obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order: tensors, containers and plain values.

    Like ``dist.all_gather_object``, which needs numpy to decode what it receives; this one does
    not: each object is pickled (as there; the bytes come from this job's own ranks), the byte
    counts are all-gathered, then the bytes padded to the longest, and each part is unpickled.
    """
    _, size = world(group)
    payload = pickle.dumps(obj)
    device = _collective_device(group)
    count = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count, group=group)
    lengths = [int(c) for c in counts]
    send = torch.zeros(max(lengths), dtype=torch.uint8)
    send[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    send = send.to(device)
    received = [torch.empty_like(send) for _ in range(size)]
    dist.all_gather(received, send, group=group)
    objects = []
    for part, length in zip(received, lengths):
        part = part.cpu().contiguous()
        data = ctypes.string_at(part.data_ptr(), length)
        objects.append(pickle.loads(data))
    return objects


def group_kind(group: Any) -> str:
    """``"none"`` (no distribution), ``"default"`` (the default group) or ``"custom"``: what a copy or
    an unpickled optimizer can restore (a ProcessGroup itself cannot be copied)."""
    if group is None:
        return "none"
    return "default" if group is dist.group.WORLD else "custom"


def keep_owned_rows(state: dict, region: int, count: int, first: int, owned: int) -> None:
    """Cut a parameter's whole-region tensors (loaded or regathered) of region ``region`` (``count``
    blocks) down to the ``owned`` rows from ``first`` that this rank owns (maybe none)."""
    suffix = f".{region}"
    for key, tensor in list(state.items()):
        if not key.endswith(suffix):
            continue
        if owned == 0:
            del state[key]
        elif tensor.shape[0] == count and owned != count:
            state[key] = tensor[first : first + owned].clone()


#: State entries of a whole parameter (the others are region tensors, one row per block).
PER_PARAMETER = ("step", "shape")


def merge_states(group: Any, local: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Every rank's share of the per-parameter state ``local`` (by parameter index), joined in block
    order: each region tensor is the concatenation of the ranks' rows (ranks own contiguous runs in
    rank order); the step counters and shapes are the same everywhere."""
    merged: dict[int, dict[str, Any]] = {}
    for rank_state in gather_state(group, local):
        for index, entry in rank_state.items():
            target = merged.setdefault(index, {})
            for key, value in entry.items():
                if key in PER_PARAMETER or key not in target:
                    target[key] = value
                else:
                    target[key] = torch.cat([target[key], value])
    return dict(sorted(merged.items()))


def _run_size(run: BlockRun) -> int:
    return run.count * math.prod(run.block)


class Exchange:
    """The flat all-gather of update blocks: each rank packs its runs' updates in canonical order
    into a buffer of the largest rank's size; every rank then applies every rank's part.

    Args:
        stacks: this rank's stacks.
        runs_by_rank: every rank's owned runs in canonical order.
        rank: this rank.
        dtype: dtype of the exchanged updates.
    """

    def __init__(
        self, stacks: list[Stack], runs_by_rank: list[list[BlockRun]], rank: int, dtype: torch.dtype
    ) -> None:
        self.runs_by_rank = runs_by_rank
        self.sizes = [sum(_run_size(run) for run in runs) for runs in runs_by_rank]
        self.width = max(self.sizes)
        self.dtype = dtype
        # Where each of this rank's owned runs starts in the send buffer.
        offsets: dict[tuple[int, int, int], int] = {}
        offset = 0
        for run in runs_by_rank[rank]:
            offsets[id(run.param), run.region, run.first] = offset
            offset += _run_size(run)
        self.placements = [
            [
                offsets[id(run.param), run.region, run.owned_first]
                + (run.first - run.owned_first) * math.prod(stack.shape)
                for run in stack.runs
            ]
            for stack in stacks
        ]

    @property
    def bytes_per_step(self) -> int:
        """Bytes each rank receives per step from the all-gather."""
        return self.width * len(self.runs_by_rank) * torch.empty((), dtype=self.dtype).element_size()

    def run(
        self,
        group: Any,
        stacks: list[Stack],
        updates: list[torch.Tensor],
        targets: dict[torch.Tensor, torch.Tensor],
        active: set[torch.Tensor],
    ) -> None:
        """Exchange the updates and subtract every rank's blocks from the active parameters."""
        device = next(iter(targets.values())).device
        send = torch.zeros(self.width, dtype=self.dtype, device=device)
        for stack, update, places in zip(stacks, updates, self.placements):
            for run, place in zip(stack.runs, places):
                if run.param in active:
                    piece = send[place : place + _run_size(run)].view(run.count, *stack.shape)
                    piece.copy_(stack.of(run, update))
        received = all_gather_updates(group, send)
        for rank, runs in enumerate(self.runs_by_rank):
            offset = rank * self.width
            for run in runs:
                size = _run_size(run)
                if run.param in active:
                    update = received[offset : offset + size].view(run.count, *run.block)
                    run.subtract_from(targets[run.param], update)
                offset += size


def sharing_stats(group: Any, layout: Layout | None) -> dict[str, Any]:
    """How the work is shared: world size, this rank, the cost imbalance ``max/mean`` over ranks,
    the blocks this rank owns and the bytes it receives per step (the last three after the first
    step has built ``layout``; ``None``, ``None``, 0 before)."""
    rank, world_size = world(group)
    return {
        "world_size": world_size,
        "rank": rank,
        "imbalance": layout.ownership.imbalance() if layout else None,
        "owned_blocks": sum(stack.rows for stack in layout.stacks) if layout else None,
        "bytes_per_step": layout.exchange.bytes_per_step if layout and layout.exchange else 0,
    }
