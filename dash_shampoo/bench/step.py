"""Optimizer-step benchmark (``dash-shampoo bench step``): AdamW, DASH and the peers on model shapes.

Parameters shaped like real models (:mod:`dash_shampoo.bench.shapes`) get one random gradient from
a seeded ``torch.Generator``; the same gradient is copied back into ``p.grad`` before every step
(outside the timed region, since some optimizers change or drop the gradient). Each row builds a
fresh optimizer, runs ``warmup`` untimed steps (the first step also builds DASH's layout and
state) and then times consecutive steps (:mod:`dash_shampoo.bench.timing`). With refresh period
``F > 1`` the steps that refresh the roots (DASH's schedule, also used to sort the peers' steps)
and the other steps are timed separately, until ``repeats`` other steps and ``refresh_repeats``
refresh steps are in, or ``row_seconds`` have passed with at least one of each. The per-step
figure used for the ratios is the amortised ``(refresh + (F − 1)·other) / F`` of the medians.

Per row the report gives medians with min–max over the samples, the optimizer state in bytes per
parameter (distinct tensors reachable from ``optimizer.state_dict()["state"]``), the ratio to the
fastest AdamW row and to the fastest peer of the same model, block size and frequency, and for
DASH the root refresh itself: a root hook (``DASH.register_root_hook``) times every solver call
and counts its flops (:func:`root_flops`), and the achieved FLOP/s are set against the
batched-matmul throughput of the device measured in the same process (``bmm`` of the solver's
precision on ``(K, n, n)`` stacks, :func:`measure_bmm`).

Every row is also counted on the accelerator path (:mod:`dash_shampoo.bench.counts`: kernels,
host syncs, matmul FLOPs and bytes of a refresh and another step, on meta tensors, so a CPU counts
what a GPU would launch); ``--counts-only`` skips the timing. ``--interleave`` builds every
optimizer of a model first and steps them in turn, in an order reshuffled at every step, so the
drifts of a shared machine fall on every row alike. The authors' ``DashGpu`` is a peer on any
device (:func:`dash_shampoo.peers.authors_dash` imports it without CUDA, Triton or wandb).

Which rows run and how long they are sampled is a preset (:data:`PRESETS`): ``cpu`` (the default
on a CPU, where one NDB refresh of ``124m`` at block 1024 takes minutes, so it has the rows that
fit in about a quarter of an hour), ``gpu`` (the default on CUDA: the whole grid) and ``quick`` (a
smoke test). ``--models``, ``--block-sizes``, ``--frequencies``, ``--stackings``, ``--methods`` and
``--peers`` keep only the preset's rows that match; ``--warmup``, ``--repeats``,
``--refresh-repeats`` and ``--row-seconds`` replace its sampling.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import math
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import peers as peers_module
from ..linalg import METHODS, RootOptions, bmm, root_matmuls
from ..optimizer import DASH, STACKINGS, RootCall
from ..preconditioner import refresh_due
from ..results import RunRecord, markdown_table, metadata_lines, ms, ratio, save_plot, spread, write_report
from . import counts
from .shapes import SET_NAMES, ShapeSet, factor_counts, make_parameters, shape_set
from .timing import Interval, per_step, split_refresh, stats, sync, time_region, timed, torch_threads

# ---------------------------------------------------------------------------------------------
# Presets and rows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """DASH rows for every model × block size × frequency × stacking × solver, and with ``peers``
    the peers' rows for every model × block size × frequency."""

    models: tuple[str, ...]
    block_sizes: tuple[int, ...]
    frequencies: tuple[int, ...]
    stackings: tuple[str, ...] = ("global",)
    methods: tuple[str, ...] = ("ndb", "eigh")
    peers: bool = False


@dataclass(frozen=True)
class Preset:
    """A named benchmark run: its rows and how each row is sampled.

    Attributes:
        description: one line for ``--help`` and the report.
        grids: the rows (each model also gets the two AdamW rows).
        warmup: untimed steps per row.
        repeats: timed steps (the other steps when ``F > 1``).
        refresh_repeats: timed refresh steps when ``F > 1``.
        row_seconds: sampling stops after this, once a row has one step of each kind.
        bmm_flops: flops of one throughput-calibration ``bmm`` call.
    """

    description: str
    grids: tuple[Grid, ...]
    warmup: int = 1
    repeats: int = 5
    refresh_repeats: int = 1
    row_seconds: float = 60.0
    bmm_flops: float = 2e9


