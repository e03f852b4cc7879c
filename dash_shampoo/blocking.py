"""How one parameter becomes blocks: a 2-D matrix view cut into full, edge and corner blocks.

A parameter of shape ``s`` is first seen as a matrix ``(R, C)``:

- dimensions of size 1 are dropped (``(1, n)`` is a vector, ``(16, 1, 1, 3)`` is ``(16, 3)``);
- no dimension left (a scalar): ``(1, 1)``;
- one dimension ``E`` (a vector): ``(E, 1)``, a column, so Shampoo keeps only its left factor
  (full-matrix AdaGrad/Adam on length-``B`` chunks, as in DASH); or, with ``one_dim="adam"``, a
  single ``(1, E)`` block that no factor preconditions (plain Adam);
- two or more ``(d0, d1, ..., dk)``: ``(d0, d1·…·dk)`` (the trailing dimensions are merged, like a
  convolution's ``(out, in·kh·kw)``).

The matrix is cut along each side into pieces of ``block_size`` plus one shorter rest piece,
which gives at most four *regions* of equal-shape blocks: full ``(B, B)`` blocks, a right edge of
``(B, c)`` blocks, a bottom edge of ``(r, B)`` blocks and one ``(r, c)`` corner block. A matrix
smaller than a block is a single corner block. Inside a region blocks are numbered row-major over
the block grid. Cutting and putting back are exact inverses of each other.

A shard of rows (an FSDP2 ``Shard(0)`` DTensor's local tensor) is blocked as the rows of its full
parameter's matrix view (:meth:`Blocking.build` with ``full_shape``), so its blocks follow the
shard's boundaries; :meth:`Blocking.places_in` says where they sit among the full matrix's blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class Region:
    """A rectangle of the matrix view tiled by ``grid[0] × grid[1]`` blocks of shape ``block``."""

    row_start: int
    col_start: int
    grid: tuple[int, int]
    block: tuple[int, int]

    @property
    def count(self) -> int:
        """Number of blocks in the region."""
        return self.grid[0] * self.grid[1]

    def view(self, matrix: torch.Tensor) -> torch.Tensor:
        """The region of ``matrix`` as a ``(grid_rows, m, grid_cols, n)`` view (no copy)."""
        (gr, gc), (m, n) = self.grid, self.block
        area = matrix[self.row_start : self.row_start + gr * m, self.col_start : self.col_start + gc * n]
        return area.view(gr, m, gc, n)

    def block_view(self, matrix: torch.Tensor, index: int) -> torch.Tensor:
        """Block ``index`` (row-major over the grid) of ``matrix`` as an ``(m, n)`` view."""
        (_, gc), (m, n) = self.grid, self.block
        i, j = divmod(index, gc)
        r0, c0 = self.row_start + i * m, self.col_start + j * n
        return matrix[r0 : r0 + m, c0 : c0 + n]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose blocks a rank holds: a DTensor's local shard (sharing its storage, so
    in-place updates reach the parameter), any other tensor itself. Call it under ``no_grad``."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def _pieces(length: int, block_size: int) -> list[tuple[int, int, int]]:
    """``(start, count, size)`` runs along one side: full pieces of ``block_size`` then the rest."""
    full, rest = divmod(length, block_size)
    runs = []
    if full:
        runs.append((0, full, block_size))
    if rest:
        runs.append((full * block_size, 1, rest))
    return runs


@dataclass(frozen=True)
class Blocking:
    """The blocking of one parameter: its matrix view and the regions that tile it."""

    shape: tuple[int, ...]
    matrix_shape: tuple[int, int]
    regions: tuple[Region, ...]
    # False for vectors planned with one_dim="adam": no side of their block gets a factor.
    preconditioned: bool = True

    @classmethod
    def build(
        cls,
        shape: torch.Size | tuple[int, ...],
        block_size: int,
        one_dim: Literal["shampoo", "adam"],
        full_shape: torch.Size | tuple[int, ...] | None = None,
    ) -> Blocking:
        """Plan the blocks of a parameter of ``shape`` (see the module docstring); with
        ``full_shape``, ``shape`` is a slice of dim-0 rows of a parameter of that shape, blocked as
        rows of the full parameter's matrix view."""
        full = tuple(shape if full_shape is None else full_shape)
        dims = [d for d in full if d != 1]
        numel = math.prod(shape)
        if len(dims) >= 2:
            columns = math.prod(full) // dims[0]
            matrix_shape = (numel // columns, columns)
        elif one_dim == "adam":
            matrix_shape = (1, numel)
            block_size = max(numel, 1)
        else:
            matrix_shape = (numel, 1)
        regions = tuple(
            Region(r0, c0, (gr, gc), (m, n))
            for r0, gr, m in _pieces(matrix_shape[0], block_size)
            for c0, gc, n in _pieces(matrix_shape[1], block_size)
        )
        return cls(tuple(shape), matrix_shape, regions, preconditioned=matrix_shape[0] != 1 or len(dims) >= 2)

    def places_in(self, full: Blocking, row_offset: int) -> list[tuple[int, int] | None]:
        """Where this blocking's regions sit among the blocks of ``full``, when this is the blocking
        of rows ``[row_offset, ...)`` of ``full``'s matrix: per region ``(full region, first
        block)`` such that block ``k`` of the region is block ``first + k`` of the full region, or
        None where the blocks differ (the shard's row boundaries are not ``full``'s)."""
        places: list[tuple[int, int] | None] = []
        for region in self.regions:
            place = None
            for index, other in enumerate(full.regions):
                rows = row_offset + region.row_start - other.row_start
                if (
                    (other.col_start, other.block, other.grid[1])
                    == (region.col_start, region.block, region.grid[1])
                    and rows >= 0
                    and rows % region.block[0] == 0
                    and rows // region.block[0] + region.grid[0] <= other.grid[0]
                ):
                    place = (index, rows // region.block[0] * other.grid[1])
            places.append(place)
        return places

    def sides(self, region: Region) -> list[tuple[str, int]]:
        """The preconditioned sides of ``region``'s blocks as ``(side, factor size)``: a side of size 1
        gets no factor (its root would be a scalar, which per-block grafting removes anyway)."""
        if not self.preconditioned:
            return []
        return [(side, size) for side, size in zip(("left", "right"), region.block) if size > 1]

    @property
    def num_blocks(self) -> int:
        """Total number of blocks over all regions."""
        return sum(region.count for region in self.regions)

    def matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (of the parameter's shape, contiguous) seen as the ``(R, C)`` matrix."""
        return tensor.view(self.matrix_shape)

    def to_blocks(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Copy ``tensor`` into one ``(count, m, n)`` stack per region."""
        matrix = tensor.reshape(self.matrix_shape)
        out = []
        for region in self.regions:
            (gr, gc), (m, n) = region.grid, region.block
            out.append(region.view(matrix).permute(0, 2, 1, 3).reshape(gr * gc, m, n).clone())
        return out

    def from_blocks(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """The exact inverse of :meth:`to_blocks`: a new tensor of the parameter's shape."""
        out = blocks[0].new_empty(self.shape)
        matrix = out.view(self.matrix_shape)
        for region, stack in zip(self.regions, blocks):
            (gr, gc), (m, n) = region.grid, region.block
            region.view(matrix).copy_(stack.view(gr, gc, m, n).permute(0, 2, 1, 3))
        return out
