"""The layout of one DASH optimizer: which blocks go into which stack, which factors into which bank.

It is built in four passes from explicit inputs (the parameter groups, the per-parameter state,
the parameters with a gradient now, the stacking mode, this rank and the world size):

1. regions (:func:`collect_regions`): every parameter's blocking and regions, in the canonical
   order (groups, parameters, regions), marking the parameters that are used (have state or a
   gradient);
2. ownership: each block's estimated cost, and the contiguous share of the canonical block
   sequence whose roots each rank computes (:class:`dash_shampoo.distributed.Ownership`);
3. stacks and banks: the runs of blocks grouped by scope and block shape into stacks, and each
   stack's factors appended, stack by stack, to the bank of their scope, size and root, so every
   stack sees its factors as contiguous bank rows; every rank holds every block (the state is
   replicated, as DDP replicates AdamW's), and each bank row knows the rank that refreshes it;
4. bind: every stack and bank buffer allocated or viewed from the per-parameter state tensors.

A parameter without a gradient yet still counts in the ownership (so ownership stays the same
when it starts later) but gets no stack rows until it is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import distributed
from .blocking import Blocking
from .linalg import RootOptions
from .linalg.roots import root_matmuls
from .options import check_group
from .stacks import Bank, BlockRun, Scale, Stack, bind

#: The parameters with a gradient this step, by ``id`` (dynamo traces no sets of tensors).
Active = dict[int, torch.Tensor]

#: State entries of a whole parameter (the others are region tensors, one row per block).
PER_PARAMETER = ("step", "shape")

# Group options that decide how blocks are cut, stacked and inverted: changing one re-plans.
LAYOUT_KEYS = (
    "block_size",
    "one_dim",
    "matrix_root",
    "precondition_frequency",
    "start_preconditioning_step",
    "stagger",
    "root_method",
    "root_eps",
    "root_eps_relative",
    "root_steps",
    "root_tol",
    "scaling",
    "scaling_steps",
    "num_vectors",
    "safety",
    "precision",
    "eigen_fix",
    "chebyshev_degree",
    "chebyshev_interval_lower",
    "grafting",
    "momentum",
)


def signature(groups: Sequence[dict[str, Any]]) -> tuple:
    """The layout options of every group: a layout is rebuilt when this changes."""
    return tuple(tuple(_freeze(group[key]) for key in LAYOUT_KEYS) for group in groups)


def _freeze(value: Any) -> Any:
    return float(value) if isinstance(value, torch.Tensor) else value


def matrix_root(group: dict[str, Any], sides: int) -> int:
    """``p`` of a block's factors: the group's ``matrix_root``, else 4 with two sides and 2 with one."""
    return group["matrix_root"] or (4 if sides == 2 else 2)


def elementwise_kinds(group: dict[str, Any]) -> list[str]:
    """The per-block state a group keeps besides the factors: gradient EMA, second moment, momentum."""
    kinds = []
    if group["betas"][0] > 0:
        kinds.append("grad_ema")
    if group["grafting"] in ("adam", "rmsprop", "adagrad"):
        kinds.append("moment")
    if group["momentum"] > 0:
        kinds.append("momentum")
    return kinds


# ---------------------------------------------------------------------------------------------
# Pass 1: regions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionEntry:
    """One region of one parameter in the canonical order."""

    group_index: int
    param_index: int
    param: torch.Tensor
    blocking: Blocking
    region: int
    used: bool
    # Factor ordinal of side ``k``, block ``b`` of the region: ``ordinal + k * stride + b``. It
    # numbers the factors of the full (unsharded) parameters in canonical order, so it is the same
    # in every stacking mode and on every rank; it keys the power-iteration start vectors and the
    # staggering.
    ordinal: int
    stride: int

    @property
    def count(self) -> int:
        """Blocks in the region."""
        return self.blocking.regions[self.region].count

    @property
    def sides(self) -> list[tuple[str, int]]:
        """The region's preconditioned sides as ``(side, factor size)``."""
        return self.blocking.sides(self.blocking.regions[self.region])


@dataclass
class Regions:
    """Pass 1's result: the regions, the used parameters and a fingerprint that every rank must share."""

    entries: list[RegionEntry] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)
    fingerprint: list = field(default_factory=list)
    shards: dict[torch.Tensor, distributed.RowShard] = field(default_factory=dict)