LLM_SETS = ("mini", "small", "124m", "350m", "953m-rank")
PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        "the committed CPU results: mini (stackings, solvers, block sizes, peers) and a few larger rows",
        (
            Grid(("mini",), (256,), (10,), STACKINGS, ("ndb", "eigh", "newton"), peers=True),
            Grid(("mini",), (256,), (1,), STACKINGS),
            Grid(("mini",), (512, 1024), (10,)),
            Grid(("small",), (256,), (10,)),
            Grid(("124m", "953m-rank"), (1024,), (10,), methods=("eigh",)),
        ),
    ),
    "gpu": Preset(
        "every model × block size × frequency × stacking × solver, and every peer",
        (Grid(LLM_SETS, (256, 512, 1024), (1, 10), STACKINGS, ("ndb", "eigh", "newton"), peers=True),),
        warmup=3,
        repeats=20,
        refresh_repeats=5,
        row_seconds=120.0,
        bmm_flops=2e11,
    ),
    "quick": Preset(
        "smoke test: the micro model at block 64, stackings global and none, and the peers",
        (Grid(("micro",), (64,), (1, 10), ("global", "none"), peers=True),),
        repeats=3,
    ),
    "counts": Preset(
        "the committed counts (use with --counts-only): llama-21m at block 256 (every stacking) and "
        "one rank's share of the 953M model at block 1024, NDB and eigh, F 1 and 10, and the peers",
        (
            Grid(("llama-21m",), (256,), (1, 10), STACKINGS, ("ndb", "eigh"), peers=True),
            Grid(("953m-rank",), (1024,), (1, 10), ("global", "none"), ("ndb", "eigh"), peers=True),
        ),
    ),
}
SAMPLING = ("warmup", "repeats", "refresh_repeats", "row_seconds")


