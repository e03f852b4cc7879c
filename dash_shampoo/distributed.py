"""Sharing the preconditioner work across ranks: who computes which roots, and their exchange.

This is the one module that knows about ranks. With data parallelism (DDP) every rank holds the
same averaged gradients, so every rank can keep the whole optimizer state, as DDP keeps AdamW's:
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
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

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


def all_finite(group: Any, local: torch.Tensor) -> bool:
    """True when ``local`` (a 0-d bool tensor) is true on every rank (one host synchronisation)."""
    if group is None:
        return bool(local)
    flag = local.to(device=_collective_device(group), dtype=torch.int32).reshape(1)
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
    ownership = layout.ownership if layout else None
    exchange = layout.exchange if layout else None
    return {
        "world_size": world_size,
        "rank": rank,
        "imbalance": ownership.imbalance() if ownership else None,
        "owned_blocks": ownership.bounds[rank + 1] - ownership.bounds[rank] if ownership else None,
        "bytes_per_refresh": exchange.bytes_per_refresh if exchange else 0,
        "bytes_received": exchange.bytes_received if exchange else 0,
    }
