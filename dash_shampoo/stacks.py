"""Blocks of equal shape become stacks ``(S, m, n)``; factors of equal size become banks ``(K, s, s)``.

Both are built from *runs*: a run is a range of consecutive blocks of one region of one parameter,
and it remembers the first row it occupies. The per-parameter state (``optimizer.state[p]``) keeps
one tensor per region and kind (``"grad_ema.0"``, ``"left.1"``, ...), so it does not depend on how
blocks are stacked. A stack or bank with several runs owns one buffer and the runs' region tensors
become views of its rows; one with a single run is itself a view of that run's region tensor.
Either way nothing is copied during a step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .blocking import Blocking, local_tensor
from .linalg.scaling import hashed_start_vectors
from .preconditioner import due_rows


@dataclass
class BlockRun:
    """Blocks ``[first, first + count)`` of region ``region`` of parameter ``param``; ``row`` is the
    run's first row in its stack (set by :meth:`Stack.add`)."""

    param: torch.Tensor
    blocking: Blocking
    region: int
    first: int
    count: int
    row: int = 0

    @property
    def block(self) -> tuple[int, int]:
        """The shape of the run's blocks."""
        return self.blocking.regions[self.region].block

    @property
    def whole_region(self) -> bool:
        """True when the run covers every block of its region."""
        return self.first == 0 and self.count == self.blocking.regions[self.region].count

    def gather(self, source: torch.Tensor, out: torch.Tensor) -> None:
        """Copy this run's blocks of ``source`` (the parameter's shape) into ``out`` (count, m, n)."""
        region = self.blocking.regions[self.region]
        matrix = source.reshape(self.blocking.matrix_shape)
        if self.whole_region:
            out.view(region.grid[0], region.grid[1], *region.block).copy_(
                region.view(matrix).permute(0, 2, 1, 3)
            )
        else:
            for k in range(self.count):
                out[k].copy_(region.block_view(matrix, self.first + k))

    def subtract_from(self, target: torch.Tensor, update: torch.Tensor, scale: Scale = None) -> None:
        """``target_blocks -= scale · update`` for this run's blocks, in one pass over them;
        ``target`` is a contiguous tensor, ``scale`` None (1), a number, or one per block
        ``(count, 1, 1)``."""
        region = self.blocking.regions[self.region]
        matrix = target.view(self.blocking.matrix_shape)
        per_block = isinstance(scale, torch.Tensor) and scale.dim() == 3
        if self.whole_region:
            gr, gc = region.grid
            blocks = update.view(gr, gc, *region.block).permute(0, 2, 1, 3)
            factor = scale.view(gr, gc, 1, 1).permute(0, 2, 1, 3) if per_block else scale
            _subtract(region.view(matrix), blocks, factor)
        else:
            for k in range(self.count):
                _subtract(
                    region.block_view(matrix, self.first + k), update[k], scale[k] if per_block else scale
                )


#: A factor on an update: none, a number, or a tensor (0-d, or one per block).
Scale = float | torch.Tensor | None


def _subtract(target: torch.Tensor, update: torch.Tensor, scale: Scale) -> None:
    """``target -= scale · update`` in place, one kernel."""
    if scale is None:
        target.sub_(update)
    elif isinstance(scale, torch.Tensor) and not (scale.dim() == 0 and scale.device.type == "cpu"):
        target.addcmul_(update, scale, value=-1)
    else:  # a number (a 0-d CPU tensor, such as a tensor lr, is read without a device sync)
        target.sub_(update, alpha=float(scale))