@dataclass(frozen=True)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench step``."""
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    add = parser.add_argument
    presets = "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())
    add("--preset", choices=tuple(PRESETS), help=f"default cpu on a CPU, gpu on CUDA. {presets}")
    add("--models", nargs="+", choices=SET_NAMES, help="keep these models' rows")
    add("--block-sizes", type=int, nargs="+", help="keep these block sizes")
    add("--frequencies", type=int, nargs="+", help="keep these refresh periods")
    add("--stackings", nargs="+", choices=STACKINGS, help="keep these DASH stackings")
    add("--methods", nargs="+", choices=METHODS, help="keep these DASH root solvers")
    add("--peers", nargs="+", help="keep these peers (name or class name), or 'none'")
    add("--warmup", type=int, help="untimed steps per row")
    add("--repeats", type=int, help="timed samples of each step kind")
    add("--refresh-repeats", type=int, help="timed refresh steps (F > 1)")
    add("--row-seconds", type=float, help="stop sampling a row after this")
    add("--device", default="auto", help="auto, cpu or cuda[:i]")
    add(
        "--threads",
        type=int,
        help="torch CPU threads (default 1 on a CPU: on a shared machine a second thread waiting on a "
        "descheduled one made elementwise steps 30-100x slower; 0 keeps torch's default)",
    )
    add(
        "--interleave",
        action="store_true",
        help="build every optimizer of a model first, then step them in turn in a reshuffled order "
        "(drifts of a shared machine fall on every row alike); default: one row after another",
    )
    add(
        "--counts-only",
        action="store_true",
        help="only count each row's kernels, host syncs, FLOPs and bytes on the meta device (seconds, "
        "any model size); no timing",
    )
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=Path("benchmarks/results"))
    add("--no-plot", action="store_true")


def _resolve(args: argparse.Namespace) -> tuple[Preset, torch.device]:
    """The preset with the sampling options applied, and the device."""
    cuda = torch.cuda.is_available()
    device = torch.device(("cuda" if cuda else "cpu") if args.device == "auto" else args.device)
    args.preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    sampling = {key: getattr(args, key) for key in SAMPLING if getattr(args, key) is not None}
    preset = dataclasses.replace(PRESETS[args.preset], **sampling)
    if min(preset.warmup, preset.repeats, preset.refresh_repeats) < 1:
        raise ValueError("--warmup, --repeats and --refresh-repeats must be at least 1")
    return preset, device


def _wanted(row: RowSpec, args: argparse.Namespace) -> bool:
    """Whether ``row`` passes the ``--models`` ... ``--methods`` filters."""
    values = {"models": row.model, "block_sizes": row.block_size, "frequencies": row.frequency}
    if row.kind == "dash":
        values.update(stackings=row.stacking, methods=row.method)
    return all(getattr(args, key) is None or value in getattr(args, key) for key, value in values.items())


def plan(preset: Preset, args: argparse.Namespace) -> list[RowSpec]:
    """The preset's rows that pass the filters, model by model, each model's AdamW rows first."""
    peers = [] if args.peers == ["none"] else peers_module.find(args.peers)
    rows = []
    for grid in preset.grids:
        for model, block, frequency in itertools.product(grid.models, grid.block_sizes, grid.frequencies):
            for stacking, method in itertools.product(grid.stackings, grid.methods):
                rows.append(RowSpec(model, "dash", "DASH", frequency, block, stacking, method))
            if grid.peers:
                rows += [
                    RowSpec(model, "peer", peer.name, frequency, block, method=peer.solver, peer=peer)
                    for peer in peers
                ]
    rows = [row for row in rows if _wanted(row, args)]
    ordered = []
    for model in dict.fromkeys(row.model for row in rows):
        ordered += [RowSpec(model, "adamw", f"AdamW ({k})", fused=k == "fused") for k in ("foreach", "fused")]
        ordered += [row for row in rows if row.model == model]
    return ordered


# ---------------------------------------------------------------------------------------------
# Flop counts and matmul throughput
# ---------------------------------------------------------------------------------------------


def root_flops(options: RootOptions, n: int, p: int) -> tuple[float, float, str]:
    """Flops of one ``n × n`` inverse ``p``-th root with ``options``: ``(total, matmul part, label)``.

    A matmul of two ``n × n`` matrices is ``2n³``, times :func:`~dash_shampoo.linalg.root_matmuls`.
    Power-iteration scaling adds ``2n²·v·(scaling_steps + 1)``. ``eigh`` is counted as a nominal
    ``9n³`` plus ``2n³`` for ``Q diag Qᵀ`` (labelled "nominal": eigh is not a matmul and its real
    count depends on the kernel).
    """
    matmul = 2.0 * n**3
    count = root_matmuls(options.method, p, steps=options.steps, degree=options.degree)
    if count is None:
        return 9.0 * n**3 + matmul, matmul, "eigh nominal 9n³+2n³"
    scale = 0.0
    if options.method in ("ndb", "newton") and options.scaling in ("power", "power_multi"):
        vectors = 1 if options.scaling == "power" else options.num_vectors
        scale = 2.0 * n * n * vectors * (options.scaling_steps + 1)
    return count * matmul + scale, count * matmul, f"{options.method} {count} matmuls"


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
    _, times = timed(lambda: bmm(a, b, precision), repeats, device)
    rates = sorted(2.0 * count * n**3 / t for t in times)
    return {"n": n, "K": count, "flops_per_s": statistics.median(rates), "min": rates[0], "max": rates[-1]}


def calibrate(specs: list[RowSpec], device: torch.device, target_flops: float) -> dict[int, dict[str, Any]]:
    """fp32 :func:`measure_bmm` at every factor size (from 16) of the DASH rows, ``{n: result}``."""
    sizes: dict[int, int] = {}
    for spec in specs:
        if spec.kind == "dash" and spec.block_size is not None:
            for n, count in factor_counts(shape_set(spec.model), spec.block_size).items():
                if n >= 16:
                    sizes[n] = max(sizes.get(n, 0), count)
    return {n: measure_bmm(n, device, "fp32", target_flops, count) for n, count in sorted(sizes.items())}


def _rate(calibration: dict[int, dict[str, Any]], n: int) -> float:
    """bmm FLOP/s at the measured size nearest to ``n``."""
    nearest = min(calibration, key=lambda m: abs(math.log(m / n)))
    return calibration[nearest]["flops_per_s"]


# ---------------------------------------------------------------------------------------------
# Running one row
# ---------------------------------------------------------------------------------------------


class SolverRecorder:
    """A DASH root hook (:meth:`DASH.register_root_hook`) that times each solver call and counts
    its flops; calls are filed under :attr:`step` (set by the caller before each optimizer step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.step = 0
        self.calls: dict[int, list[dict[str, Any]]] = defaultdict(list)

    def __call__(self, root_call: RootCall, solve: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``solve`` inside a timed region and record the call."""
        count, n = root_call.factors.shape[0], root_call.factors.shape[-1]
        flops, matmul_flops, label = root_flops(root_call.options, n, root_call.p)
        roots, interval = time_region(solve, self.device)
        call = {"n": n, "count": count, "flops": flops * count, "matmul_flops": matmul_flops * count}
        self.calls[self.step].append(
            {**call, "label": label, "precision": root_call.options.precision, "time": interval}
        )
        return roots

    def summary(self, steps: list[int]) -> dict[str, Any] | None:
        """Solver time, flops and factor counts of the refreshes among ``steps`` (after a sync)."""
        refreshes = [self.calls[step] for step in steps if self.calls.get(step)]
        if not refreshes:
            return None
        seconds = [sum(call["time"].seconds for call in calls) for calls in refreshes]
        first = refreshes[0]
        factors: dict[int, int] = defaultdict(int)
        for call in first:
            factors[call["n"]] += call["count"]
        flops = sum(call["flops"] for call in first)
        median = statistics.median(seconds)
        return {
            "seconds": stats(seconds),
            "flops": flops,
            "flops_per_s": flops / median if median > 0 else None,
            "calls_per_refresh": len(first),
            "factors": dict(sorted(factors.items())),
            "label": first[0]["label"],
            "precision": first[0]["precision"],
            "call_detail": [
                {k: v for k, v in call.items() if k in ("n", "count", "flops", "matmul_flops")}
                for call in first
            ],
        }


def _build(spec: RowSpec, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if spec.kind == "adamw":
        kind = {"fused": True} if spec.fused else {"foreach": True}
        return torch.optim.AdamW(
            params, lr=peers_module.LR, betas=peers_module.BETAS, weight_decay=0.0, **kind
        )
    if spec.kind == "dash":
        layout = {"block_size": spec.block_size, "stacking": spec.stacking, "root_method": spec.method}
        options = {"precondition_frequency": spec.frequency, "scaling": "power_multi", "precision": "fp32"}
        return DASH(params, lr=peers_module.LR, betas=peers_module.BETAS, **layout, **options)
    assert spec.peer is not None and spec.block_size is not None
    return spec.peer.build(params, spec.block_size, spec.frequency)


def _restore_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


class Sampler:
    """Which step a row runs next: ``preset.warmup`` untimed steps, then timed ones until the
    preset's samples are in (``repeats`` other and ``refresh_repeats`` refresh steps when
    ``F > 1``), or its row time is up with one step of each kind."""

    def __init__(self, frequency: int, preset: Preset) -> None:
        self.frequency, self.preset = frequency, preset
        self.wanted = (preset.repeats, 0) if frequency == 1 else (preset.refresh_repeats, preset.repeats)
        self.least = (1, 0) if frequency == 1 else (1, 1)
        self.t = 0
        self.timed: list[tuple[int, Interval]] = []
        self.began: float | None = None
        self.cut_short = False

    def next_step(self) -> int | None:
        """The next step to run, or None when sampling is over."""
        if self.t >= self.preset.warmup:
            refreshes = sum(refresh_due(s, 1, self.frequency) for s, _ in self.timed)
            counts = (refreshes, len(self.timed) - refreshes)
            if all(c >= w for c, w in zip(counts, self.wanted)):
                return None
            enough = all(c >= w for c, w in zip(counts, self.least))
            if (
                self.began is not None
                and time.perf_counter() - self.began > self.preset.row_seconds
                and enough
            ):
                self.cut_short = True
                return None
        return self.t + 1

    def record(self, t: int, interval: Interval) -> None:
        """Step ``t`` took ``interval`` (warm-up steps are not kept)."""
        self.t = t
        if t > self.preset.warmup:
            self.timed.append((t, interval))
        elif t == self.preset.warmup:
            self.began = time.perf_counter()

    @property
    def samples(self) -> list[tuple[int, float]]:
        """``(step, seconds)`` of the timed steps (after the device is synchronised)."""
        return [(t, interval.seconds) for t, interval in self.timed]


class RowRun:
    """One row's optimizer, stepped one step at a time (:meth:`step`), then summarised
    (:meth:`measurements`)."""

    def __init__(
        self, spec: RowSpec, params: list[torch.Tensor], grads: list[torch.Tensor], device: torch.device
    ):
        self.spec, self.params, self.grads, self.device = spec, params, grads, device
        self.optimizer = _build(spec, params)
        self.recorder, self.handle = None, None
        if isinstance(self.optimizer, DASH):
            self.recorder = SolverRecorder(device)
            self.handle = self.optimizer.register_root_hook(self.recorder)
        self.began = time.perf_counter()

    def step(self, t: int) -> Interval:
        """Run step ``t`` on the row's gradient (put back first, untimed; the device not
        synchronised)."""
        if self.recorder is not None:
            self.recorder.step = t
        _restore_grads(self.params, self.grads)
        return time_region(self.optimizer.step, self.device)[1]

    def measurements(self, sampler: Sampler) -> dict[str, Any]:
        """The row's times, state size and solver summary from ``sampler``'s samples."""
        if self.handle is not None:
            self.handle.remove()
        sync(self.device)
        samples = sampler.samples
        refresh, other = (stats(part) for part in split_refresh(samples, self.spec.frequency))
        numel = sum(p.numel() for p in self.params)
        row: dict[str, Any] = {
            "refresh": refresh,
            "other": other,
            "per_step": per_step(self.spec.frequency, refresh, other),
            "samples": samples,
            "row_seconds": time.perf_counter() - self.began,
            "cut_short": sampler.cut_short,
            "state_bytes_per_param": peers_module.state_bytes(self.optimizer.state_dict()["state"]) / numel,
        }
        if isinstance(self.optimizer, DASH) and self.recorder is not None:
            row["solver"] = self.recorder.summary([s for s, _ in samples])
            row["root_failures"] = self.optimizer.root_failures
        if self.device.type == "cuda":
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return row


def time_row(
    spec: RowSpec, params: list[torch.Tensor], grads: list[torch.Tensor], device: torch.device, preset: Preset
) -> dict[str, Any]:
    """Build the optimizer of ``spec``, warm it up, time its steps; the row's measurements."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the row's own peak, not the run's
    run, sampler = RowRun(spec, params, grads, device), Sampler(spec.frequency, preset)
    while (t := sampler.next_step()) is not None:
        sampler.record(t, run.step(t))
        if t == preset.warmup:
            sync(device)
    return run.measurements(sampler)


