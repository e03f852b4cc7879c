"""What an optimizer step costs an accelerator, counted without one: kernels, host syncs, matmul
FLOPs and bytes moved, from the aten ops the step dispatches.

The step runs on the ``meta`` device (:class:`StepCounter`): every tensor has its shape and dtype
but no data, so the count takes the accelerator branches of the code (no CPU-only chunking), costs
no arithmetic (one rank's share of the 953M model counts in seconds) and cannot hide a host sync:

- a **kernel** is an aten op on device tensors that is not a view or an allocation (``empty``,
  ``detach``, ...). ``linalg_eigh`` is one op but many kernels and an internal sync on CUDA, so it
  is counted apart (:attr:`Counts.eigh_calls`) and not among the kernels;
- a **host sync** is a read of device data by the host (``item``, ``bool``, ``tolist``, ``.cpu()``:
  ``_local_scalar_dense`` or a copy from the device to the host), an op whose output shape depends
  on the data (``nonzero``, ``masked_select``, ...), or a blocking copy from the host to the device
  (``torch.tensor(..., device=...)``, ``.to(device)``: pageable memory makes CUDA wait). The
  counter answers a read with zeros, which every optimizer here treats as "finite, nothing to skip";
- **bytes** are each kernel's tensor inputs read once and its outputs, or the tensors it changes in
  place, written once (an in-place op reads and writes its target; ``copy_``, ``fill_`` and
  ``zero_`` only write it; ``out=`` is written, not read). This is the traffic of unfused kernels,
  the bound on everything that is not a large matmul;
- **matmul FLOPs** are ``2·m·n·k`` per product of ``mm``, ``bmm``, ``addmm`` and ``baddbmm``; an
  out-of-place ``addmm``/``baddbmm`` with ``beta != 0`` also copies its addend into its output
  first (one more kernel; the output written, then read and written by the product).

Ops on host tensors (e.g. step counters kept on the CPU) launch nothing on the device and are
counted apart (:attr:`Counts.host_ops`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
DEVICE = torch.device("meta")

#: Ops that allocate or relabel memory without a kernel.
_NO_KERNEL = {
    aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
    aten.detach, aten.alias, aten.lift_fresh, aten.lift_fresh_copy, aten._unsafe_view,
    aten.set_, aten.resize_,
}  # fmt: skip
#: Ops whose output shape depends on the data: the host must wait for the device.
_DATA_DEPENDENT = {aten.nonzero, aten.masked_select, aten.unique_dim, aten._unique2, aten.nonzero_static}
#: In-place ops that write their first argument without reading it.
_WRITE_ONLY = {aten.copy_, aten.fill_, aten.zero_}
_MATMULS = {aten.mm, aten.bmm, aten.addmm, aten.baddbmm}
#: Out-of-place products with an addend (``beta·c + a @ b``; their in-place forms add into ``c``).
_ADDED_MATMULS = {aten.addmm, aten.baddbmm}


@dataclass
class Counts:
    """What one or more steps dispatched (see the module docstring for each field's meaning)."""

    kernels: int = 0
    syncs: int = 0
    matmul_flops: float = 0.0
    bytes: float = 0.0
    eigh_calls: int = 0
    eigh_matrices: int = 0
    host_ops: int = 0
    ops: Counter = field(default_factory=Counter)  # kernels by op name
    op_bytes: Counter = field(default_factory=Counter)  # bytes by op name
    sync_ops: Counter = field(default_factory=Counter)  # host syncs by op name

    def summary(self) -> dict[str, Any]:
        """The counts as plain values, the ten most frequent kernels and every sync named."""
        values = {k: v for k, v in asdict(self).items() if k not in ("ops", "op_bytes", "sync_ops")}
        return {**values, "top_ops": dict(self.ops.most_common(10)), "sync_ops": dict(self.sync_ops)}


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _on_device(tensors: list[torch.Tensor]) -> bool:
    return any(t.device == DEVICE for t in tensors)


def _matmul_flops(func: Any, args: tuple, out: torch.Tensor) -> float:
    """``2·(product of the output's shape)·k`` for a matmul op."""
    a = args[1] if func.overloadpacket in (aten.addmm, aten.baddbmm) else args[0]
    return 2.0 * math.prod(out.shape) * a.shape[-1]


def _mutated(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an op writes in place: its schema's mutable arguments (``self`` of ``add_``, the
    lists of ``_foreach_*_``, ``out=``)."""
    written = []
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            written += _tensors(args[i] if i < len(args) else kwargs.get(argument.name))
    return written


#: Factories that copy host data to their ``device`` without dispatching a copy on meta tensors.
_FACTORIES = {torch.tensor: None, torch.as_tensor: 2, torch.asarray: None}


class _HostData(TorchFunctionMode):
    """Sees ``torch.tensor(data, device=...)`` and its kin, whose host-to-device copy dispatches
    nothing when the device is meta, and tells its :class:`StepCounter`."""

    def __init__(self, counter: StepCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES:
            position = _FACTORIES[func]
            device = kwargs.get(
                "device", args[position] if position is not None and len(args) > position else None
            )
            if device is not None and torch.device(device) == DEVICE:
                self.counter._sync("host-to-device copy")
        return func(*args, **kwargs)


class StepCounter(TorchDispatchMode):
    """Counts the kernels, host syncs, matmul FLOPs and bytes of the ops dispatched inside it into
    :attr:`counts` (reset it with ``counter.counts = Counts()``). Tensors on :data:`DEVICE` are the
    device's; a host read of one returns zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()
        self._host_data = _HostData(self)

    def __enter__(self) -> StepCounter:
        self._host_data.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._host_data.__exit__(*exc)

    def _sync(self, name: str) -> None:
        self.counts.syncs += 1
        self.counts.sync_ops[name] += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket
        inputs = _tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))
        name = packet.__name__
        if packet is aten._local_scalar_dense and _on_device(inputs):
            self._sync("item")
            return False if inputs[0].dtype == torch.bool else 0.0 if inputs[0].is_floating_point() else 0
        if packet in _DATA_DEPENDENT and _on_device(inputs):
            self._sync(name)
            return torch.zeros((0, inputs[0].dim()), dtype=torch.int64, device=DEVICE)
        if packet in (aten._to_copy, aten.copy_):
            source = args[1] if packet is aten.copy_ else args[0]
            target = args[0].device if packet is aten.copy_ else kwargs.get("device") or source.device
            target = torch.device(target)
            if source.device == DEVICE and target != DEVICE:
                self._sync("device-to-host copy")
                zeros = torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype)
                return args[0].copy_(zeros) if packet is aten.copy_ else zeros
            if target == DEVICE and source.device != DEVICE and not kwargs.get("non_blocking", False):
                self._sync("host-to-device copy")
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        if func.is_view or packet in _NO_KERNEL or packet in (aten._local_scalar_dense,):
            return out
        if not _on_device(inputs + outputs):
            self.counts.host_ops += 1
            return out
        if packet is aten._linalg_eigh:
            self.counts.eigh_calls += 1
            self.counts.eigh_matrices += math.prod(inputs[0].shape[:-2])
        else:
            self.counts.kernels += 1
            self.counts.ops[name] += 1
        read = sum(map(_nbytes, inputs))
        if packet in _WRITE_ONLY:
            read -= _nbytes(inputs[0])
        written = _mutated(func, args, kwargs) or outputs  # in place (foreach ops return nothing)
        moved = read + sum(map(_nbytes, written))
        self.counts.bytes += moved
        self.counts.op_bytes[name] += moved
        if packet in _MATMULS:
            self.counts.matmul_flops += _matmul_flops(func, args, outputs[0])
        if packet in _ADDED_MATMULS and kwargs.get("beta", 1) != 0:
            # The BLAS product adds into its output, so the addend is first copied there: a copy
            # kernel, and the output read back by the product.
            self.counts.kernels += 1
            self.counts.ops["copy_"] += 1
            self.counts.bytes += 3 * _nbytes(outputs[0])
            self.counts.op_bytes[name] += 3 * _nbytes(outputs[0])
        return out


