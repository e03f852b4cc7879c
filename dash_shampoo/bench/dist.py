"""Multi-process step benchmark (``dash-shampoo bench dist``): DASH sharing its work across ranks.

For each world size of ``--worlds`` the command spawns that many processes (``torch.multiprocessing``,
``spawn``, ``file://`` rendezvous). The backend is NCCL with one GPU per rank when CUDA is available
with at least as many GPUs as the largest world size, else gloo on the CPU (one backend for all
rows). Every rank builds the same parameters (a Llama-style shape set of
:mod:`dash_shampoo.bench.shapes`, ``--model``) with the same seeded random gradients, as DDP
would leave them after its all-reduce, and times ``optimizer.step()`` of three configurations of
the same DASH:

- ``shared-fp32``: the default process group, so each rank refreshes and applies its share of the
  blocks and the updates are all-gathered in float32;
- ``shared-bf16``: the same with ``communication="bf16"`` (skipped at one process, where nothing is
  exchanged);
- ``replicated``: every rank does all the work, as without distribution
  (``process_group=False``).

The configurations are interleaved step by step (step ``t`` of each configuration, then step
``t + 1``), so that drifting load on a shared machine affects all of them alike. Before every step
the ranks meet at a ``dist.barrier()`` (after ``torch.cuda.synchronize()`` on a GPU); each rank then
times its own ``step()`` with ``time.perf_counter`` (synchronising again on a GPU). ``--warmup`` steps
(the first one builds the plan) are not timed. With refresh period ``F > 1`` the steps that refresh
the roots (``t = 1`` or ``t % F == 0``) and the other steps are timed separately, until
``--repeats`` other steps and ``--refresh-repeats`` refresh steps are in; the per-step figure is the
amortised ``(refresh + (F − 1)·other) / F`` of the medians (for ``F = 1`` the median of all steps).
The *job* step time is the slowest rank at each step (the exchange makes every rank wait for the
slowest). After the timed steps every rank computes a checksum of its parameters' bits and the
checksums are all-gathered: the ranks must agree bitwise in every configuration.

CPU threads: by default each rank gets ``cores // world`` torch threads (at least one), so every
world size uses the same cores. With more processes than cores (3 ranks on 2 cores) the ranks
time-share cores, so CPU speed-ups are bounded by the core count; the benchmark is meant for GPUs
(NCCL), where each rank has its own device. Timings on a shared machine are noisy: read the medians
with their [min–max] spread.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..optimizer import DASH
from ..results import command_text, cpu_count, cpu_model, device_slug, ms, spread, write_report
from .shapes import MODELS, make_parameters

#: The configurations: name -> (how the work is distributed, communication dtype).
CONFIGS: dict[str, tuple[str, str]] = {
    "shared-fp32": ("shared", "fp32"),
    "shared-bf16": ("shared", "bf16"),
    "replicated": ("replicated", "fp32"),
}
#: Root solver per device for ``--root-method auto``: the paper's NDB on GPUs; on a CPU eigh, since
#: one NDB refresh of ``mini`` at block 256 took 3.5 s against 0.55 s for eigh (2 threads, measured
#: once while writing this module), too slow for a default run of a few minutes.
AUTO_METHOD: dict[str, str] = {"cuda": "ndb", "cpu": "eigh"}
#: Defaults per device: warm-up steps, other-step samples, refresh-step samples (F > 1).
DEVICE_DEFAULTS: dict[str, dict[str, int]] = {
    "cuda": {"warmup": 3, "repeats": 20, "refresh_repeats": 5},
    "cpu": {"warmup": 2, "repeats": 10, "refresh_repeats": 3},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench dist``."""
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    parser.add_argument("--worlds", type=int, nargs="+", default=None, help="process counts (1 2 3)")
    parser.add_argument("--model", default=None, help=f"one of {', '.join(MODELS)} (default mini)")
    parser.add_argument("--block-size", type=int, default=None, help="DASH block_size (default 256)")
    parser.add_argument("--frequencies", type=int, nargs="+", default=None, help="refresh periods (1 10)")
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=tuple(CONFIGS),
        default=list(CONFIGS),
        help="configurations to time (speed-ups need replicated)",
    )
    parser.add_argument(
        "--root-method",
        default="auto",
        help="DASH root_method; auto: ndb on CUDA, eigh on a CPU (see AUTO_METHOD)",
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (cpu 2, cuda 3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed (other) steps (cpu 10, cuda 20)")
    parser.add_argument(
        "--refresh-repeats", type=int, default=None, help="timed refresh steps when F > 1 (cpu 3, cuda 5)"
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "gloo", "nccl"),
        default="auto",
        help="auto: nccl when CUDA has a GPU per rank, else gloo on the CPU",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per rank on a CPU (default cores // world)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of parameters and gradients")
    parser.add_argument("--timeout", type=float, default=600.0, help="collective timeout in seconds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: model tiny, block 32, worlds 1 2, 3 repeats"
    )


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the device-dependent defaults and validate the options."""
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    nccl = args.backend == "nccl" or (args.backend == "auto" and gpus >= max(args.worlds or [1, 2, 3]))
    defaults = DEVICE_DEFAULTS["cuda" if nccl else "cpu"]
    if args.quick:
        args.worlds = args.worlds or [1, 2]
        args.model = args.model or "tiny"
        args.block_size = args.block_size or 32
        defaults = {"warmup": 1, "repeats": 3, "refresh_repeats": 1}
    args.worlds = args.worlds or [1, 2, 3]
    args.model = args.model or "mini"
    args.block_size = args.block_size or 256
    args.frequencies = args.frequencies or [1, 10]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; known: {', '.join(MODELS)}")
    if min(args.worlds) < 1 or min(args.frequencies) < 1 or args.block_size < 1:
        raise ValueError("--worlds, --frequencies and --block-size must be positive")
    if args.warmup < 0 or args.repeats < 1 or args.refresh_repeats < 1:
        raise ValueError("--warmup must be >= 0, --repeats and --refresh-repeats >= 1")
    if args.backend == "nccl" and not cuda:
        raise ValueError("--backend nccl needs CUDA")
    return args


def _backend(requested: str, world: int) -> str:
    """``nccl`` when asked for or (``auto``) when there is one GPU per rank; else ``gloo``."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "nccl":
        if gpus < world:
            raise ValueError(f"--backend nccl needs a GPU per rank: {world} ranks, {gpus} GPU(s)")
        return "nccl"
    if requested == "auto" and gpus >= world:
        return "nccl"
    return "gloo"


def cpu_name() -> str:
    """The CPU model with the number of usable cores."""
    return f"{cpu_model()} ({cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------
# Inside one rank
# ---------------------------------------------------------------------------------------------


def is_refresh(t: int, frequency: int) -> bool:
    """Whether DASH refreshes the roots at step ``t`` (``start_preconditioning_step = 1``)."""
    return t == 1 or t % frequency == 0


def stats(samples: Sequence[float]) -> dict[str, Any] | None:
    """Median, min, max and count of ``samples`` (``None`` when empty)."""
    if not samples:
        return None
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def per_step(frequency: int, refresh: dict | None, other: dict | None) -> float | None:
    """Amortised step time ``(refresh + (F − 1)·other) / F`` of the medians (``F = 1``: refresh)."""
    if refresh is None:
        return None
    if frequency == 1:
        return refresh["median"]
    if other is None:
        return None
    return (refresh["median"] + (frequency - 1) * other["median"]) / frequency


def checksum(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Two int64 sums of the parameters' float32 bit patterns: plain and position-weighted.

    Integer sums wrap identically whatever the reduction order, so equal parameters give equal
    checksums on any device; any single differing bit changes the plain sum.
    """
    bits = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params]).view(torch.int32)
    bits = bits.to(torch.int64)
    weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
    return torch.stack([bits.sum(), (bits * weights).sum()])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(
    spec: dict[str, Any], config: str, frequency: int, device: torch.device
) -> tuple[DASH, list[torch.Tensor]]:
    """Fresh parameters (identical on every rank) and the configuration's DASH."""
    params = make_parameters(MODELS[spec["model"]], device, seed=spec["seed"])
    distribution, communication = CONFIGS[config]
    optimizer = DASH(
        params,
        lr=spec["lr"],
        block_size=spec["block_size"],
        precondition_frequency=frequency,
        root_method=spec["root_method"],
        process_group=None if distribution == "shared" else False,
        communication=communication,
    )
    return optimizer, params


def _run_frequency(
    rank: int, world: int, frequency: int, spec: dict[str, Any], device: torch.device
) -> list[dict[str, Any]]:
    """Time every configuration at one refresh period; one record per configuration."""
    configs = [c for c in spec["configs"] if not (world == 1 and c == "shared-bf16")]
    built = {config: _build(spec, config, frequency, device) for config in configs}
    samples: dict[str, list[tuple[int, float]]] = {config: [] for config in configs}
    t = 0
    while True:
        t += 1
        for config, (optimizer, _) in built.items():
            _sync(device)
            dist.barrier()
            start = time.perf_counter()
            optimizer.step()
            _sync(device)
            elapsed = time.perf_counter() - start
            if t > spec["warmup"]:
                samples[config].append((t, elapsed))
        timed = range(spec["warmup"] + 1, t + 1)
        refreshes = sum(is_refresh(s, frequency) for s in timed)
        others = len(timed) - refreshes
        if frequency == 1:
            if refreshes >= spec["repeats"]:
                break
        elif others >= spec["repeats"] and refreshes >= spec["refresh_repeats"]:
            break
    reference = built["replicated"][1] if "replicated" in built else None
    initial = make_parameters(MODELS[spec["model"]], torch.device("cpu"), seed=spec["seed"])
    records = []
    for config, (optimizer, params) in built.items():
        local = checksum(params)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        sums = [g.cpu().tolist() for g in gathered]
        change = max(float((p.detach().cpu() - q.detach()).abs().max()) for p, q in zip(params, initial))
        deviation = None
        if reference is not None:
            deviation = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(params, reference))
        refresh = [s for step, s in samples[config] if is_refresh(step, frequency)]
        other = [s for step, s in samples[config] if not is_refresh(step, frequency)]
        records.append(
            {
                "config": config,
                "distribution": CONFIGS[config][0],
                "communication": CONFIGS[config][1],
                "frequency": frequency,
                "samples": samples[config],
                "refresh": stats(refresh),
                "other": stats(other),
                "per_step": per_step(frequency, stats(refresh), stats(other)),
                "stats": optimizer.distribution_stats(),
                "root_failures": optimizer.root_failures,
                "skipped_steps": optimizer.skipped_steps,
                "checksums": sums,
                "ranks_equal": all(s == sums[0] for s in sums),
                "max_abs_diff_vs_replicated": deviation,
                "max_abs_change": change,
            }
        )
    return records


def _run_rank(rank: int, world: int, init_file: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Join the group, time every refresh period."""
    if spec["backend"] == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(spec["threads"])
    dist.init_process_group(
        spec["backend"],
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=spec["timeout"]),
        device_id=device if device.type == "cuda" else None,
    )
    try:
        records = []
        for frequency in spec["frequencies"]:
            records.extend(_run_frequency(rank, world, frequency, spec, device))
            dist.barrier()
        return {"rank": rank, "world": world, "threads": torch.get_num_threads(), "records": records}
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, init_file: str, out_dir: str, spec: dict[str, Any]) -> None:
    """Entry point of a spawned rank: run, then write ``rank-<r>.json`` (or the traceback)."""
    path = Path(out_dir) / f"rank-{rank}.json"
    try:
        result = _run_rank(rank, world, init_file, spec)
    except BaseException:
        path.write_text(json.dumps({"rank": rank, "traceback": traceback.format_exc()}))
        raise
    path.write_text(json.dumps(result))
    exit_without_finalizing()


def exit_without_finalizing() -> None:
    """End this spawned rank with exit code 0 now, skipping the interpreter's teardown.

    Call it once the rank's results are on disk and its process group is destroyed. A gloo worker
    thread can still hold the last collective's work (with tensors a Python object owned) for a
    moment after the collective returns; if the interpreter is finalizing when the thread drops
    it, the thread needs the GIL, is made to exit, and the process aborts ("terminate called
    without an active exception"; core dump in ``~AsyncAllgatherWork``; seen in about 1 launch in
    8 of the 2-rank tests; pytorch/pytorch PR 179291 describes it). The parent then kills the other
    ranks, which may not have written their results yet.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# The parent: spawn, collect, report
# ---------------------------------------------------------------------------------------------


def run_world(world: int, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Spawn ``world`` ranks, wait, and return one row per (frequency, configuration, rank)."""
    with tempfile.TemporaryDirectory(prefix=f"dash-dist-{world}-") as tmp:
        error = None
        try:
            mp.start_processes(
                _worker,
                args=(world, os.path.join(tmp, "init"), tmp, spec),
                nprocs=world,
                join=True,
                start_method="spawn",
            )
        except Exception as exc:  # a rank failed: report its traceback below
            error = exc
        results = []
        for rank in range(world):
            path = Path(tmp) / f"rank-{rank}.json"
            result = json.loads(path.read_text()) if path.exists() else {"traceback": "no result"}
            if "traceback" in result:
                raise RuntimeError(f"rank {rank} of {world} failed:\n{result['traceback']}") from error
            results.append(result)
    rows = []
    for result in results:
        for record in result["records"]:
            rows.append(
                {
                    "world": world,
                    "rank": result["rank"],
                    "threads": result["threads"],
                    "backend": spec["backend"],
                    **record,
                }
            )
    return rows


def add_job_figures(rows: list[dict[str, Any]], numel: int) -> list[dict[str, Any]]:
    """Per-rank speed-ups over ``replicated`` and one summary per (world, frequency, configuration).

    The summary's step time at each step is the slowest rank's; its speed-ups divide the
    replicated job time (same world) and the world-1 ``shared-fp32`` job time by its own.
    ``exchange_over_model`` is the bytes a rank receives per step over the ``numel`` parameters'
    size in the communication dtype (1.0: no padding).
    """
    by_key = {(r["world"], r["frequency"], r["config"], r["rank"]): r for r in rows}
    for row in rows:
        base = by_key.get((row["world"], row["frequency"], "replicated", row["rank"]))
        ok = base is not None and base["per_step"] and row["per_step"]
        row["speedup_vs_replicated"] = base["per_step"] / row["per_step"] if ok else None
    summaries = []
    groups: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["world"], row["frequency"], row["config"]), []).append(row)
    for (world, frequency, config), members in groups.items():
        steps: dict[int, float] = {}
        for member in members:
            for t, seconds in member["samples"]:
                steps[t] = max(steps.get(t, 0.0), seconds)
        refresh = stats([s for t, s in steps.items() if is_refresh(t, frequency)])
        other = stats([s for t, s in steps.items() if not is_refresh(t, frequency)])
        first = members[0]
        summaries.append(
            {
                "world": world,
                "frequency": frequency,
                "config": config,
                "refresh": refresh,
                "other": other,
                "per_step": per_step(frequency, refresh, other),
                "imbalance": first["stats"]["imbalance"],
                "owned_blocks": [m["stats"]["owned_blocks"] for m in members],
                "bytes_per_step": first["stats"]["bytes_per_step"],
                "exchange_over_model": first["stats"]["bytes_per_step"]
                / (numel * (2 if first["communication"] == "bf16" else 4)),
                "ranks_equal": all(m["ranks_equal"] for m in members),
                "max_abs_diff_vs_replicated": max(
                    (m["max_abs_diff_vs_replicated"] or 0.0 for m in members), default=None
                ),
                "max_abs_change": max(m["max_abs_change"] for m in members),
                "root_failures": sum(m["root_failures"] for m in members),
            }
        )
    index = {(s["world"], s["frequency"], s["config"]): s for s in summaries}
    for summary in summaries:
        key = (summary["world"], summary["frequency"])
        base = index.get((*key, "replicated"))
        one = index.get((1, summary["frequency"], "shared-fp32"))
        own = summary["per_step"]
        summary["speedup_vs_replicated"] = _ratio(base, own)
        summary["speedup_vs_world1"] = _ratio(one, own)
    return summaries


def _ratio(base: dict[str, Any] | None, own: float | None) -> float | None:
    return base["per_step"] / own if base and base["per_step"] and own else None


def _bytes(count: int | None) -> str:
    if not count:
        return "0"
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def _model_ratio(summary: dict[str, Any]) -> str:
    ratio = summary["exchange_over_model"]
    return f" ({ratio:.3f}×)" if ratio else ""


def _times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _steps_text(row: dict[str, Any]) -> tuple[str, str]:
    """(step time text, refresh step text): for F = 1 every step refreshes."""
    if row["frequency"] == 1:
        return spread(row["refresh"]), "(every step)"
    return spread(row["other"]), spread(row["refresh"])


def summary_table(summaries: list[dict[str, Any]]) -> str:
    """One line per world size, refresh period and configuration (job = slowest rank per step)."""
    lines = [
        "| W | F | config | per step ms | step ms [min–max] | refresh step ms [min–max] | owned blocks "
        "per rank | imbalance | exchange / step / rank (× model) | × replicated | × W=1 | "
        "ranks bitwise equal | max abs Δ vs replicated (of max change) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        step, refresh = _steps_text(s)
        deviation = s["max_abs_diff_vs_replicated"]
        lines.append(
            f"| {s['world']} | {s['frequency']} | {s['config']} | {ms(s['per_step'])} | {step} | "
            f"{refresh} | "
            f"{', '.join(str(b) for b in s['owned_blocks'])} | {s['imbalance']:.3f} | "
            f"{_bytes(s['bytes_per_step'])}{_model_ratio(s)} | {_times(s['speedup_vs_replicated'])} | "
            f"{_times(s['speedup_vs_world1'])} | {'yes' if s['ranks_equal'] else '**NO**'} | "
            f"{'–' if deviation is None else f'{deviation:.1e}'} ({s['max_abs_change']:.1e}) |"
        )
    return "\n".join(lines) + "\n"


def rank_table(rows: list[dict[str, Any]]) -> str:
    """One line per world size, refresh period, configuration and rank."""
    lines = [
        "| W | F | config | rank | threads | owned blocks | imbalance | bytes / step | per step ms | "
        "step ms [min–max] | refresh step ms [min–max] | × replicated |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step, refresh = _steps_text(r)
        st = r["stats"]
        lines.append(
            f"| {r['world']} | {r['frequency']} | {r['config']} | {r['rank']} | {r['threads']} | "
            f"{st['owned_blocks']} | {st['imbalance']:.3f} | {st['bytes_per_step']} | {ms(r['per_step'])} | "
            f"{step} | {refresh} | {_times(r['speedup_vs_replicated'])} |"
        )
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    """The report: setup, the summary and per-rank tables, and how to read them."""
    model = report["model"]
    load = report.get("load_average")
    load_text = f"; load average (1 min) at start/end {load[0]:.2f}/{load[1]:.2f}" if load else ""
    cpu_note = ""
    method_note = ""
    if report.get("root_method_auto"):
        method_note = (
            f"- root_method `{report['root_method']}` is the `--root-method auto` choice for this device "
            "(NDB on CUDA; eigh on a CPU, where an NDB refresh is several times slower)\n"
        )
    if report["device_type"] == "cpu":
        cpu_note = (
            f"\n**CPU caveat.** This machine has {report['cores']} cores; each rank got "
            "`cores // world` torch threads (at least 1), so 3 processes oversubscribe 2 cores and "
            "the ranks time-share them. The speed-up over one process (*× W=1*) is therefore bounded by "
            f"the core count ({report['cores']}×) however the work is split, while *× replicated* can "
            "exceed it: the replicated baseline itself runs W full copies of the work on the same "
            "cores. The benchmark is meant for GPUs (NCCL), where each rank has its own device. The "
            "machine is shared with other jobs, so timings are noisy (see the load average above): "
            "compare medians and look at the [min–max] spread.\n"
        )
    return (
        f"# DASH multi-process step benchmark — {report['device']}\n\n"
        f"- command: `{report['command']}`\n"
        f"- device: {report['device']}; backend(s) {', '.join(report['backends'])}; torch "
        f"{report['torch']}, Python {report['python']}\n"
        f"- date: {report['date']}; total run time {report['wall_seconds']:.0f} s{load_text}\n"
        f"- model `{model['name']}` ({model['numel'] / 1e6:.2f}M parameters: {model['description']}); "
        f"block_size {report['block_size']}, root_method `{report['root_method']}`, lr {report['lr']}, "
        f"other DASH options at their defaults; seed {report['seed']}\n"
        f"{method_note}"
        "- `replicated`: `DASH(process_group=False)` on every rank (each computes every block)\n"
        f"- {report['warmup']} untimed warm-up step(s), then {report['repeats']} timed steps (F = 1), "
        f"or for F > 1 timed steps until at least {report['repeats']} other and "
        f"{report['refresh_repeats']} refresh steps are in (the n of each column), each step after a "
        "`dist.barrier()`; configurations interleaved step by step\n"
        f"- root refreshes that failed (old root kept), all rows and ranks: "
        f"{sum(r['root_failures'] for r in report['rows'])}; skipped steps: "
        f"{sum(r['skipped_steps'] for r in report['rows'])}\n"
        f"{cpu_note}\n"
        "## Per world size (job step time = slowest rank at each step)\n\n"
        f"{summary_table(report['summaries'])}\n"
        "## Per rank\n\n"
        f"{rank_table(report['rows'])}\n"
        "How to read it. *per step* is the median step time, or for F > 1 the amortised "
        "`(refresh + (F−1)·other)/F` of the refresh-step and other-step medians. *× replicated* "
        "divides the `replicated` per-step time (every rank does all the work, "
        "`process_group=False`) of the same world size (and rank) by this row's; *× W=1* divides the "
        "one-process time. *owned blocks*, *imbalance* (max/mean of DASH's cost estimate over ranks) "
        "and *bytes / step* (the all-gather's output on each rank: its own share and padding to the "
        "largest rank's share included) come from `DASH.distribution_stats()`; *(× model)* divides the "
        "bytes by the size of all parameters in the communication dtype (1× = no padding). *ranks "
        "bitwise equal*: the int64 checksums of every rank's parameter bits, all-gathered after the "
        "timed steps, are identical. *max abs Δ vs replicated*: the largest parameter difference "
        "from the replicated configuration after the same steps (fp32: batching differences; bf16: "
        "the rounded exchange), with in brackets the largest change of a parameter from its initial "
        "value in this configuration. The gradient is the same seeded random tensor at every step and on "
        "every rank.\n"
    )


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the tables, write ``dist-<device>.{json,md}`` under ``--out``."""
    began, load_start = time.perf_counter(), _load()
    args = _resolve(args)
    # One backend for every world size, so that the rows compare: nccl only with a GPU per rank
    # at the largest world size.
    backend = _backend(args.backend, max(args.worlds))
    device_type = "cuda" if backend == "nccl" else "cpu"
    method = AUTO_METHOD[device_type] if args.root_method == "auto" else args.root_method
    rows: list[dict[str, Any]] = []
    backends = []
    for world in args.worlds:
        backends.append(backend)
        threads = args.threads or max(1, cpu_count() // world)
        spec = {
            "backend": backend,
            "model": args.model,
            "block_size": args.block_size,
            "frequencies": args.frequencies,
            "configs": args.configs,
            "root_method": method,
            "lr": args.lr,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "refresh_repeats": args.refresh_repeats,
            "threads": threads,
            "seed": args.seed,
            "timeout": args.timeout,
        }
        started = time.perf_counter()
        rows.extend(run_world(world, spec))
        print(
            f"world {world}: {backend}, {threads} thread(s) per rank, {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    order = list(CONFIGS)
    rows.sort(key=lambda r: (r["world"], r["frequency"], order.index(r["config"]), r["rank"]))
    summaries = add_job_figures(rows, MODELS[args.model].numel)
    device = torch.cuda.get_device_name(0) if device_type == "cuda" else cpu_name()
    model = MODELS[args.model]
    report = {
        "command": command_text(args, "dash-shampoo bench dist (called from Python)"),
        "device": device,
        "device_type": device_type,
        "cores": cpu_count(),
        "backends": sorted(set(backends)),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model.name, "numel": model.numel, "description": model.description},
        "worlds": args.worlds,
        "frequencies": args.frequencies,
        "block_size": args.block_size,
        "root_method": method,
        "root_method_auto": args.root_method == "auto",
        "lr": args.lr,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "refresh_repeats": args.refresh_repeats,
        "seed": args.seed,
        "summaries": summaries,
        "rows": rows,
    }
    report["wall_seconds"] = time.perf_counter() - began
    load_end = _load()
    report["load_average"] = None if load_start is None or load_end is None else [load_start, load_end]
    print(summary_table(summaries))
    print(rank_table(rows))
    if not args.no_save:
        first = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        written = write_report(args.out / f"dist-{device_slug(first)}", report, markdown(report))
        print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 0 if all(s["ranks_equal"] for s in summaries) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dash_shampoo.bench.dist``: the same as ``dash-shampoo bench dist``."""
    parser = argparse.ArgumentParser(prog="dash-shampoo bench dist")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


__all__: list[str] = ["add_arguments", "checksum", "main", "run", "run_world"]