def time_interleaved(
    specs: list[RowSpec],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    device: torch.device,
    preset: Preset,
    seed: int,
) -> list[dict[str, Any] | str]:
    """Time the rows of one model together: every optimizer is built first, then at each step
    every row still sampling runs once, in an order reshuffled at every step (seeded), so slow
    drifts of the machine fall on every row alike. Per row its measurements, or the reason it
    failed."""
    order = random.Random(seed)
    runs: dict[int, tuple[RowRun, Sampler]] = {}
    results: dict[int, dict[str, Any] | str] = {}
    for i, spec in enumerate(specs):
        try:
            runs[i] = (RowRun(spec, params, grads, device), Sampler(spec.frequency, preset))
        except Exception as error:  # a failing optimizer is a row, never a crash
            results[i] = _failure(error)
    while runs:
        for i in order.sample(sorted(runs), len(runs)):
            run, sampler = runs[i]
            t = sampler.next_step()
            try:
                if t is not None:
                    sampler.record(t, run.step(t))
                    continue
                results[i] = run.measurements(sampler)
            except Exception as error:
                results[i] = _failure(error)
            del runs[i]
    return [results[i] for i in range(len(specs))]


def _failure(error: Exception) -> str:
    return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------


def _row_record(spec: RowSpec) -> dict[str, Any]:
    if spec.kind == "dash":
        settings = "scaling power_multi, precision fp32, Adam grafting, root_steps 10"
    elif spec.peer is not None and spec.block_size is not None:
        settings = spec.peer.describe(spec.block_size, spec.frequency)
    else:
        settings = "lr 1e-3, betas (0.9, 0.95), wd 0" + (", fused" if spec.fused else ", foreach")
    fields = ("model", "kind", "block_size", "frequency", "stacking", "method")
    return {**{key: getattr(spec, key) for key in fields}, "optimizer": spec.label, "settings": settings}


