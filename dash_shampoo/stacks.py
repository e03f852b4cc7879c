"""Blocks of equal shape become stacks ``(S, m, n)``; factors of equal size become banks ``(K, s, s)``.

Both are built from *members*: a member is a run of consecutive blocks of one region of one
parameter. The per-parameter state (``optimizer.state[p]``) keeps one tensor per region and kind
(``"grad_ema.0"``, ``"left.1"``, ...), so it does not depend on how blocks are stacked. A stack
or bank with several members owns one buffer and the members' region tensors become views of
its rows; one with a single member is itself a view of that member's region tensor. Either way
nothing is copied during a step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .blocking import BlockPlan


@dataclass
class Member:
    """Blocks ``[first, first + count)`` of region ``region`` of parameter ``param``.

    The member's state rows live in the region tensors of the blocks this rank owns,
    ``[owned_first, owned_first + owned_count)`` (the whole region without distribution).
    """

    param: torch.Tensor
    plan: BlockPlan
    region: int
    first: int
    count: int
    owned_first: int = 0
    owned_count: int = -1

    def __post_init__(self) -> None:
        if self.owned_count < 0:
            self.owned_count = self.plan.regions[self.region].count

    @property
    def whole_region(self) -> bool:
        """True when the member covers every block of its region."""
        return self.first == 0 and self.count == self.plan.regions[self.region].count

    def gather(self, source: torch.Tensor, out: torch.Tensor) -> None:
        """Copy this member's blocks of ``source`` (the parameter's shape) into ``out`` (count, m, n)."""
        region = self.plan.regions[self.region]
        matrix = source.reshape(self.plan.matrix_shape)
        if self.whole_region:
            out.view(region.grid[0], region.grid[1], *region.block).copy_(
                region.view(matrix).permute(0, 2, 1, 3)
            )
        else:
            for k in range(self.count):
                out[k].copy_(region.block_view(matrix, self.first + k))

    def subtract_from(self, target: torch.Tensor, update: torch.Tensor) -> None:
        """``target_blocks -= update`` for this member's blocks; ``target`` is a contiguous tensor."""
        region = self.plan.regions[self.region]
        matrix = target.view(self.plan.matrix_shape)
        if self.whole_region:
            gr, gc = region.grid
            region.view(matrix).sub_(update.view(gr, gc, *region.block).permute(0, 2, 1, 3))
        else:
            for k in range(self.count):
                region.block_view(matrix, self.first + k).sub_(update[k])


@dataclass
class Stack:
    """All blocks of one shape ``(m, n)`` in one scope, with their elementwise state."""

    shape: tuple[int, int]
    group: int
    scope: tuple
    members: list[Member] = field(default_factory=list)
    rows: int = 0
    # Where this stack's left and right factors sit in their banks: (bank, first row), or None when
    # that side is not preconditioned (a side of size 1).
    left: tuple[Bank, int] | None = None
    right: tuple[Bank, int] | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    grad: torch.Tensor | None = None  # the gathered gradient blocks of this step

    def add(self, member: Member) -> int:
        """Append ``member``; returns its first row in the stack."""
        self.members.append(member)
        self.rows += member.count
        return self.rows - member.count


@dataclass
class Bank:
    """Factors of one size ``s`` and root ``p`` in one scope, and their inverse roots.

    Rows are appended stack by stack and side by side, so the factors of one side of one stack
    are a contiguous range of rows (a view, never a gather).
    """

    size: int
    root: int
    group: int
    members: list[tuple[Member, str]] = field(default_factory=list)
    rows: int = 0
    factors: torch.Tensor | None = None
    roots: torch.Tensor | None = None
    # Per row: the factor's ordinal in the whole plan (stacking-independent; for staggering).
    ordinals: list[int] = field(default_factory=list)
    _phase_cache: dict = field(default_factory=dict)

    def add(self, member: Member, side: str, ordinals: range) -> int:
        """Append ``member``'s factors of ``side``; returns the first row they occupy."""
        self.members.append((member, side))
        self.ordinals.extend(ordinals)
        self.rows += member.count
        return self.rows - member.count

    def phase_rows(self, phase: int, frequency: int) -> torch.Tensor | str | None:
        """Rows refreshed at phase ``phase`` of a staggered window of ``frequency`` steps: those
        whose ordinal is ``phase`` modulo ``frequency`` (an index tensor, ``"all"`` or None)."""
        key = (phase, frequency)
        if key not in self._phase_cache:
            rows = [row for row, ordinal in enumerate(self.ordinals) if ordinal % frequency == phase]
            if not rows:
                self._phase_cache[key] = None
            elif len(rows) == self.rows:
                self._phase_cache[key] = "all"
            else:
                self._phase_cache[key] = torch.tensor(rows, device=self.factors.device)
        return self._phase_cache[key]

    def member_rows(self) -> list[int]:
        """First row of each member, in member order."""
        rows, row = [], 0
        for member, _ in self.members:
            rows.append(row)
            row += member.count
        return rows


def bind(entries: list[tuple[dict, str, int, int, Callable[[], torch.Tensor]]]) -> torch.Tensor:
    """Give a stack or bank one buffer over its members' region tensors, and re-point them to it.

    Args:
        entries: per member ``(state, key, first, count, make)``: ``state[key]`` is the member's
            whole-region tensor (created by ``make()`` when missing), of which the member covers
            rows ``[first, first + count)``.

    Returns:
        The buffer. With one member it is a view of that member's region tensor; otherwise the
        members' rows are concatenated into a new buffer and each region tensor is replaced by a
        view of its rows (valid because each member then covers its whole region).
    """
    pieces = []
    for state, key, first, count, make in entries:
        if key not in state:
            state[key] = make()
        pieces.append(state[key][first : first + count])
    if len(pieces) == 1:
        return pieces[0]
    buffer = torch.cat(pieces)
    row = 0
    for state, key, _, count, _ in entries:
        state[key] = buffer[row : row + count]
        row += count
    return buffer
