"""Optimizer-step benchmark (``dash-shampoo bench step``): AdamW, DASH and the peers on model shapes.

Parameters shaped like real models (:mod:`dash_shampoo.bench.shapes`) get one random gradient from
a seeded ``torch.Generator``; the same gradient is copied back into ``p.grad`` before every step
(outside the timed region, since some optimizers change or drop the gradient). Each row builds a
fresh optimizer, runs ``--warmup`` untimed steps (the first step also builds DASH's plan and
state) and then times consecutive steps: ``time.perf_counter`` around ``step()`` on the CPU,
``torch.cuda.Event`` pairs on CUDA. With refresh period ``F > 1`` the steps that refresh the roots
(``t = 1`` or ``t % F == 0``, DASH's schedule, also used to sort the peers' steps) and the other
steps are timed separately, and timing goes on until ``--repeats`` other steps and
``--refresh-repeats`` refresh steps are in (or ``--row-seconds`` has passed with at least one of
each). The per-step figure used for the ratios is the amortised
``(refresh + (F − 1)·other) / F`` of the medians.

Per row the report gives medians with min–max over the samples, the optimizer state in bytes per
parameter (distinct tensors reachable from ``optimizer.state_dict()["state"]``), the ratio to the
fastest AdamW row and to the fastest peer of the same model, block size and frequency, and for
DASH the root refresh itself: a root hook (``DASH.register_root_hook``) times every solver call
and counts its flops (:func:`root_flops`), and the achieved FLOP/s are set against the
batched-matmul throughput of the device measured in the same process (``bmm`` of the solver's
precision on ``(K, n, n)`` stacks, :func:`measure_bmm`).

On a CPU the full grid takes hours (one NDB refresh of the 60M ``small`` model is ~3.5 TFLOP), so
``--plan cpu`` (the default there) runs a reduced grid and skips, with the estimate as the reason,
every DASH row whose estimated time (from the measured matmul and eigh throughput) exceeds
``--max-estimate`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import peers as peers_module
from ..blocking import Blocking
from ..linalg import bmm, root_matmuls
from ..optimizer import DASH, RootCall
from ..results import command_text, device_name, device_slug, ms, spread, write_report
from .shapes import MODELS, ModelShapes, factor_counts, make_parameters

STACKINGS = ("global", "layer", "none")
METHODS = ("ndb", "eigh", "newton", "chebyshev")

#: Defaults per device: warm-up steps, timed samples per kind, refresh samples, row time cap (s),
#: estimate cap (s; DASH rows estimated slower are skipped), flops per bmm calibration call.
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": {
        "warmup": 3,
        "repeats": 20,
        "refresh_repeats": 5,
        "row_seconds": 120.0,
        "max_estimate": None,
        "calibration_flops": 2e11,
    },
    "cpu": {
        "warmup": 1,
        "repeats": 5,
        "refresh_repeats": 1,
        "row_seconds": 60.0,
        "max_estimate": 60.0,
        "calibration_flops": 2e9,
    },
}


# ---------------------------------------------------------------------------------------------
# Row specifications and plans
# ---------------------------------------------------------------------------------------------


@dataclass
class RowSpec:
    """One row to time: an optimizer configuration on one model's parameters."""

    model: str
    kind: str  # "adamw", "dash" or "peer"
    label: str
    frequency: int = 1
    block_size: int | None = None
    stacking: str | None = None
    method: str | None = None
    fused: bool = False
    peer: peers_module.Peer | None = None


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [kind(part.strip()) for part in text.split(",") if part.strip()]

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench step``."""
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    parser.add_argument("--models", type=_csv(str), default=None, help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--block-sizes", type=_csv(int), default=[256, 512, 1024])
    parser.add_argument("--methods", type=_csv(str), default=["ndb", "eigh", "newton"])
    parser.add_argument("--stackings", type=_csv(str), default=list(STACKINGS))
    parser.add_argument("--frequencies", type=_csv(int), default=[1, 10])
    parser.add_argument(
        "--peers", type=_csv(str), default=None, help="peer names (all by default), or 'none'"
    )
    parser.add_argument(
        "--plan",
        choices=("auto", "full", "cpu"),
        default="auto",
        help="full: every model × stacking × solver × block × frequency and every peer; cpu: the "
        "reduced grid (see the module doc); auto: cpu on a CPU, full on CUDA",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed samples of each step kind")
    parser.add_argument("--refresh-repeats", type=int, default=None, help="timed refresh steps (F > 1)")
    parser.add_argument("--row-seconds", type=float, default=None, help="stop sampling a row after this")
    parser.add_argument(
        "--max-estimate",
        type=float,
        default=None,
        help="skip DASH rows estimated slower than this many seconds (0: never skip)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on a CPU: on a shared machine a second thread waiting on a "
        "descheduled one made elementwise steps 30-100x slower; 0 keeps torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny model, few rows (a smoke test)")


def _resolve(args: argparse.Namespace) -> tuple[argparse.Namespace, torch.device]:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    defaults = DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    if args.quick:
        args.models = args.models or ["tiny"]
        args.block_sizes = [64]
        args.methods = ["ndb", "eigh"]
        args.stackings = ["global", "none"]
        args.frequencies = [1, 10]
        args.plan = "full"
        args.warmup = 1 if args.warmup is None else args.warmup
        args.repeats = 3 if args.repeats is None else args.repeats
        args.refresh_repeats = 1 if args.refresh_repeats is None else args.refresh_repeats
    for key in ("warmup", "repeats", "refresh_repeats", "row_seconds", "max_estimate"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.max_estimate == 0:
        args.max_estimate = None
    if args.plan == "auto":
        args.plan = "full" if device.type == "cuda" else "cpu"
    if args.models is None:
        args.models = ["mini", "small", "124m", "350m", "953m-rank"]
    for name in args.models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    for method in args.methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    for stacking in args.stackings:
        if stacking not in STACKINGS:
            raise ValueError(f"unknown stacking {stacking!r}; known: {', '.join(STACKINGS)}")
    if args.warmup < 1 or args.repeats < 1 or args.refresh_repeats < 1:
        raise ValueError("--warmup, --repeats and --refresh-repeats must be at least 1")
    args.calibration_flops = defaults["calibration_flops"]
    if args.threads is None:
        args.threads = 1 if device.type == "cpu" else 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return args, device


def _peer_list(args: argparse.Namespace) -> list[peers_module.Peer]:
    if args.peers == ["none"]:
        return []
    return peers_module.find(args.peers)


def _adamw_rows(model: str, device: torch.device) -> list[RowSpec]:
    rows = [RowSpec(model, "adamw", "AdamW (foreach)")]
    rows.append(RowSpec(model, "adamw", "AdamW (fused)", fused=True))
    return rows


def _dash_row(model: str, block: int, frequency: int, stacking: str, method: str) -> RowSpec:
    return RowSpec(model, "dash", "DASH", frequency, block, stacking, method)


def _peer_rows(
    model: str, peers: list[peers_module.Peer], blocks: list[int], freqs: list[int]
) -> list[RowSpec]:
    return [
        RowSpec(model, "peer", peer.name, f, b, peer=peer) for b in blocks for f in freqs for peer in peers
    ]


def full_plan(args: argparse.Namespace, device: torch.device) -> list[RowSpec]:
    """Every model × (AdamW, DASH stacking × solver × block × frequency, peers × block × frequency)."""
    rows: list[RowSpec] = []
    peers = _peer_list(args)
    for model in args.models:
        rows += _adamw_rows(model, device)
        for block in args.block_sizes:
            for frequency in args.frequencies:
                for stacking in args.stackings:
                    for method in args.methods:
                        rows.append(_dash_row(model, block, frequency, stacking, method))
        rows += _peer_rows(model, peers, args.block_sizes, args.frequencies)
    return rows


def cpu_plan(args: argparse.Namespace, device: torch.device) -> list[RowSpec]:
    """The reduced grid for a CPU (a few minutes on 2 cores; see :data:`CPU_GRID`)."""
    rows: list[RowSpec] = []
    peers = _peer_list(args)
    for model in args.models:
        rows += _adamw_rows(model, device)
        grid = CPU_GRID.get(model, CPU_GRID["*"])
        for block, frequency, stacking, method in grid["dash"]:
            if method in args.methods and stacking in args.stackings and block in args.block_sizes:
                rows.append(_dash_row(model, block, frequency, stacking, method))
        rows += _peer_rows(model, peers, grid["peer_blocks"], grid["peer_frequencies"])
    return rows


#: The CPU plan per model: DASH rows ``(block, frequency, stacking, method)`` and the peers' blocks
#: and frequencies. ``mini`` gets the stacking × solver comparison, the LLM shapes one or two rows
#: each (skipped with their estimate when over ``--max-estimate``).
CPU_GRID: dict[str, dict[str, Any]] = {
    "tiny": {
        "dash": [(b, f, s, m) for b in (64, 256) for f in (1, 10) for s in STACKINGS for m in METHODS],
        "peer_blocks": [64],
        "peer_frequencies": [1, 10],
    },
    "mini": {
        "dash": [
            *[(256, 10, s, m) for s in STACKINGS for m in ("ndb", "eigh", "newton")],
            *[(256, 1, s, m) for s in STACKINGS for m in ("ndb", "eigh")],
            (512, 10, "global", "ndb"),
            (512, 10, "global", "eigh"),
            (1024, 10, "global", "eigh"),
            (1024, 10, "global", "ndb"),
        ],
        "peer_blocks": [256],
        "peer_frequencies": [10],
    },
    "small": {
        "dash": [(256, 10, "global", "eigh"), (256, 10, "global", "ndb")],
        "peer_blocks": [],
        "peer_frequencies": [],
    },
    "*": {
        "dash": [(1024, 10, "global", "ndb"), (1024, 10, "global", "eigh")],
        "peer_blocks": [],
        "peer_frequencies": [],
    },
}


# ---------------------------------------------------------------------------------------------
# Flop counts, throughput calibration and estimates
# ---------------------------------------------------------------------------------------------


def root_flops(
    method: str,
    n: int,
    p: float,
    *,
    steps: int = 10,
    scaling: str | None = None,
    scaling_steps: int = 10,
    num_vectors: int = 16,
    degree: int = 40,
) -> tuple[float, float, str]:
    """Flops of one ``n × n`` inverse root: ``(total, matmul part, label)``.

    A matmul of two ``n × n`` matrices is ``2n³``, times :func:`~dash_shampoo.linalg.root_matmuls`.
    Power-iteration scaling adds ``2n²·v·(scaling_steps + 1)``. ``eigh`` is counted as a nominal
    ``9n³`` plus ``2n³`` for ``Q diag Qᵀ`` (labelled "nominal": eigh is not a matmul and its real
    count depends on the kernel).
    """
    matmul = 2.0 * n**3
    count = root_matmuls(method, int(p), steps=steps, degree=degree)
    if count is None:
        return 9.0 * n**3 + matmul, matmul, "eigh nominal 9n³+2n³"
    label = f"{method} {count} matmuls"
    flops = count * matmul
    if method in ("ndb", "newton") and scaling in (None, "power", "power_multi"):
        vectors = 1 if scaling == "power" else num_vectors
        flops_scale = 2.0 * n * n * vectors * (scaling_steps + 1)
    else:
        flops_scale = 0.0
    return flops + flops_scale, count * matmul, label


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure_bmm(
    n: int, device: torch.device, precision: str, target_flops: float, max_count: int, repeats: int = 3
) -> dict[str, Any]:
    """Throughput of ``dash_shampoo.linalg.bmm`` at ``precision`` on a ``(K, n, n)`` stack.

    ``K`` is chosen so that one call is about ``target_flops`` (at most ``max_count``, at least 1).
    Returns ``{"n", "K", "flops_per_s" (median), "min", "max"}``.
    """
    count = max(1, min(max_count, round(target_flops / (2.0 * n**3))))
    generator = torch.Generator().manual_seed(n)
    a = torch.randn(count, n, n, generator=generator).to(device)
    b = torch.randn(count, n, n, generator=generator).to(device)
    times = _timed(lambda: bmm(a, b, precision), device, repeats)
    rates = sorted(2.0 * count * n**3 / t for t in times)
    return {"n": n, "K": count, "flops_per_s": statistics.median(rates), "min": rates[0], "max": rates[-1]}


def measure_eigh(n: int, device: torch.device, count: int, repeats: int = 2) -> float:
    """Seconds per matrix of a batched ``torch.linalg.eigh`` on ``count`` SPD ``n × n`` matrices."""
    generator = torch.Generator().manual_seed(n)
    g = torch.randn(count, n, n, generator=generator)
    A = (g @ g.mT / n + torch.eye(n)).to(device)
    times = _timed(lambda: torch.linalg.eigh(A), device, repeats)
    return statistics.median(times) / count


@dataclass
class Calibration:
    """Measured matmul throughput (per size) and eigh time (per size) of the device."""

    bmm: dict[int, dict[str, Any]] = field(default_factory=dict)
    eigh: dict[int, float] = field(default_factory=dict)

    def rate(self, n: int) -> float:
        """bmm FLOP/s at size ``n`` (the nearest measured size)."""
        nearest = min(self.bmm, key=lambda m: abs(math.log(m / n)))
        return self.bmm[nearest]["flops_per_s"]

    def eigh_seconds(self, n: int) -> float:
        """Seconds per ``n × n`` eigh, scaled as ``n³`` from the nearest measured size."""
        nearest = min(self.eigh, key=lambda m: abs(math.log(m / n)))
        return self.eigh[nearest] * (n / nearest) ** 3


def calibrate(
    sizes: dict[int, int], device: torch.device, precision: str, target_flops: float, with_eigh: bool
) -> Calibration:
    """Measure bmm (and eigh, for the estimates) at every factor size in ``sizes`` (size -> count)."""
    calibration = Calibration()
    for n, count in sorted(sizes.items()):
        calibration.bmm[n] = measure_bmm(n, device, precision, target_flops, max_count=max(count, 1))
        if with_eigh:
            calibration.eigh[n] = measure_eigh(n, device, count=max(1, min(count, 4096 // n, 8)))
    return calibration


def _blocks(shapes: ModelShapes, block_size: int) -> list[tuple[int, int, int, list[int]]]:
    """``(count, m, n, factor sizes)`` per region of every parameter at ``block_size``."""
    out = []
    for _, shape in shapes.shapes:
        plan = Blocking.build(shape, block_size, "shampoo")
        for region in plan.regions:
            out.append((region.count, *region.block, [size for _, size in plan.sides(region)]))
    return out


def estimate_dash(
    spec: RowSpec, shapes: ModelShapes, calibration: Calibration, steps: int, refreshes: int
) -> tuple[float, str]:
    """Estimated seconds of a DASH row: refreshes × solver time + steps × preconditioning matmuls."""
    assert spec.block_size is not None and spec.method is not None
    refresh = 0.0
    for n, count in factor_counts(shapes, spec.block_size).items():
        if spec.method == "eigh":
            refresh += count * calibration.eigh_seconds(n)
        else:
            flops, _, _ = root_flops(spec.method, n, 4)
            refresh += count * flops / calibration.rate(n)
    apply = 0.0
    for count, m, n, sides in _blocks(shapes, spec.block_size):
        for k in sides:
            apply += count * 4.0 * m * n * k / calibration.rate(max(k, 2))
    total = refreshes * refresh + steps * apply
    detail = f"{refreshes} refreshes × {refresh:.1f} s + {steps} steps × {apply:.2f} s of matmuls"
    return total, detail


# ---------------------------------------------------------------------------------------------
# Solver instrumentation
# ---------------------------------------------------------------------------------------------


class SolverRecorder:
    """A DASH root hook (:meth:`DASH.register_root_hook`) that times each solver call and counts
    its flops.

    Calls are filed under :attr:`step` (set by the caller before each optimizer step). On CUDA each
    call is bracketed by ``torch.cuda.Event`` records (no synchronisation inside the step); on the
    CPU by ``time.perf_counter``.
    """

    def __init__(self, device: torch.device, optimizer: DASH) -> None:
        self.device = device
        self.step = 0
        self.calls: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.optimizer = optimizer
        self._handle: Any = None

    def __enter__(self) -> SolverRecorder:
        self._handle = self.optimizer.register_root_hook(self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _record(self, root_call: RootCall, solve: Callable[[], torch.Tensor]) -> torch.Tensor:
        options = root_call.options
        count, n = root_call.factors.shape[0], root_call.factors.shape[-1]
        flops, matmul_flops, label = root_flops(
            options.method,
            n,
            root_call.p,
            steps=options.steps,
            scaling=options.scaling,
            scaling_steps=options.scaling_steps,
            num_vectors=options.num_vectors,
            degree=options.degree,
        )
        call: dict[str, Any] = {
            "n": n,
            "count": count,
            "flops": flops * count,
            "matmul_flops": matmul_flops * count,
            "label": label,
            "precision": options.precision,
        }
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = solve()
            end.record()
            call["events"] = (start, end)
        else:
            begin = time.perf_counter()
            out = solve()
            call["seconds"] = time.perf_counter() - begin
        self.calls[self.step].append(call)
        return out

    def finish(self) -> None:
        """Turn CUDA event pairs into seconds (call after synchronising)."""
        for calls in self.calls.values():
            for call in calls:
                events = call.pop("events", None)
                if events is not None:
                    call["seconds"] = events[0].elapsed_time(events[1]) / 1e3


# ---------------------------------------------------------------------------------------------
# Running one row
# ---------------------------------------------------------------------------------------------


def _build(spec: RowSpec, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if spec.kind == "adamw":
        if spec.fused:
            return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
        return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
    if spec.kind == "dash":
        return DASH(
            params,
            lr=1e-3,
            betas=(0.9, 0.95),
            block_size=spec.block_size,
            precondition_frequency=spec.frequency,
            stacking=spec.stacking,
            root_method=spec.method,
            scaling="power_multi",
            precision="fp32",
        )
    assert spec.peer is not None and spec.block_size is not None
    return spec.peer.build(params, spec.block_size, spec.frequency)


def _is_refresh(t: int, frequency: int) -> bool:
    return t == 1 or t % frequency == 0


def _restore_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def _stats(samples: list[float]) -> dict[str, Any] | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
        "samples": ordered,
    }


def time_row(
    spec: RowSpec,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Build the optimizer of ``spec``, warm it up, time its steps; the row's measurements."""
    optimizer = _build(spec, params)
    frequency = spec.frequency
    recorder = SolverRecorder(device, optimizer) if spec.kind == "dash" else contextlib.nullcontext()
    samples: dict[str, list[float]] = {"refresh": [], "other": []}
    events: list[tuple[int, Any, Any]] = []
    wanted_other = args.repeats if frequency > 1 else 0
    wanted_refresh = args.refresh_repeats if frequency > 1 else args.repeats
    row_start = time.perf_counter()
    cut_short = False
    with recorder:
        t = 0
        for _ in range(args.warmup):
            t += 1
            if isinstance(recorder, SolverRecorder):
                recorder.step = -t  # warm-up calls are not reported
            _restore_grads(params, grads)
            optimizer.step()
        _sync(device)
        timing_start = time.perf_counter()
        while True:
            refreshes = sum(1 for step, _, _ in events if _is_refresh(step, frequency))
            others = len(events) - refreshes
            if refreshes >= wanted_refresh and others >= wanted_other:
                break
            if frequency == 1:
                refreshes, others = len(events), 1
            if time.perf_counter() - timing_start > args.row_seconds and refreshes >= 1 and others >= 1:
                cut_short = True
                break
            t += 1
            if isinstance(recorder, SolverRecorder):
                recorder.step = t
            _restore_grads(params, grads)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                optimizer.step()
                end.record()
                events.append((t, start, end))
            else:
                begin = time.perf_counter()
                optimizer.step()
                events.append((t, begin, time.perf_counter()))
        _sync(device)
    for step, begin, end in events:
        seconds = begin.elapsed_time(end) / 1e3 if device.type == "cuda" else end - begin
        kind = "refresh" if frequency == 1 or _is_refresh(step, frequency) else "other"
        samples[kind].append(seconds)
    numel = sum(p.numel() for p in params)
    row: dict[str, Any] = {
        "refresh": _stats(samples["refresh"]),
        "other": _stats(samples["other"]),
        "steps_run": t,
        "row_seconds": time.perf_counter() - row_start,
        "cut_short": cut_short,
        "state_bytes_per_param": peers_module.state_bytes(optimizer.state_dict()["state"]) / numel,
    }
    refresh = row["refresh"]["median"] if row["refresh"] else None
    other = row["other"]["median"] if row["other"] else None
    if frequency == 1 or other is None:
        row["per_step"] = refresh
    elif refresh is None:
        row["per_step"] = other
    else:
        row["per_step"] = (refresh + (frequency - 1) * other) / frequency
    if isinstance(recorder, SolverRecorder):
        recorder.finish()
        row["solver"] = _solver_summary(recorder, [step for step, _, _ in events])
        row["root_failures"] = optimizer.root_failures  # type: ignore[attr-defined]
    if device.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    del optimizer
    return row