def _fused_reason(device: torch.device) -> str | None:
    try:
        probe = torch.zeros(2, device=device, requires_grad=True)
        probe.grad = torch.zeros_like(probe)
        torch.optim.AdamW([probe], fused=True).step()
    except Exception as error:
        return f"fused AdamW unavailable on {device.type}: {type(error).__name__}: {error}"
    return None


def _skip_reason(spec: RowSpec, shapes: ShapeSet, device: torch.device, fused: str | None) -> str | None:
    if spec.kind == "adamw" and spec.fused:
        return fused
    if spec.peer is not None and spec.block_size is not None:
        return spec.peer.unavailable([shape for _, shape in shapes.shapes], spec.block_size, device)
    return None


def count_row(spec: RowSpec, shapes: ShapeSet) -> dict[str, Any]:
    """The row's counts on the accelerator path (:func:`dash_shampoo.bench.counts.count_optimizer`),
    or ``{"reason": ...}`` when the optimizer cannot be counted."""
    if spec.kind == "adamw" and spec.fused:
        return {"reason": "fused AdamW does not run on the meta device"}
    reason = _skip_reason(spec, shapes, torch.device("cuda"), None)
    if reason is not None:
        return {"reason": reason}
    try:
        return counts.count_optimizer(
            lambda params: _build(spec, params), [shape for _, shape in shapes.shapes], spec.frequency
        )
    except Exception as error:  # an optimizer that cannot run on meta tensors is a row, not a crash
        return {"reason": f"failed on meta: {type(error).__name__}: {str(error).splitlines()[0][:200]}"}