def meta_parameters(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Leaf float32 parameters of ``shapes`` on the meta device, each with a meta gradient."""
    params = []
    for shape in shapes:
        p = torch.empty(shape, device=DEVICE, requires_grad=True)
        p.grad = torch.empty(shape, device=DEVICE)
        params.append(p)
    return params


def count_steps(
    step: Callable[[], Any], counted: list[int], last: int | None = None
) -> Iterator[tuple[int, Counts]]:
    """Run ``step()`` for steps ``1 .. last`` (default ``max(counted)``) under one
    :class:`StepCounter` and yield ``(t, counts of step t)`` for each ``t`` in ``counted``."""
    counter = StepCounter()
    with counter:
        for t in range(1, (last or max(counted)) + 1):
            counter.counts = Counts()
            step()
            if t in counted:
                yield t, counter.counts


#: The per-step quantities a row reports, amortised over the refresh period.
PER_STEP = ("kernels", "syncs", "matmul_flops", "bytes", "eigh_calls")


def count_optimizer(
    build: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    shapes: list[tuple[int, ...]],
    frequency: int,
) -> dict[str, Any]:
    """The counts of an optimizer's steps on meta parameters of ``shapes``.

    ``build(params)`` makes the optimizer. With refresh period ``F`` the refresh step counted is step
    3 (``F = 1``) or step ``F`` (the first periodic refresh), and the other step is step ``F + 1``;
    ``per_step`` is ``(refresh + (F − 1)·other) / F`` of each of :data:`PER_STEP`.
    """
    optimizer = build(meta_parameters(shapes))
    refresh, other = (3, None) if frequency == 1 else (frequency, frequency + 1)
    counted = dict(count_steps(optimizer.step, [refresh] if other is None else [refresh, other]))
    result: dict[str, Any] = {"refresh": counted[refresh].summary()}
    result["other"] = counted[other].summary() if other is not None else None
    last = result["other"] or result["refresh"]
    result["per_step"] = {
        key: (result["refresh"][key] + (frequency - 1) * last[key]) / frequency for key in PER_STEP
    }
    return result


def minimum_other_step_bytes(numel: int, factor_elements: int) -> int:
    """Bytes a step without a refresh must move at least, for ``numel`` parameter elements whose
    blocks have ``factor_elements`` factor entries (both sides) in all, in fp32: each element's
    gradient read (4), gradient EMA, Adam second moment and weight read and written (3 × 8); each
    factor entry read and written by its EMA (8) and its root read (4)."""
    return 28 * numel + 12 * factor_elements


# ---------------------------------------------------------------------------------------------
# The counts of benchmark rows (dicts with model, kind, optimizer, block_size, frequency, stacking,
# method and "counts"), their ratios and their table
# ---------------------------------------------------------------------------------------------

#: The authors' optimizer each DASH solver is compared with (the peer rows' names).
AUTHORS = {"ndb": "ista_daslab_optimizers.DashGpu", "eigh": "ista_daslab_optimizers.DashGpu-evd"}


def add_count_ratios(rows: list[dict[str, Any]], minimum: Callable[[str, int], int]) -> None:
    """Per DASH row, its per-step kernels and bytes over the authors' (same model, B, F and
    solver: :data:`AUTHORS`), and per row with a non-refresh step, that step's bytes over
    ``minimum(model, block_size)`` (:func:`minimum_other_step_bytes`)."""
    counted = [r for r in rows if "per_step" in (r.get("counts") or {})]
    for row in counted:
        counts = row["counts"]
        authors = [
            r
            for r in counted
            if r["optimizer"] == AUTHORS.get(row.get("method") or "")
            and (r["model"], r["block_size"], r["frequency"])
            == (row["model"], row["block_size"], row["frequency"])
        ]
        if row["kind"] == "dash" and authors:
            theirs = authors[0]["counts"]["per_step"]
            for key in ("kernels", "bytes"):
                counts[f"{key}_vs_authors"] = counts["per_step"][key] / theirs[key] if theirs[key] else None
        if counts["other"] is not None and row["block_size"] is not None:
            counts["other_vs_minimum"] = counts["other"]["bytes"] / minimum(row["model"], row["block_size"])


COUNT_HEADER = (
    "model", "optimizer", "B", "F", "stacking", "solver", "kernels refresh", "kernels other",
    "kernels/step", "× authors' kernels", "host syncs/step", "matmul GFLOP/step", "GB refresh",
    "GB other", "GB/step", "× authors' GB", "other GB / minimum", "eigh calls/step", "notes",
)  # fmt: skip


def _count_cells(row: dict[str, Any]) -> list[str]:
    counts = row.get("counts") or {}
    base = [row["model"], row["optimizer"], str(row["block_size"] or "–"), str(row["frequency"])]
    base += [row.get("stacking") or "–", row.get("method") or "–"]
    if "per_step" not in counts:
        return base + ["–"] * (len(COUNT_HEADER) - len(base) - 1) + [counts.get("reason", "")]
    refresh, other, per = counts["refresh"], counts["other"], counts["per_step"]

    def number(value: float | None, digits: int = 0) -> str:
        return "–" if value is None else f"{value:,.{digits}f}"

    def times(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}×"

    syncs = ", ".join(f"{name} {n}" for name, n in (other or refresh)["sync_ops"].items())
    return [
        *base,
        number(refresh["kernels"]),
        number(other and other["kernels"]),
        number(per["kernels"], 1 if other else 0),
        times(counts.get("kernels_vs_authors")),
        number(per["syncs"], 1 if other else 0),
        number(per["matmul_flops"] / 1e9),
        number(refresh["bytes"] / 1e9, 2),
        number(other and other["bytes"] / 1e9, 2),
        number(per["bytes"] / 1e9, 2),
        times(counts.get("bytes_vs_authors")),
        times(counts.get("other_vs_minimum")),
        number(per["eigh_calls"], 1 if other else 0),
        f"syncs: {syncs}" if syncs else "",
    ]


def count_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the rows' counts."""
    from ..results import markdown_table

    return markdown_table(COUNT_HEADER, map(_count_cells, rows))