def collect_regions(
    groups: Sequence[dict[str, Any]], state: dict[torch.Tensor, dict], active: Active
) -> Regions:
    """Every parameter's regions in canonical order; a parameter is used when it has a gradient now
    (in ``active``) or state from an earlier step. Changes nothing.

    Raises:
        ValueError: a used parameter's state does not fit it (:func:`check_state`: saved for another
            parameter shape, or with another ``block_size``).
    """
    regions = Regions()
    ordinal = 0
    for g_index, group in enumerate(groups):
        for p_index, p in enumerate(group["params"]):
            # Reading state[p] of a defaultdict would create an entry; torch's optimizers create none.
            used = p.numel() > 0 and (id(p) in active or (p in state and "step" in state[p]))
            regions.fingerprint.append((g_index, p_index, tuple(p.shape), used))
            if p.numel() == 0:
                continue
            if used:
                regions.params.append(p)
            full, blocking, places, shard = param_blocking(p, group)
            if shard is not None:
                regions.shards[p] = shard
            if used and p in state:
                check_state(state[p], p, blocking, group, f"parameter {p_index} of group {g_index}", False)
            region_ordinals = [ordinal]
            for region in full.regions:
                region_ordinals.append(region_ordinals[-1] + len(full.sides(region)) * region.count)
            for r_index, place in enumerate(places):
                if place is None:  # a shard's blocks that are no full blocks: any numbers will do
                    start, stride = region_ordinals[0] + r_index, blocking.regions[r_index].count
                else:
                    start = region_ordinals[place[0]] + place[1]
                    stride = full.regions[place[0]].count
                regions.entries.append(
                    RegionEntry(g_index, p_index, p, blocking, r_index, used, start, stride)
                )
            ordinal = region_ordinals[-1]
    regions.fingerprint.append(signature(groups))
    return regions


def param_blocking(
    p: torch.Tensor, group: dict[str, Any]
) -> tuple[Blocking, Blocking, list[tuple[int, int] | None], distributed.RowShard | None]:
    """``(full blocking, this rank's blocking, places, shard)`` of a parameter: for a plain one the
    same blocking twice, each region its own place and no shard; for a DTensor its
    :class:`~dash_shampoo.distributed.RowShard`'s."""
    if distributed.is_dtensor(p):
        shard = distributed.row_shard(p, group["block_size"], group["one_dim"])
        return shard.full, shard.local, shard.places, shard
    blocking = Blocking.build(p.shape, group["block_size"], group["one_dim"])
    return blocking, blocking, [(r, 0) for r in range(len(blocking.regions))], None


def checked_saved_state(
    saved: dict[int, dict[str, Any]],
    saved_groups: list[dict[str, Any]],
    groups: list[dict[str, Any]],
    defaults: dict[str, Any],
) -> dict[int, dict[str, Any]]:
    """``saved`` (a state dict's ``state``) ready to load into ``groups``, before anything is loaded:
    the entry of every DTensor parameter replaced by this rank's rows (:func:`import_sharded_state`,
    warning about the parameters whose factors restart), and each entry checked against the
    parameter it loads into, with the saved group's options (:func:`check_state`, complete). The
    groups must hold as many parameters as the saved ones."""
    out, restarted = dict(saved), []
    for g_index, (saved_group, group) in enumerate(zip(saved_groups, groups)):
        options = {**defaults, **saved_group}
        check_group(options)
        for p_index, (index, p) in enumerate(zip(saved_group["params"], group["params"])):
            if index not in saved or p.numel() == 0:
                continue
            name = f"parameter {p_index} of group {g_index}"
            _, blocking, _, shard = param_blocking(p, options)
            if shard is not None:
                out[index], reset = import_sharded_state(saved[index], p, shard, options)
                if reset:
                    restarted.append(f"{name} (shape {tuple(p.shape)})")
            check_state(out[index], p, blocking, options, name, True)
    if restarted:
        warnings.warn(
            f"the state dict has no factors for this rank's blocks of {', '.join(restarted)}: their "
            "factors restart from zero (the elementwise state is loaded)",
            stacklevel=3,
        )
    return out