def minimum_bytes(model: str, block_size: int) -> int:
    """:func:`~dash_shampoo.bench.counts.minimum_other_step_bytes` of a model at ``block_size``."""
    shapes = shape_set(model)
    factor_elements = sum(n * n * k for n, k in factor_counts(shapes, block_size).items())
    return counts.minimum_other_step_bytes(shapes.numel, factor_elements)


def run_rows(
    specs: list[RowSpec],
    device: torch.device,
    preset: Preset,
    seed: int,
    progress: Callable[[str], None],
    counts_only: bool = False,
    interleave: bool = False,
) -> list[dict[str, Any]]:
    """Count and time every row (``counts_only``: count only; ``interleave``: a model's rows
    stepped in turn, :func:`time_interleaved`); a row that cannot run or raises keeps its reason
    instead of times."""
    rows: list[dict[str, Any]] = []
    fused = _fused_reason(device)
    for model in dict.fromkeys(spec.model for spec in specs):
        shapes = shape_set(model)
        if counts_only:
            for spec in (spec for spec in specs if spec.model == model):
                rows.append({**_row_record(spec), "counts": count_row(spec, shapes)})
                progress(f"  {_row_name(rows[-1])}: counted")
            continue
        progress(f"[{model}] {shapes.numel / 1e6:.1f}M parameters: building tensors")
        params = make_parameters(shapes, device, seed=seed)
        grads = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
        mine = [spec for spec in specs if spec.model == model]
        reasons = [_skip_reason(spec, shapes, device, fused) for spec in mine]
        together: dict[int, dict[str, Any] | str] = {}
        if interleave:
            runnable = [i for i, reason in enumerate(reasons) if reason is None]
            progress(f"  {len(runnable)} rows stepped in turn")
            timed_rows = time_interleaved([mine[i] for i in runnable], params, grads, device, preset, seed)
            together = dict(zip(runnable, timed_rows))
        for i, (spec, reason) in enumerate(zip(mine, reasons)):
            record = _row_record(spec)
            record["counts"] = count_row(spec, shapes)
            if reason is None:
                try:
                    measured = together[i] if interleave else time_row(spec, params, grads, device, preset)
                except Exception as error:  # a failing optimizer is a row, never a crash
                    measured = _failure(error)
                if isinstance(measured, str):
                    reason = measured
                else:
                    record.update(measured, interleaved=interleave)
            if reason is not None:
                record["reason"] = reason
            rows.append(record)
            progress(_progress_line(record))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del params, grads
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``vs_adamw``, ``vs_best_peer`` (same model, B, F), and for DASH ``vs_same_solver`` (the
    fastest peer running the same solver: the authors' code and pytorch_optimizer's DASH) and
    ``speedup_vs_none``: the sequential mode's (stacking ``none``, same model, B, F, solver) per-step
    time over this row's."""
    for row in rows:
        timed_rows = [r for r in rows if r["model"] == row["model"] and r.get("per_step")]
        same = [
            r
            for r in timed_rows
            if (r["block_size"], r["frequency"]) == (row["block_size"], row["frequency"])
        ]
        adamw = [r["per_step"] for r in timed_rows if r["kind"] == "adamw"]
        peers = [r["per_step"] for r in same if r["kind"] == "peer"]
        alike = [r["per_step"] for r in same if r["kind"] == "peer" and r["method"] == row["method"]]
        sequential = [
            r["per_step"]
            for r in same
            if r["kind"] == "dash" and r["stacking"] == "none" and r["method"] == row["method"]
        ]
        value = row.get("per_step")
        row["vs_adamw"] = value / min(adamw) if value and adamw else None
        row["vs_best_peer"] = value / min(peers) if value and peers and row["kind"] != "adamw" else None
        row["vs_same_solver"] = value / min(alike) if value and alike and row["kind"] == "dash" else None
        row["speedup_vs_none"] = (
            sequential[0] / value if value and sequential and row["kind"] == "dash" else None
        )


