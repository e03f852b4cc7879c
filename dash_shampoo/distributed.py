"""Sharing the preconditioner work across ranks: who computes which roots, and their exchange.

This is the one module that knows about ranks: DDP here, FSDP2's DTensor parameters at the end.
With data parallelism (DDP) every rank holds the same averaged gradients, so every rank can keep
the whole optimizer state, as DDP keeps AdamW's:
each rank updates every factor and computes every block's direction (the cheap, per-step work),
while the inverse roots (the expensive work, once per refresh) are split: each rank refreshes the
roots of *its* blocks, and after the refreshes of a step the ranks all-gather the new roots
(:class:`RootExchange`). Steps without a refresh exchange nothing. Because every rank holds the
whole state, ``state_dict()`` on one rank alone (rank 0 under ``torch.save``, as nanoGPT, the
Hugging Face ``Trainer`` and Lightning do) returns the full state without a collective, and a
checkpoint loads into any number of ranks unchanged.

Ownership is planned once, from the blocks in a canonical order (parameter groups, parameters,
regions, blocks row-major), each with the cost of its root refreshes. The sequence is cut into
``world_size`` contiguous segments of nearly equal cost. The plan is a pure function of the
parameter shapes and options, identical on every rank.

Here too: the checks that every rank agrees, and the statistics of the sharing.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import math
import os
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .blocking import Blocking
from .stacks import select_rows, write_rows

if TYPE_CHECKING:
    from .layout import Layout
    from .stacks import Bank, Due


def block_cost(sides: list[int], frequency: int, solver_matmuls: int) -> float:
    """Estimated flops per step of the root refreshes of one block: ``solver_matmuls · 2 s³`` per
    factor of size ``s``, paid once every ``frequency`` steps (the per-step work is done by every
    rank, so it does not count in the sharing)."""
    return sum(solver_matmuls * 2.0 * s**3 for s in sides) / frequency


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


def all_finite(group: Any, local: bool) -> bool:
    """True when ``local`` is true on every rank (one small all-reduce; none without a group)."""
    if group is None:
        return local
    flag = torch.tensor([int(local)], dtype=torch.int32, device=_collective_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def all_gather_flat(group: Any, send: torch.Tensor) -> torch.Tensor:
    """All ranks' equally sized flat buffers, concatenated in rank order (one collective)."""
    _, size = world(group)
    received = send.new_empty(size * send.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(received, send, group=group)
    return received


def all_reduce_sum(group: Any, local: torch.Tensor) -> torch.Tensor:
    """The sum of ``local`` (an int64 tensor) over the ranks, on ``local``'s device."""
    total = local.to(_collective_device(group))
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.to(local.device)


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


def exit_without_finalizing(code: int = 0) -> None:
    """End this rank's process with exit ``code`` now, skipping the interpreter's teardown.

    Call it once the rank's results are on disk and its process group is destroyed. A gloo worker
    thread can still hold the last collective's work (with tensors a Python object owned) for a
    moment after the collective returns; if the interpreter is finalizing when the thread drops
    it, the thread needs the GIL, is made to exit, and the process aborts ("terminate called
    without an active exception"; core dump in ``~AsyncAllgatherWork``; seen in about 1 launch in
    8 of the 2-rank tests and in the trainer's FSDP2 runs under torchrun; pytorch/pytorch PR 179291
    describes it). The launcher then kills the other ranks, which may not have written their
    results yet.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class RootExchange:
    """The all-gather of the roots refreshed at a step: each rank packs the roots it computed
    (bank by bank, in row order) into a buffer of the largest rank's size, and every rank copies
    the other ranks' roots into its banks.

    Args:
        banks: the layout's banks (the same on every rank).
        rank, world_size: this rank and the number of ranks.
    """

    def __init__(self, banks: list[Bank], rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        shares = [0] * world_size
        for bank in banks:
            for owner in bank.owners or []:
                shares[owner] += bank.size * bank.size
        self.element_size = 4  # fp32
        # Bytes each rank receives in a step that refreshes every root.
        self.bytes_per_refresh = max(shares) * world_size * self.element_size
        self.bytes_received = 0

    def run(self, group: Any, refreshed: list[tuple[Bank, Due]]) -> None:
        """Exchange the roots of the ``refreshed`` ``(bank, due rows)`` of this step."""
        sizes = [
            sum(due.by_rank[r][1] * bank.size * bank.size for bank, due in refreshed)
            for r in range(self.world_size)
        ]
        width = max(sizes, default=0)
        if width == 0:
            return
        device = refreshed[0][0].roots.device
        send = torch.zeros(width, dtype=torch.float32, device=device)
        offset = 0
        for bank, due in refreshed:
            rows, count = due.by_rank[self.rank]
            if count:
                roots = select_rows(bank.roots, rows)
                send[offset : offset + roots.numel()].copy_(roots.flatten())
                offset += roots.numel()
        received = all_gather_flat(group, send)
        self.bytes_received += received.numel() * self.element_size
        for r in range(self.world_size):
            if r == self.rank:
                continue  # its own roots are in place already
            offset = r * width
            for bank, due in refreshed:
                rows, count = due.by_rank[r]
                if count:
                    size = count * bank.size * bank.size
                    roots = received[offset : offset + size].view(count, bank.size, bank.size)
                    write_rows(bank.roots, rows, roots)
                    offset += size


def sharing_stats(group: Any, layout: Layout | None) -> dict[str, Any]:
    """How the work is shared: world size, this rank, the cost imbalance ``max/mean`` over ranks,
    the blocks whose roots this rank computes, the bytes it receives in a step that refreshes every
    root and in all steps so far (the last four after the first step has built ``layout``; ``None``,
    ``None``, 0, 0 before)."""
    rank, world_size = world(group)
    own = layout.rank if layout else 0  # with DTensor parameters the layout is this rank's alone
    ownership = layout.ownership if layout else None
    exchange = layout.exchange if layout else None
    return {
        "world_size": world_size,
        "rank": rank,
        "imbalance": ownership.imbalance() if ownership else None,
        "owned_blocks": ownership.bounds[own + 1] - ownership.bounds[own] if ownership else None,
        "bytes_per_refresh": exchange.bytes_per_refresh if exchange else 0,
        "bytes_received": exchange.bytes_received if exchange else 0,
    }


# ---------------------------------------------------------------------------------------------
# FSDP2: DTensor parameters sharded by rows
# ---------------------------------------------------------------------------------------------
#
# FSDP2's ``fully_shard`` makes each parameter a DTensor sharded by dim-0 rows (``Shard(0)``; HSDP
# adds ``Replicate()`` on a second mesh dimension) and reduce-scatters the gradients, so a rank
# holds rows ``[offset, offset + rows)`` of the parameter and of its gradient. DASH blocks that
# shard as rows of the full parameter's matrix view: the step needs no communication of its own,
# and where the shard boundaries fall on block boundaries its blocks are the full parameter's
# blocks, so the update is the one-process update. The state of a parameter is saved as DTensors
# over the parameter's mesh, so torch.distributed.checkpoint can reshard it
# (:func:`dash_shampoo.layout.export_sharded_state`).


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def check_placements(param: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless the DTensor ``param`` is sharded by rows or replicated on each
    mesh dimension (what FSDP2 and HSDP make)."""
    from torch.distributed.tensor import Shard

    for placement in param.placements:
        if not (placement.is_replicate() or (type(placement) is Shard and placement.dim == 0)):
            raise ValueError(
                f"{name} is a DTensor with placements {tuple(param.placements)}: DASH takes DTensor "
                "parameters sharded by rows (Shard(0), as FSDP2's fully_shard makes them) or "
                f"replicated, not {placement!r} (tensor parallelism or partial sums)"
            )


def chunk(length: int, parts: int, index: int) -> tuple[int, int]:
    """``(start, size)`` of piece ``index`` when ``length`` is cut as ``torch.chunk`` cuts it (what a
    DTensor ``Shard`` placement holds): pieces of ``ceil(length / parts)``, the last ones shorter
    or empty."""
    size = -(-length // parts)
    start = min(index * size, length)
    return start, min(size, length - start)


def shard_rows(
    length: int, mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence
) -> tuple[int, int]:
    """``(offset, rows)`` of dim 0 of a tensor of dim-0 ``length`` held at mesh ``coordinate``."""
    offset, rows = 0, length
    for placement, parts, index in zip(placements, mesh_shape, coordinate):
        if not placement.is_replicate():
            start, rows = chunk(rows, parts, index)
            offset += start
    return offset, rows


@dataclass(frozen=True)
class RowShard:
    """How a DTensor parameter's local tensor sits in the full parameter.

    Attributes:
        full: the blocking of the full parameter.
        local: the blocking of this rank's rows.
        rows: the ``(first, count)`` of the dim-0 rows this rank holds.
        offset: this rank's first row of the full parameter's matrix view.
        places: per region of ``local``, ``(full region, first block)`` (:meth:`Blocking.places_in`),
            or None where the shard's blocks are not the full parameter's.
        exact: the region tensors of every rank are, in every mesh coordinate, exactly the rows a
            ``Shard(0)`` DTensor of the full region tensor would hold, so the state is saved in the
            one-process layout and reshards; else it is saved per element
            (:func:`dash_shampoo.layout.export_sharded_state`).
        mesh, placements: the parameter's device mesh and placements.
    """

    full: Blocking
    local: Blocking
    rows: tuple[int, int]
    offset: int
    places: list[tuple[int, int] | None]
    exact: bool
    mesh: Any
    placements: tuple

    @property
    def same_blocks(self) -> bool:
        """Whether this rank's blocks are blocks of the full parameter (the one-process update)."""
        return all(place is not None for place in self.places)


def row_shard(param: torch.Tensor, block_size: int, one_dim: str) -> RowShard:
    """The :class:`RowShard` of a DTensor parameter (placements checked by :func:`check_placements`)."""
    mesh, placements = param.device_mesh, tuple(param.placements)
    full_shape = tuple(param.shape)
    full = Blocking.build(full_shape, block_size, one_dim)  # type: ignore[arg-type]
    rows = shard_rows(full_shape[0], mesh.shape, mesh.get_coordinate(), placements) if full_shape else (0, 1)
    if full.matrix_shape[0] == 1:  # a scalar, or a vector blocked as one (1, E) row: sharded by columns
        local = Blocking.build(tuple(param.to_local().shape), block_size, one_dim)  # type: ignore[arg-type]
        return RowShard(full, local, rows, 0, [None] * len(local.regions), False, mesh, placements)

    def blocking_at(coordinate: Sequence[int]) -> tuple[int, Blocking]:
        first, count = shard_rows(full_shape[0], mesh.shape, coordinate, placements)
        shape = (count, *full_shape[1:])
        local = Blocking.build(shape, block_size, one_dim, full_shape=full_shape)  # type: ignore[arg-type]
        # Dim 0 is the matrix's rows, unless it has size 1 (then one rank holds every row).
        return (first if full_shape[0] > 1 else first * full.matrix_shape[0]), local

    offset, local = blocking_at(mesh.get_coordinate())
    exact = True
    for coordinate in itertools.product(*(range(n) for n in mesh.shape)):
        other_offset, other = blocking_at(coordinate)
        held = {
            place[0]: (place[1], r.count)
            for place, r in zip(other.places_in(full, other_offset), other.regions)
            if place
        }
        if len(held) < len(other.regions):
            exact = False
            break
        for index, region in enumerate(full.regions):
            start, size = shard_rows(region.count, mesh.shape, coordinate, placements)
            first, count = held.get(index, (start, 0))
            if (count, first if count else start) != (size, start):
                exact = False
        if not exact:
            break
    return RowShard(full, local, rows, offset, local.places_in(full, offset), exact, mesh, placements)


def local_rows(value: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Rows ``[first, first + count)`` of a saved region tensor: a DTensor's local tensor (it was
    saved from, or loaded into, these very rows) or a slice of a full tensor."""
    if is_dtensor(value):
        return value.to_local()
    return value[first : first + count]


def as_dtensor(local: torch.Tensor, shard: RowShard, full_shape: Sequence[int]) -> torch.Tensor:
    """``local`` as this rank's rows of a DTensor of ``full_shape`` on the parameter's mesh."""
    from torch.distributed.tensor import DTensor

    full_shape = tuple(full_shape)
    stride = tuple(math.prod(full_shape[i + 1 :]) for i in range(len(full_shape)))
    return DTensor.from_local(
        local.contiguous(), shard.mesh, shard.placements, run_check=False, shape=full_shape, stride=stride
    )