def export_sharded_states(state: dict[int, dict[str, Any]], groups: Sequence[dict[str, Any]]) -> None:
    """Replace, in a state dict's ``state``, the entry of every DTensor parameter by its saved form
    (:func:`export_sharded_state`), warning about the parameters whose factors are left out."""
    left_out = []
    for index, (p, group) in enumerate((p, g) for g in groups for p in g["params"]):
        if index in state and distributed.is_dtensor(p):
            state[index], factors_left_out = export_sharded_state(state[index], p, group)
            if factors_left_out:
                left_out.append(f"parameter {index} (shape {tuple(p.shape)})")
    if left_out:
        warnings.warn(
            "DASH saves the factors of DTensor parameters only where every shard holds whole blocks "
            "of the full parameter, as a DTensor of the full layout would hold them; for "
            f"{', '.join(left_out)} it saves the elementwise state and the factors restart when loaded "
            "(a block_size that divides every shard's rows avoids this)",
            stacklevel=3,
        )


def check_state(
    entry: dict[str, Any],
    param: torch.Tensor,
    blocking: Blocking,
    group: dict[str, Any],
    name: str,
    complete: bool,
) -> None:
    """Check a parameter's state against the blocks its options give: every region tensor present
    has the shape ``(blocks, m, n)`` or ``(blocks, s, s)`` of its region; with ``complete`` (a loaded
    state) the step counter and every tensor the options need must be there too.

    Raises:
        ValueError: naming the parameter (``name``), the key and both shapes.
    """
    if complete and "step" not in entry:
        raise ValueError(f"the saved state of {name} (shape {tuple(param.shape)}) has no 'step'")
    if "shape" in entry and tuple(entry["shape"].tolist()) != tuple(param.shape):
        raise ValueError(
            f"the saved state of {name} was saved for a parameter of shape {tuple(entry['shape'].tolist())}, "
            f"not {tuple(param.shape)}; load it into the parameter it was saved for"
        )
    kinds = elementwise_kinds(group)
    for r, region in enumerate(blocking.regions):
        shapes = region_shapes(blocking, r, kinds)
        expected = {f"{kind}.{r}": (region.count, *shape) for kind, shape in shapes.items()}
        for key, shape in expected.items():
            if key not in entry:
                if complete:
                    raise ValueError(
                        f"the saved state of {name} (shape {tuple(param.shape)}) lacks {key!r} "
                        f"(a tensor of shape {shape} with these options)"
                    )
                continue
            got = (
                tuple(entry[key].shape) if isinstance(entry[key], torch.Tensor) else type(entry[key]).__name__
            )
            if got != shape:
                raise ValueError(
                    f"the saved state of {name} (shape {tuple(param.shape)}) has {key!r} of shape {got}, "
                    f"but block_size {group['block_size']} gives {shape}; load it with the block_size it "
                    "was saved with, into a parameter of the shape it was saved for"
                )


def region_shapes(blocking: Blocking, r: int, kinds: list[str]) -> dict[str, tuple[int, ...]]:
    """The state tensors of region ``r``: key prefix -> shape of one block's tensor."""
    region = blocking.regions[r]
    shapes: dict[str, tuple[int, ...]] = {kind: region.block for kind in kinds}
    for side, size in blocking.sides(region):
        shapes[side] = shapes[f"{side}_root"] = (size, size)
    return shapes


# ---------------------------------------------------------------------------------------------
# The state of a DTensor parameter in a state dict
# ---------------------------------------------------------------------------------------------