def add_efficiency(rows: list[dict[str, Any]], calibration: dict[int, dict[str, Any]]) -> None:
    """Achieved solver FLOP/s against the measured bmm rate: ``ideal time / solver time``."""
    for row in rows:
        solver = row.get("solver")
        if not solver or not calibration:
            continue
        ideal = sum(c["flops"] / _rate(calibration, c["n"]) for c in solver["call_detail"])
        solver["bmm_rate_flops_per_s"] = solver["flops"] / ideal if ideal else None
        median = solver["seconds"]["median"]
        solver["efficiency"] = ideal / median if median else None


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _row_name(row: dict[str, Any]) -> str:
    if row["kind"] == "dash":
        return f"DASH {row['stacking']}/{row['method']} B={row['block_size']} F={row['frequency']}"
    if row["kind"] == "peer":
        return f"{row['optimizer']} B={row['block_size']} F={row['frequency']}"
    return row["optimizer"]


def _progress_line(row: dict[str, Any]) -> str:
    if "reason" in row:
        return f"  {_row_name(row)}: {row['reason']}"
    solver = row.get("solver")
    extra = f", root {solver['flops_per_s'] / 1e9:.1f} GFLOP/s" if solver and solver["flops_per_s"] else ""
    return (
        f"  {_row_name(row)}: per step {ms(row['per_step'])} ms (refresh {spread(row['refresh'])}, other "
        f"{spread(row['other'])}){extra}, {row['row_seconds']:.1f} s"
    )


TABLE_HEADER = (
    "model", "optimizer", "B", "F", "stacking", "solver", "per step ms", "refresh step ms [min–max]",
    "other step ms [min–max]", "× AdamW", "× best peer", "× same-solver peer", "speed-up vs none",
    "state B/param",
    "root GFLOP/s", "% of bmm", "notes",
)  # fmt: skip


def _cells(row: dict[str, Any]) -> list[str]:
    solver = row.get("solver") or {}
    rate, efficiency, state = (
        solver.get("flops_per_s"),
        solver.get("efficiency"),
        row.get("state_bytes_per_param"),
    )
    notes = [row.get("reason") or (row["settings"] if row["kind"] == "peer" else "")]
    notes += ["cut short by --row-seconds"] if row.get("cut_short") else []
    notes += ["interleaved"] if row.get("interleaved") else []
    notes += [solver["label"]] if solver else []
    notes += [f"{row['root_failures']} root failures"] if row.get("root_failures") else []
    periodic = row["frequency"] > 1
    return [
        row["model"],
        row["optimizer"],
        str(row["block_size"] or "–"),
        str(row["frequency"]) if row["kind"] != "adamw" else "–",
        row["stacking"] or "–",
        row["method"] or "–",
        ms(row.get("per_step")),
        spread(row.get("refresh")) if periodic else "–",
        spread(row.get("other" if periodic else "refresh")),
        ratio(row.get("vs_adamw")),
        ratio(row.get("vs_best_peer")),
        ratio(row.get("vs_same_solver")),
        ratio(row.get("speedup_vs_none")),
        f"{state:.1f}" if state is not None else "–",
        f"{rate / 1e9:.1f}" if rate else "–",
        f"{100 * efficiency:.0f}%" if efficiency else "–",
        "; ".join(note for note in notes if note),
    ]


def table(rows: list[dict[str, Any]]) -> str:
    """The main markdown table (one line per row)."""
    return markdown_table(TABLE_HEADER, map(_cells, rows))


def markdown(report: dict[str, Any]) -> str:
    """The whole markdown report: header, calibration, table, how to read it."""
    calibration = ", ".join(
        f"n={c['n']} (K={c['K']}): {c['flops_per_s'] / 1e9:.1f} GFLOP/s [{c['min'] / 1e9:.1f}–"
        f"{c['max'] / 1e9:.1f}]"
        for c in report["calibration"]["bmm"]
    )
    models = ", ".join(
        f"`{m['name']}` ({m['numel'] / 1e6:.1f}M: {m['description']})" for m in report["models"]
    )
    title = "counts (accelerator path, meta tensors)" if report.get("counts_only") else "benchmark"
    header = [f"# Optimizer step {title} — {report['device']}", "", *metadata_lines(report)]
    count_section = [
        "## Kernels, host syncs, FLOPs and bytes per step (accelerator path, counted on meta tensors)",
        "",
        counts.count_table(report["rows"]),
        counts.COUNT_NOTES,
        "",
    ]
    if report.get("counts_only"):
        return "\n".join([*header, f"- preset `{report['preset']}`; models: {models}", "", *count_section])
    return "\n".join(
        [
            *header,
            f"- preset `{report['preset']}`; warm-up {report['warmup']} step(s), {report['repeats']} timed "
            f"samples per step kind, {report['refresh_repeats']} refresh sample(s) when F > 1, row cap "
            f"{report['row_seconds']} s",
            f"- models: {models}",
            f"- bmm throughput (fp32, median [min–max] of 3): {calibration}",
            "",
            table(report["rows"]),
            "How to read it. *per step* is the median step time, or for F > 1 the amortised "
            "`(refresh + (F−1)·other)/F` of the two medians; *× AdamW* divides it by the fastest AdamW "
            "row of the model and *× best peer* by the fastest peer row with the same model, B and F, "
            "*× same-solver peer* by the fastest of those that run DASH's solver (the authors' "
            "`DashGpu`, pytorch_optimizer's `DASH`); rows marked *interleaved* were stepped in turn "
            "with the model's other rows, in a reshuffled order at every step; "
            "*speed-up vs none* is the time of DASH's sequential per-block mode (stacking `none`, same "
            "model, B, F and solver) divided by this row's. "
            "The gradient is random (seeded) and the same at every step; it is copied into `p.grad` "
            "outside the timed region. *root GFLOP/s* is the solver flop count (see *notes*; eigh is "
            "a nominal 9n³+2n³) over the solver time of a refresh step (the solver calls timed inside "
            "the step by a root hook), and *% of bmm* that time against the ideal time at the measured "
            "bmm throughput of each factor size. State bytes count every distinct tensor in "
            "`state_dict()['state']`. Timings on a shared machine are noisy: compare medians and look "
            "at the [min–max] spread; n=1 means one sample only.",
            "",
            *count_section,
        ]
    )


