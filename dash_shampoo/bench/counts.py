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
- **matmul FLOPs** are ``2·m·n·k`` per product of ``mm``, ``bmm``, ``addmm`` and ``baddbmm``.

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


class StepCounter(TorchDispatchMode):
    """Counts the kernels, host syncs, matmul FLOPs and bytes of the ops dispatched inside it into
    :attr:`counts` (reset it with ``counter.counts = Counts()``). Tensors on :data:`DEVICE` are the
    device's; a host read of one returns zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()

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