@dataclass
class Stack:
    """All blocks of one shape ``(m, n)`` in one scope, with their elementwise state."""

    shape: tuple[int, int]
    group_index: int
    scope: tuple
    runs: list[BlockRun] = field(default_factory=list)
    rows: int = 0
    # Where this stack's left and right factors sit in their banks: (bank, first row), or None when
    # that side is not preconditioned (a side of size 1).
    left: tuple[Bank, int] | None = None
    right: tuple[Bank, int] | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    grad: torch.Tensor | None = None  # the gathered gradient blocks of this step

    def add(self, run: BlockRun) -> None:
        """Append ``run`` as the stack's next rows (``run.row`` becomes its first row)."""
        run.row = self.rows
        self.runs.append(run)
        self.rows += run.count

    def of(self, run: BlockRun, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of ``tensor`` (a stack-sized tensor) that belong to ``run``."""
        return tensor[run.row : run.row + run.count]

    def roots(self, side: str) -> torch.Tensor | None:
        """The current inverse roots of this stack's ``side`` factors, ``(S, s, s)``, or None."""
        return self._bank_rows(side, "roots")

    def factors(self, side: str) -> torch.Tensor | None:
        """This stack's ``side`` factors, ``(S, s, s)`` (a view of the bank), or None."""
        return self._bank_rows(side, "factors")

    def _bank_rows(self, side: str, kind: str) -> torch.Tensor | None:
        location = self.left if side == "left" else self.right
        if location is None:
            return None
        bank, first = location
        return getattr(bank, kind)[first : first + self.rows]

    def save_rows(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Copies of the state of the stack's ``rows`` (an index tensor): its elementwise tensors and
        its factors and roots in the banks, as ``(tensor, rows, copy)`` for ``Layout.restore_rows``."""
        saved = [(tensor, rows, tensor[rows]) for tensor in self.tensors.values()]
        for location in (self.left, self.right):
            if location is not None:
                bank, first = location
                saved += [
                    (tensor, rows + first, tensor[rows + first]) for tensor in (bank.factors, bank.roots)
                ]
        return saved

    def statistics_finite(self, rows: torch.Tensor) -> torch.Tensor:
        """Per row of ``rows``: whether its factors and elementwise state are all finite."""
        finite = torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
        tensors = [
            *self.tensors.values(),
            *(f for f in (self.factors("left"), self.factors("right")) if f is not None),
        ]
        for tensor in tensors:
            finite &= torch.isfinite(tensor[rows]).flatten(1).all(dim=1)
        return finite

    def gather_gradients(self, maximize: bool) -> None:
        """Copy every run's gradient blocks into :attr:`grad` (zeros for a parameter without one)."""
        for run in self.runs:
            rows = self.of(run, self.grad)
            if run.param.grad is None:
                rows.zero_()
            else:
                run.gather(local_tensor(run.param.grad), rows)
        if maximize:
            self.grad.neg_()


@dataclass
class BankRow:
    """A run's factors of one side in a bank, from row ``row`` on."""

    run: BlockRun
    side: str
    row: int


@dataclass(frozen=True)
class Due:
    """The rows of a bank whose roots are refreshed at a step.

    Attributes:
        rows: every due row (``"all"`` or an index tensor): their factors are checked on every rank.
        mine: the due rows whose roots this rank computes (``None``: none of them).
        by_rank: with several ranks, each rank's due rows (``"all"``, an index tensor or ``None``)
            and their number, for the exchange of the refreshed roots; ``None`` with one rank.
    """

    rows: torch.Tensor | str
    mine: torch.Tensor | str | None
    by_rank: list[tuple[torch.Tensor | str | None, int]] | None = None


@dataclass
class Bank:
    """Factors of one size ``s`` and root ``p`` in one scope, and their inverse roots.

    Rows are appended stack by stack and side by side, so the factors of one side of one stack
    are a contiguous range of rows (a view, never a gather).
    """

    size: int
    root: int
    group_index: int
    entries: list[BankRow] = field(default_factory=list)
    rows: int = 0
    factors: torch.Tensor | None = None
    roots: torch.Tensor | None = None
    # Per row: the factor's ordinal in the whole layout (stacking-independent; for staggering).
    ordinals: list[int] = field(default_factory=list)
    # With several ranks: per row, the rank that computes its root; this rank; the number of ranks.
    owners: list[int] | None = None
    rank: int = 0
    world_size: int = 1
    _due: dict[tuple[int, ...], Due | None] = field(default_factory=dict)
    _keys: torch.Tensor | None = None
    _start: dict[tuple[int, int, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def add(self, run: BlockRun, side: str, ordinals: range) -> int:
        """Append ``run``'s factors of ``side``; returns the first row they occupy."""
        self.entries.append(BankRow(run, side, self.rows))
        self.ordinals.extend(ordinals)
        self.rows += run.count
        return self.rows - run.count

    def keys(self, rows: torch.Tensor | str) -> torch.Tensor:
        """The factor ordinals of ``rows`` (``"all"`` or an index tensor) as an int64 tensor on the
        bank's device: what identifies a factor in every layout and on every rank."""
        if self._keys is None:
            self._keys = torch.tensor(self.ordinals, dtype=torch.int64, device=self.factors.device)
        return self._keys if isinstance(rows, str) else self._keys.index_select(0, rows)

    def start_vectors(
        self, rows: torch.Tensor | str, count: int, seed: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Power-iteration start vectors ``(rows, n, count)`` of ``rows``: hashed from each factor's
        key and ``seed`` alone (:func:`~dash_shampoo.linalg.scaling.hashed_start_vectors`), so every
        layout and rank starts a factor from the same vectors; made once per bank, then reused."""
        key = (count, seed, dtype)
        if key not in self._start:
            self._start[key] = hashed_start_vectors(self.keys("all"), seed, self.size, count, dtype)
        return select_rows(self._start[key], rows)

    def rows_by_run(self) -> Iterator[tuple[BlockRun, range]]:
        """Each run of the bank with the rows its factors occupy."""
        for entry in self.entries:
            yield entry.run, range(entry.row, entry.row + entry.run.count)

    def due_rows(self, steps: list[int], start: int, frequency: int, stagger: bool) -> Due | None:
        """The rows whose roots are refreshed when the entries' parameters are at ``steps`` (one per
        entry; :func:`~dash_shampoo.preconditioner.due_rows`), or None when there are none.

        The answer depends on each step only through ``(t if t <= start else t mod frequency)``,
        so it is computed once per pattern and cached.
        """
        key = tuple(t if t <= start else -1 - t % frequency for t in steps)
        if key not in self._due:
            per_row = [t for entry, t in zip(self.entries, steps) for _ in range(entry.run.count)]
            rows = due_rows(per_row, self.ordinals, start, frequency, stagger)
            if not rows:
                self._due[key] = None
            elif self.owners is None:
                self._due[key] = Due(self._index(rows), self._index(rows))
            else:
                shares: list[list[int]] = [[] for _ in range(self.world_size)]
                for row in rows:
                    shares[self.owners[row]].append(row)
                by_rank = [(self._index(share), len(share)) for share in shares]
                self._due[key] = Due(self._index(rows), by_rank[self.rank][0], by_rank)
        return self._due[key]

    def reset_broken(self, rows: torch.Tensor | str) -> torch.Tensor:
        """Reset to zero the factors of ``rows`` that are no longer finite (a sum of many huge
        gradients); returns how many (a 0-d tensor). Afterwards every factor of ``rows`` is finite.

        Only the diagonal is read: the factors are sums of ``g gᵀ`` (PSD), whose entries are at most
        the largest diagonal entry, so an overflow shows there first."""
        factors = select_rows(self.factors, rows)
        broken = ~torch.isfinite(factors.diagonal(dim1=-2, dim2=-1)).all(dim=1)
        write_rows(self.factors, rows, factors.masked_fill_(broken[:, None, None], 0.0))
        return broken.sum()

    def _index(self, rows: list[int]) -> torch.Tensor | str | None:
        if not rows:
            return None
        if len(rows) == self.rows:
            return "all"
        return torch.tensor(rows, device=self.factors.device)


def select_rows(tensor: torch.Tensor, rows: torch.Tensor | str) -> torch.Tensor:
    """``tensor`` itself for ``"all"`` rows, else a copy of the ``rows`` (an index tensor)."""
    return tensor if isinstance(rows, str) else tensor.index_select(0, rows)


def write_rows(tensor: torch.Tensor, rows: torch.Tensor | str, values: torch.Tensor) -> None:
    """Write ``values`` into the ``rows`` of ``tensor`` (all of it for ``"all"``; a no-op when
    ``values`` is ``tensor`` itself)."""
    if values is tensor:
        return
    if isinstance(rows, str):
        tensor.copy_(values)
    else:
        tensor.index_copy_(0, rows, values)


def bind(entries: list[tuple[dict, str, int, int, Callable[[], torch.Tensor]]]) -> torch.Tensor:
    """Give a stack or bank one buffer over its runs' region tensors, and re-point them to it.

    Args:
        entries: per run ``(state, key, first, count, make)``: ``state[key]`` is the run's
            whole-region tensor (created by ``make()`` when missing), of which the run covers rows
            ``[first, first + count)``.

    Returns:
        The buffer. With one run it is a view of that run's region tensor; otherwise the runs'
        rows are concatenated into a new buffer and each region tensor is replaced by a view of
        its rows (valid because each run then covers its whole region).
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