def _solver_summary(recorder: SolverRecorder, steps: list[int]) -> dict[str, Any] | None:
    per_step = []
    for step in steps:
        calls = recorder.calls.get(step)
        if calls:
            per_step.append(
                {
                    "seconds": sum(c["seconds"] for c in calls),
                    "flops": sum(c["flops"] for c in calls),
                    "calls": len(calls),
                }
            )
    if not per_step:
        return None
    sample_calls = recorder.calls[next(s for s in steps if recorder.calls.get(s))]
    sizes: dict[int, int] = defaultdict(int)
    for call in sample_calls:
        sizes[call["n"]] += call["count"]
    seconds = statistics.median(s["seconds"] for s in per_step)
    flops = per_step[0]["flops"]
    return {
        "seconds": _stats([s["seconds"] for s in per_step]),
        "flops": flops,
        "flops_per_s": flops / seconds if seconds > 0 else None,
        "calls_per_refresh": per_step[0]["calls"],
        "factors": dict(sorted(sizes.items())),
        "label": sample_calls[0]["label"],
        "precision": sample_calls[0]["precision"],
        "call_detail": [
            {"n": c["n"], "count": c["count"], "flops": c["flops"], "matmul_flops": c["matmul_flops"]}
            for c in sample_calls
        ],
    }


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------