def export_sharded_state(entry: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> tuple[dict, bool]:
    """The state dict entry of DTensor parameter ``p`` (its state ``entry`` holds this rank's rows).

    When its shards are exact (:class:`~dash_shampoo.distributed.RowShard`), every region tensor of
    the full parameter becomes a DTensor over ``p``'s mesh, so the entry has the one-process layout
    (``left.0``, ...) and ``torch.distributed.checkpoint`` reshards it. Otherwise the elementwise
    state is saved in ``p``'s own shape and placements (``grad_ema``, ``moment``, ``momentum``),
    which reshards too, and the factors are not saved. Returns the entry and whether factors were
    left out.
    """
    shard = distributed.row_shard(p, group["block_size"], group["one_dim"])
    out = {key: entry[key] for key in PER_PARAMETER if key in entry}
    kinds = elementwise_kinds(group)
    if shard.exact:
        held = {place[0]: r for r, place in enumerate(shard.places) if place is not None}
        for g, region in enumerate(shard.full.regions):
            for kind, shape in region_shapes(shard.full, g, kinds).items():
                r = held.get(g)
                local = entry[f"{kind}.{r}"] if r is not None else _zeros((0, *shape), p.device)
                out[f"{kind}.{g}"] = distributed.as_dtensor(local, shard, (region.count, *shape))
        return out, False
    for kind in kinds:
        if shard.local.regions:
            local = shard.local.from_blocks([entry[f"{kind}.{r}"] for r in range(len(shard.local.regions))])
        else:
            local = _zeros(tuple(p.to_local().shape), p.device)
        out[kind] = distributed.as_dtensor(local, shard, tuple(p.shape))
    factors = any(shard.full.sides(region) for region in shard.full.regions)
    return out, factors


def import_sharded_state(
    saved: dict[str, Any], p: torch.Tensor, shard: distributed.RowShard, group: dict[str, Any]
) -> tuple[dict, bool]:
    """This rank's state of DTensor parameter ``p`` (held as ``shard``) from a saved entry: one written by
    :func:`export_sharded_state` (DTensors, as ``torch.distributed.checkpoint`` loads them, or the
    full tensors of ``full_state_dict=True``) or by one process. Region tensors of the full layout
    give this rank's rows where its blocks are the full parameter's; elementwise state saved per
    element, or in a full layout with other blocks, is cut into this rank's blocks. Factors that
    cannot be had so restart (zero factors, identity roots). Returns the entry and whether factors
    restarted. Missing elementwise state stays missing (:func:`check_state` names it)."""
    out = {key: saved[key] for key in PER_PARAMETER if key in saved}
    kinds = elementwise_kinds(group)
    per_element: dict[str, list[torch.Tensor]] = {}

    def elementwise(kind: str) -> list[torch.Tensor] | None:
        if kind not in per_element:
            if kind in saved:
                full = saved[kind]
            elif all(f"{kind}.{g}" in saved for g in range(len(shard.full.regions))):
                values = [saved[f"{kind}.{g}"] for g in range(len(shard.full.regions))]
                if any(distributed.is_dtensor(v) for v in values):
                    return None
                full = shard.full.from_blocks(values)
            else:
                return None
            first, count = shard.rows
            rows = full.to_local() if distributed.is_dtensor(full) else full[first : first + count]
            per_element[kind] = shard.local.to_blocks(rows)
        return per_element[kind]

    restarted = False
    for r, region in enumerate(shard.local.regions):
        place = shard.places[r]
        for kind, shape in region_shapes(shard.local, r, kinds).items():
            key = None if place is None else f"{kind}.{place[0]}"
            if key is not None and key in saved:
                out[f"{kind}.{r}"] = distributed.local_rows(saved[key], place[1], region.count)
            elif kind in kinds:
                blocks = elementwise(kind)
                if blocks is not None:
                    out[f"{kind}.{r}"] = blocks[r]
            else:
                make = _eyes if kind.endswith("_root") else _zeros
                out[f"{kind}.{r}"] = make((region.count, *shape), p.device)
                restarted = True
    return out, restarted


# ---------------------------------------------------------------------------------------------
# Pass 2: ownership
# ---------------------------------------------------------------------------------------------


def plan_ownership(
    groups: Sequence[dict[str, Any]], regions: Regions, world_size: int
) -> distributed.Ownership:
    """Cut the canonical block sequence into ``world_size`` contiguous shares of nearly equal root
    refresh cost."""
    costs = []
    for entry in regions.entries:
        group = groups[entry.group_index]
        sides = [size for _, size in entry.sides]
        cost = distributed.block_cost(
            sides, group["precondition_frequency"], solver_matmuls(group, matrix_root(group, len(sides)))
        )
        costs.extend([cost] * entry.count)
    return distributed.Ownership(distributed.split_costs(costs, world_size), costs)


def solver_matmuls(group: dict[str, Any], p: int) -> int:
    """The n×n matmuls of one root refresh (:func:`root_matmuls`); eigh, which is not made of
    matmuls, is counted as a rough 20."""
    count = root_matmuls(group["root_method"], p, steps=group["root_steps"], degree=group["chebyshev_degree"])
    return 20 if count is None else count


# ---------------------------------------------------------------------------------------------
# Passes 3 and 4: stacks, banks, bind
# ---------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """The stacks and banks of all used parameters, bound to the per-parameter state.

    Attributes:
        stacks, banks: the stacks and banks (every block, on every rank).
        params: the used parameters.
        root_options: the inverse-root options of each group.
        ownership: which rank computes the roots of which blocks.
        rank, world_size: this rank and the number of ranks.
        exchange: the exchange of refreshed roots between ranks (None with one rank).
        signature: the group options the layout was built for (:func:`signature`).
    """

    stacks: list[Stack]
    banks: list[Bank]
    params: list[torch.Tensor]
    root_options: list[RootOptions]
    ownership: distributed.Ownership
    rank: int
    world_size: int
    exchange: distributed.RootExchange | None
    signature: tuple

    def covers(self, active: Active) -> bool:
        """True when every parameter with a gradient already has its blocks in the layout."""
        known = {id(p) for p in self.params}
        return all(key in known for key in active)

    def apply(
        self,
        updates: list[tuple[torch.Tensor, Scale]],
        targets: dict[int, torch.Tensor],
        active: Active,
    ) -> None:
        """Subtract the update blocks ``scale · direction`` (``updates``: one pair per stack; the
        scale None, a number, or one per block) from the active parameters (``targets``: their
        contiguous tensors, by ``id``)."""
        for stack, (update, scale) in zip(self.stacks, updates):
            per_block = isinstance(scale, torch.Tensor) and scale.dim() == 3
            for run in stack.runs:
                if id(run.param) in active:
                    factor = stack.of(run, scale) if per_block else scale
                    run.subtract_from(targets[id(run.param)], stack.of(run, update), factor)

    def save_rows(self, params: list[torch.Tensor]) -> list[tuple[torch.Tensor, slice, torch.Tensor]]:
        """Copies of every state row that belongs to ``params``, as ``(tensor, rows, copy)`` (restored
        by :meth:`restore_rows`)."""
        wanted = {id(p) for p in params}
        places = [
            (tensor, slice(run.row, run.row + run.count))
            for stack in self.stacks
            for run in stack.runs
            if id(run.param) in wanted
            for tensor in stack.tensors.values()
        ]
        places += [
            (tensor, slice(rows.start, rows.stop))
            for bank in self.banks
            for run, rows in bank.rows_by_run()
            if id(run.param) in wanted
            for tensor in (bank.factors, bank.roots)
        ]
        return [(tensor, rows, tensor[rows].clone()) for tensor, rows in places]

    @staticmethod
    def restore_rows(saved: list[tuple[torch.Tensor, Any, torch.Tensor]]) -> None:
        """Write back the rows copied by :meth:`save_rows` or :meth:`Stack.save_rows`."""
        for tensor, rows, copy in saved:
            tensor[rows] = copy


def build(
    groups: Sequence[dict[str, Any]],
    state: dict[torch.Tensor, dict],
    regions: Regions,
    stacking: str,
    rank: int = 0,
    world_size: int = 1,
) -> Layout:
    """Passes 2 to 4 over ``regions`` (from :func:`collect_regions`): ownership, the stacks and
    banks, and their buffers bound to ``state`` (which gains a ``step`` counter and the ``shape`` it
    was made for, for every used parameter)."""
    differ = [f"shape {tuple(p.shape)}" for p, shard in regions.shards.items() if not shard.same_blocks]
    if differ:
        warnings.warn(
            f"DASH blocks each rank's shard of a DTensor parameter; for {', '.join(differ)} the shard "
            "boundaries cut through blocks of block_size, so the blocks and the update differ from one "
            "process (a block_size that divides every shard's rows avoids this)",
            stacklevel=4,
        )
    ownership = plan_ownership(groups, regions, world_size)
    stacks, ordinals, blocks = _plan_stacks(regions, stacking)
    banks = _plan_banks(groups, stacks, ordinals, stacking)
    for p in regions.params:
        entry = state.setdefault(p, {})
        entry.setdefault("step", torch.zeros((), dtype=torch.int64))
        entry.setdefault("shape", torch.tensor(p.shape, dtype=torch.int64))
    _bind(groups, state, stacks, banks)
    exchange = None
    if world_size > 1:
        for bank in banks:
            bank.owners = [ownership.owner_of(b) for e in bank.entries for b in blocks[id(e.run)]]
            bank.rank, bank.world_size = rank, world_size
        exchange = distributed.RootExchange(banks, rank, world_size)
    options = [root_options(group) for group in groups]
    return Layout(
        stacks, banks, regions.params, options, ownership, rank, world_size, exchange, signature(groups)
    )


# RootOptions field -> the parameter-group option that sets it.
ROOT_OPTION_KEYS = {
    "method": "root_method",
    "eps": "root_eps",
    "relative_eps": "root_eps_relative",
    "eigen_fix": "eigen_fix",
    "steps": "root_steps",
    "tol": "root_tol",
    "scaling": "scaling",
    "scaling_steps": "scaling_steps",
    "num_vectors": "num_vectors",
    "safety": "safety",
    "precision": "precision",
    "degree": "chebyshev_degree",
    "interval_lower": "chebyshev_interval_lower",
}


def root_options(group: dict[str, Any]) -> RootOptions:
    """The inverse-root options of a parameter group."""
    return RootOptions(**{field: group[key] for field, key in ROOT_OPTION_KEYS.items()})


def _scope(stacking: str, group: int, param: int, region: int, first: int) -> tuple:
    if stacking == "global":
        return (group,)
    if stacking == "layer":
        return (group, param)
    return (group, param, region, first)


def _plan_stacks(
    regions: Regions, stacking: str
) -> tuple[list[Stack], dict[tuple[int, str], range], dict[int, range]]:
    """The runs of blocks of the used parameters, grouped into stacks by scope, device and shape.

    Returns the stacks, each run's factor ordinals per side (``(id(run), side) -> range``: the
    factor's position in the stacking-independent sequence, used for staggering), and each run's
    blocks in the canonical block sequence (``id(run) -> range``, for the ownership).
    """
    stacks: dict[tuple, Stack] = {}
    ordinals: dict[tuple[int, str], range] = {}
    blocks: dict[int, range] = {}
    next_block = 0
    for entry in regions.entries:
        count, p = entry.count, entry.param
        pieces = [(k, 1) for k in range(count)] if stacking == "none" else [(0, count)]
        for first, run_count in pieces if entry.used else []:
            run = BlockRun(p, entry.blocking, entry.region, first, run_count)
            scope = _scope(stacking, entry.group_index, entry.param_index, entry.region, first)
            key = (scope, p.device, run.block)
            if key not in stacks:
                stacks[key] = Stack(run.block, entry.group_index, scope)
            stacks[key].add(run)
            blocks[id(run)] = range(next_block + first, next_block + first + run_count)
            for s_index, (side, _) in enumerate(entry.sides):
                start = entry.ordinal + s_index * entry.stride + first
                ordinals[id(run), side] = range(start, start + run_count)
        next_block += count
    return list(stacks.values()), ordinals, blocks


def _plan_banks(
    groups: Sequence[dict[str, Any]],
    stacks: list[Stack],
    ordinals: dict[tuple[int, str], range],
    stacking: str,
) -> list[Bank]:
    """Append each stack's factors, side by side, to the bank of their scope, size and root."""
    banks: dict[tuple, Bank] = {}
    for stack in stacks:
        group = groups[stack.group_index]
        first_run = stack.runs[0]
        sides = first_run.blocking.sides(first_run.blocking.regions[first_run.region])
        root = matrix_root(group, len(sides))
        for side, size in sides:
            bank_key = ((stack.scope, side) if stacking == "none" else stack.scope, size, root)
            if bank_key not in banks:
                banks[bank_key] = Bank(size, root, stack.group_index)
            bank = banks[bank_key]
            rows = [bank.add(run, side, ordinals[id(run), side]) for run in stack.runs]
            setattr(stack, side, (bank, rows[0]))
    return list(banks.values())


def _bind(
    groups: Sequence[dict[str, Any]], state: dict[torch.Tensor, dict], stacks: list[Stack], banks: list[Bank]
) -> None:
    """Allocate (or view) every stack and bank buffer from the per-parameter region tensors."""

    def entry(run: BlockRun, kind: str, make: Callable[..., torch.Tensor], shape: tuple[int, int]) -> tuple:
        # The run's rows of its region tensor, which is created with the rows of every block.
        full, device = (run.blocking.regions[run.region].count, *shape), run.param.device
        return state[run.param], f"{kind}.{run.region}", run.first, run.count, lambda: make(full, device)

    for bank in banks:
        square = (bank.size, bank.size)
        bank.factors = bind([entry(e.run, e.side, _zeros, square) for e in bank.entries])
        bank.roots = bind([entry(e.run, f"{e.side}_root", _eyes, square) for e in bank.entries])
    for stack in stacks:
        for kind in elementwise_kinds(groups[stack.group_index]):
            stack.tensors[kind] = bind([entry(run, kind, _zeros, stack.shape) for run in stack.runs])
        stack.grad = torch.empty(stack.rows, *stack.shape, device=stack.runs[0].param.device)


def _zeros(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, device=device, dtype=torch.float32)


def _eyes(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.eye(shape[-1], device=device, dtype=torch.float32).expand(shape).clone()