COUNT_NOTES = (
    "How to read the counts. Each step ran on the meta device (shapes, no data) under a dispatch "
    "mode, so the accelerator's code path is counted (no CPU chunking) without a GPU: *kernels* are "
    "aten ops on device tensors that are not views or allocations (eigh is one op of many kernels "
    "and counted apart, in *eigh calls*); *host syncs* are reads of device data by the host "
    "(`item`, `tolist`, a device-to-host copy), data-dependent shapes (`nonzero`) and blocking "
    "host-to-device copies; *GB* are each kernel's tensor inputs read and outputs (or in-place "
    "targets) written once, the traffic of unfused kernels; *matmul GFLOP* count `mm`, `bmm`, "
    "`addmm`, `baddbmm`. Refresh is step 3 (F = 1) or step F, other is step F + 1; per step is "
    "`(refresh + (F−1)·other)/F`. *× authors'* divides a DASH row by the authors' `DashGpu` with "
    "the same model, B, F and solver (NDB ↔ `DashGpu`, eigh ↔ `DashGpu-evd`, fp32). *minimum* is "
    "the bytes a step without a refresh cannot avoid: per parameter element the gradient read and "
    "the gradient EMA, Adam second moment and weight read and written (28 B), per factor entry its "
    "EMA read and written and its root read (12 B)."
)