def _row_record(spec: RowSpec) -> dict[str, Any]:
    record: dict[str, Any] = {
        "model": spec.model,
        "kind": spec.kind,
        "optimizer": spec.label,
        "block_size": spec.block_size,
        "frequency": spec.frequency,
        "stacking": spec.stacking,
        "method": spec.method,
    }
    if spec.kind == "dash":
        record["settings"] = "scaling power_multi, precision fp32, Adam grafting, root_steps 10"
    elif spec.peer is not None and spec.block_size is not None:
        record["settings"] = spec.peer.describe(spec.block_size, spec.frequency)
    else:
        record["settings"] = "lr 1e-3, betas (0.9, 0.95), wd 0" + (", fused" if spec.fused else ", foreach")
    return record


def _planned_steps(spec: RowSpec, args: argparse.Namespace) -> tuple[int, int]:
    """(steps, refresh steps) a row will run if it is not cut short."""
    if spec.frequency == 1:
        steps = args.warmup + args.repeats
        return steps, steps
    f = spec.frequency
    last_refresh = f * (args.warmup // f + args.refresh_repeats)
    steps = max(last_refresh, args.warmup + args.repeats + args.refresh_repeats)
    refreshes = 1 + steps // f
    return steps, refreshes


def _fused_reason(device: torch.device) -> str | None:
    try:
        probe = torch.zeros(2, device=device, requires_grad=True)
        probe.grad = torch.zeros_like(probe)
        torch.optim.AdamW([probe], fused=True).step()
    except Exception as error:
        return f"fused AdamW unavailable on {device.type}: {type(error).__name__}: {error}"
    return None


def run_rows(
    specs: list[RowSpec],
    device: torch.device,
    args: argparse.Namespace,
    calibration: Calibration,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Time every row; a row that cannot run or raises keeps its reason instead of times."""
    rows: list[dict[str, Any]] = []
    fused_reason = _fused_reason(device)
    by_model: dict[str, list[RowSpec]] = defaultdict(list)
    for spec in specs:
        by_model[spec.model].append(spec)
    for model, model_specs in by_model.items():
        shapes = MODELS[model]
        progress(f"[{model}] {shapes.numel / 1e6:.1f}M parameters: building tensors")
        params = make_parameters(shapes, device, seed=args.seed)
        grads = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
        shape_list = [shape for _, shape in shapes.shapes]
        for spec in model_specs:
            record = _row_record(spec)
            reason = None
            if spec.kind == "adamw" and spec.fused:
                reason = fused_reason
            elif spec.kind == "peer" and spec.peer is not None and spec.block_size is not None:
                reason = spec.peer.unavailable(shape_list, spec.block_size, device)
            elif spec.kind == "dash" and args.max_estimate is not None:
                steps, refreshes = _planned_steps(spec, args)
                estimate, detail = estimate_dash(spec, shapes, calibration, steps, refreshes)
                record["estimate_seconds"] = estimate
                if estimate > args.max_estimate:
                    reason = (
                        f"skipped: estimated {estimate:.0f} s ({detail}) > --max-estimate "
                        f"{args.max_estimate:.0f} s at this device's measured bmm/eigh throughput"
                    )
            if reason is None:
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.grad = g.clone()
                try:
                    record.update(time_row(spec, params, grads, device, args))
                except Exception as error:  # a failing optimizer is a row, never a crash
                    reason = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
            if reason is not None:
                record["reason"] = reason
            rows.append(record)
            progress(_progress_line(record))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del params, grads
        gc.collect()
    _add_ratios(rows)
    _add_efficiency(rows, calibration)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        timed = [r for r in rows if r["model"] == row["model"] and r.get("per_step")]
        adamw = [r["per_step"] for r in timed if r["kind"] == "adamw"]
        peers = [
            r["per_step"]
            for r in timed
            if r["kind"] == "peer"
            and r["block_size"] == row["block_size"]
            and r["frequency"] == row["frequency"]
        ]
        value = row.get("per_step")
        row["vs_adamw"] = value / min(adamw) if value and adamw else None
        row["vs_best_peer"] = value / min(peers) if value and peers and row["kind"] != "adamw" else None
        # Speed-up over DASH's sequential mode ("none") on the same model, block, F and solver.
        sequential = [
            r["per_step"]
            for r in timed
            if r["kind"] == "dash"
            and r["stacking"] == "none"
            and (r["block_size"], r["frequency"], r["method"])
            == (row["block_size"], row["frequency"], row.get("method"))
        ]
        row["speedup_vs_none"] = (
            sequential[0] / value if value and sequential and row["kind"] == "dash" else None
        )


def _add_efficiency(rows: list[dict[str, Any]], calibration: Calibration) -> None:
    """Achieved solver FLOP/s against the measured bmm rate: ``ideal time / solver time``."""
    for row in rows:
        solver = row.get("solver")
        if not solver or not calibration.bmm:
            continue
        ideal = sum(c["flops"] / calibration.rate(c["n"]) for c in solver["call_detail"])
        solver["bmm_rate_flops_per_s"] = solver["flops"] / ideal if ideal else None
        solver["efficiency"] = ideal / solver["seconds"]["median"] if solver["seconds"]["median"] else None


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _progress_line(row: dict[str, Any]) -> str:
    name = _row_name(row)
    if "reason" in row:
        return f"  {name}: {row['reason']}"
    solver = row.get("solver")
    extra = f", root {solver['flops_per_s'] / 1e9:.1f} GFLOP/s" if solver and solver["flops_per_s"] else ""
    return (
        f"  {name}: per step {ms(row['per_step'])} ms (refresh {spread(row['refresh'])}, other "
        f"{spread(row['other'])}){extra}, {row['row_seconds']:.1f} s"
    )


def _row_name(row: dict[str, Any]) -> str:
    if row["kind"] == "dash":
        return f"DASH {row['stacking']}/{row['method']} B={row['block_size']} F={row['frequency']}"
    if row["kind"] == "peer":
        return f"{row['optimizer']} B={row['block_size']} F={row['frequency']}"
    return row["optimizer"]


def table(rows: list[dict[str, Any]]) -> str:
    """The main markdown table (one line per row)."""
    head = (
        "| model | optimizer | B | F | stacking | solver | per step ms | refresh step ms [min–max] | "
        "other step ms [min–max] | × AdamW | × best peer | speed-up vs none | state B/param | "
        "root GFLOP/s | % of bmm | notes |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        solver = row.get("solver") or {}
        rate = solver.get("flops_per_s")
        efficiency = solver.get("efficiency")
        notes = row.get("reason") or (row["settings"] if row["kind"] == "peer" else "")
        if row.get("cut_short"):
            notes = (notes + "; " if notes else "") + "cut short by --row-seconds"
        if solver:
            notes = (notes + "; " if notes else "") + solver["label"]
        if row.get("root_failures"):
            notes = (notes + "; " if notes else "") + f"{row['root_failures']} root failures"
        state = row.get("state_bytes_per_param")
        lines.append(
            "| "
            + " | ".join(
                [
                    row["model"],
                    row["optimizer"],
                    str(row["block_size"] or "–"),
                    str(row["frequency"]) if row["kind"] != "adamw" else "–",
                    row["stacking"] or "–",
                    row["method"] or "–",
                    ms(row.get("per_step")),
                    spread(row.get("refresh")) if row["frequency"] > 1 else "–",
                    spread(row.get("other")) if row["frequency"] > 1 else spread(row.get("refresh")),
                    _ratio(row.get("vs_adamw")),
                    _ratio(row.get("vs_best_peer")),
                    _ratio(row.get("speedup_vs_none")),
                    f"{state:.1f}" if state is not None else "–",
                    f"{rate / 1e9:.1f}" if rate else "–",
                    f"{100 * efficiency:.0f}%" if efficiency else "–",
                    notes.replace("|", "/"),
                ]
            )
            + " |"
        )
    return head + "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    """The whole markdown report: header, calibration, table, how to read it."""
    calibration = report["calibration"]["bmm"]
    cal_lines = ", ".join(
        f"n={c['n']} (K={c['K']}): {c['flops_per_s'] / 1e9:.1f} GFLOP/s [{c['min'] / 1e9:.1f}–"
        f"{c['max'] / 1e9:.1f}]"
        for c in calibration
    )
    models = ", ".join(
        f"`{m['name']}` ({m['numel'] / 1e6:.1f}M: {m['description']})" for m in report["models"]
    )
    return (
        f"# Optimizer step benchmark — {report['device']}\n\n"
        f"- command: `{report['command']}`\n"
        f"- device: {report['device']}; torch {report['torch']}, Python {report['python']}; "
        f"{report['date']}; total {report['wall_seconds']:.0f} s\n"
        f"- plan `{report['plan']}`; warm-up {report['warmup']} step(s), {report['repeats']} timed "
        f"samples per step kind, {report['refresh_repeats']} refresh sample(s) when F > 1, row cap "
        f"{report['row_seconds']} s, DASH rows estimated over {report['max_estimate']} s skipped\n"
        f"- models: {models}\n"
        f"- bmm throughput (fp32, median [min–max] of 3): {cal_lines}\n\n"
        f"{table(report['rows'])}\n"
        "How to read it. *per step* is the median step time, or for F > 1 the amortised "
        "`(refresh + (F−1)·other)/F` of the two medians; *× AdamW* divides it by the fastest AdamW "
        "row of the model and *× best peer* by the fastest peer row with the same model, B and F; "
        "*speed-up vs none* is the time of DASH's sequential per-block mode (stacking `none`, same "
        "model, B, F and solver) divided by this row's. "
        "The gradient is random (seeded) and the same at every step; it is copied into `p.grad` "
        "outside the timed region. *root GFLOP/s* is the solver flop count (see *notes*; eigh is "
        "a nominal 9n³+2n³) over the solver time of a refresh step (`inverse_root` calls timed "
        "inside the step), and *% of bmm* that time against the ideal time at the measured bmm "
        "throughput of each factor size. State bytes count every distinct tensor in "
        "`state_dict()['state']`. Timings on a shared machine are noisy: other jobs ran during this "
        "run, so compare medians and look at the [min–max] spread; n=1 means one sample only.\n"
    )


def plot(report: dict[str, Any], path: Path) -> bool:
    """Bar chart of the per-step time of every timed row (log scale); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report["rows"] if r.get("per_step")]
    if not rows:
        return False
    colors = {"adamw": "tab:gray", "dash": "tab:blue", "peer": "tab:orange"}
    labels = [f"{r['model']}: {_row_name(r)}" for r in rows]
    values = [r["per_step"] * 1e3 for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    positions = list(range(len(rows)))[::-1]
    ax.barh(positions, values, color=[colors[r["kind"]] for r in rows])
    refresh = [
        (p, r["refresh"]["median"] * 1e3)
        for p, r in zip(positions, rows)
        if r["frequency"] > 1 and r.get("refresh")
    ]
    if refresh:
        ax.scatter(
            [v for _, v in refresh], [p for p, _ in refresh], marker="|", color="black", s=60, zorder=3
        )
    ax.set_yticks(positions)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("ms per step (median; amortised over F for F > 1; | = refresh step)")
    ax.set_title(f"Optimizer step time — {report['device']}", fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], fontsize=7, loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _calibration_sizes(specs: list[RowSpec]) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for spec in specs:
        if spec.kind == "dash" and spec.block_size is not None:
            for n, count in factor_counts(MODELS[spec.model], spec.block_size).items():
                if n >= 16:
                    sizes[n] = max(sizes.get(n, 0), count)
    return sizes


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write ``step-<device>.{json,md,png}`` under ``--out``."""
    began = time.perf_counter()
    args, device = _resolve(args)
    specs = full_plan(args, device) if args.plan == "full" else cpu_plan(args, device)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    sizes = _calibration_sizes(specs)
    progress(f"calibrating bmm at n = {sorted(sizes)} on {device_name(device)}")
    calibration = calibrate(
        sizes, device, "fp32", args.calibration_flops, with_eigh=args.max_estimate is not None
    )
    rows = run_rows(specs, device, args, calibration, progress)
    report = {
        "command": command_text(args, "dash-shampoo bench step (called from Python)"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "plan": args.plan,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "refresh_repeats": args.refresh_repeats,
        "row_seconds": args.row_seconds,
        "max_estimate": args.max_estimate,
        "seed": args.seed,
        "models": [
            {"name": m, "numel": MODELS[m].numel, "description": MODELS[m].description}
            for m in dict.fromkeys(s.model for s in specs)
        ],
        "calibration": {
            "precision": "fp32",
            "bmm": [calibration.bmm[n] for n in sorted(calibration.bmm)],
            "eigh_seconds_per_matrix": {str(n): s for n, s in sorted(calibration.eigh.items())},
        },
        "rows": rows,
    }
    report["wall_seconds"] = time.perf_counter() - began
    print(table(rows))
    if args.out is not None:
        stem = args.out / f"step-{device_slug(device)}"
        written = write_report(stem, report, markdown(report), None if args.no_plot else plot, default=str)
        progress("wrote " + ", ".join(map(str, written)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dash_shampoo.bench.step``: the same as ``dash-shampoo bench step``."""
    parser = argparse.ArgumentParser(prog="dash-shampoo bench step")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


__all__: list[str] = [
    "RowSpec",
    "SolverRecorder",
    "add_arguments",
    "calibrate",
    "estimate_dash",
    "main",
    "measure_bmm",
    "root_flops",
    "run",
    "table",
]