def plot(report: dict[str, Any], path: Path) -> bool:
    """Bar chart of the per-step time of every timed row (log scale); False without matplotlib."""
    rows = [r for r in report["rows"] if r.get("per_step")]
    colors = {"adamw": "tab:gray", "dash": "tab:blue", "peer": "tab:orange"}

    def draw(plt: Any) -> Any:
        if not rows:
            return None
        from matplotlib.patches import Patch

        fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
        positions = list(range(len(rows)))[::-1]
        ax.barh(positions, [r["per_step"] * 1e3 for r in rows], color=[colors[r["kind"]] for r in rows])
        refresh = [(p, r["refresh"]["median"] * 1e3) for p, r in zip(positions, rows) if r["frequency"] > 1]
        if refresh:
            ax.scatter(
                [v for _, v in refresh], [p for p, _ in refresh], marker="|", color="black", s=60, zorder=3
            )
        ax.set_yticks(positions)
        ax.set_yticklabels([f"{r['model']}: {_row_name(r)}" for r in rows], fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("ms per step (median; amortised over F for F > 1; | = refresh step)")
        ax.set_title(f"Optimizer step time — {report['device']}", fontsize=9)
        handles = [Patch(color=c, label=k) for k, c in colors.items()]
        ax.legend(handles=handles, fontsize=7, loc="lower right")
        ax.grid(axis="x", which="both", alpha=0.3)
        fig.tight_layout()
        return fig

    return save_plot(path, draw, dpi=120)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write ``step-<device>.{json,md,png}`` under ``--out``."""
    preset, device = _resolve(args)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    with torch_threads(threads):
        return _run(args, preset, device)


def _run(args: argparse.Namespace, preset: Preset, device: torch.device) -> int:
    record = RunRecord.start(args, device, "dash-shampoo bench step")
    specs = plan(preset, args)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    progress(f"preset {args.preset}: {len(specs)} rows on {record.device}")
    calibration = {} if args.counts_only else calibrate(specs, device, preset.bmm_flops)
    rows = run_rows(specs, device, preset, args.seed, progress, args.counts_only, args.interleave)
    add_ratios(rows)
    add_efficiency(rows, calibration)
    counts.add_count_ratios(rows, minimum_bytes)
    models = [shape_set(name) for name in dict.fromkeys(spec.model for spec in specs)]
    report = {
        **record.metadata(),
        "threads": torch.get_num_threads(),
        "preset": args.preset,
        **{key: getattr(preset, key) for key in SAMPLING},
        "seed": args.seed,
        "models": [{"name": m.name, "numel": m.numel, "description": m.description} for m in models],
        "calibration": {"precision": "fp32", "bmm": list(calibration.values())},
        "rows": rows,
    }
    report["counts_only"] = args.counts_only
    print(counts.count_table(rows) if args.counts_only else table(rows))
    if args.out is not None:
        plotter = None if args.no_plot or args.counts_only else plot
        # Counts do not depend on the machine that counts them (meta tensors): no device in the name.
        stem = args.out / "step-counts" if args.counts_only else record.stem(args.out, "step")
        written = write_report(stem, report, markdown(report), plotter, default=str)
        progress("wrote " + ", ".join(map(str, written)))
    return 0
