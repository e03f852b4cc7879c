"""Multi-process step benchmark (``dash-shampoo bench dist``): DASH sharing its work across ranks.

For each world size of ``--worlds`` the command spawns that many processes (``torch.multiprocessing``,
``spawn``, ``file://`` rendezvous). The backend is NCCL with one GPU per rank when CUDA is available
with at least as many GPUs as the largest world size, else gloo on the CPU (one backend for all
rows). Every rank builds the same parameters (a shape set of :mod:`dash_shampoo.bench.shapes`)
with the same seeded random gradients, as DDP would leave them after its all-reduce, and times
``optimizer.step()`` of two configurations of the same DASH:

- ``shared-fp32``: the default process group, so each rank refreshes the roots of its share of the
  blocks and the refreshed roots are all-gathered in float32 (every rank keeps the whole state and
  computes every update);
- ``replicated``: every rank does all the work, as without distribution
  (``process_group=False``).

The configurations are interleaved step by step (step ``t`` of each configuration, then step
``t + 1``), so that drifting load on a shared machine affects all of them alike. Before every step
the ranks meet at a ``dist.barrier()`` (after ``torch.cuda.synchronize()`` on a GPU); each rank then
times its own ``step()`` with ``time.perf_counter`` (synchronising again on a GPU). ``warmup`` steps
(the first one builds the layout) are not timed. With refresh period ``F > 1`` the steps that
refresh the roots (DASH's schedule) and the other steps are timed separately, until ``repeats``
other steps and ``refresh_repeats`` refresh steps are in; the per-step figure is the amortised
``(refresh + (F − 1)·other) / F`` of the medians (for ``F = 1`` the median of all steps). These
settings, the model, block size, world sizes and root solver come from a preset (:data:`PRESETS`);
options given on the command line replace the preset's values.
The *job* step time is the slowest rank at each step (a refresh step's exchange makes every rank
wait for the slowest). After the timed steps every rank computes a checksum of its parameters' bits and the
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

from ..distributed import exit_without_finalizing
from ..optimizer import DASH
from ..peers import state_bytes
from ..results import RunRecord, cpu_count, markdown_table, metadata_lines, ms, ratio, spread, write_report
from .shapes import SET_NAMES, ShapeSet, make_parameters, shape_set
from .timing import per_step, split_refresh, stats, sync

#: The configurations: name -> DASH's ``process_group`` (roots exchanged in fp32, DASH's only choice).
CONFIGS: dict[str, bool | None] = {"shared-fp32": None, "replicated": False}
#: Named option sets (``--preset``; default ``gpu`` with a GPU per rank, else ``cpu``). The CPU
#: preset uses eigh: one NDB refresh of ``mini`` at block 256 took 3.5 s against 0.55 s for eigh
#: (2 threads, measured once while writing this module), too slow for a run of a few minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {"model": "mini", "block_size": 256, "worlds": [1, 2, 3], "frequencies": [1, 10],
            "root_method": "ndb", "warmup": 3, "repeats": 20, "refresh_repeats": 5},
    "cpu": {"model": "mini", "block_size": 256, "worlds": [1, 2, 3], "frequencies": [1, 10],
            "root_method": "eigh", "warmup": 2, "repeats": 10, "refresh_repeats": 3},
    "quick": {"model": "micro", "block_size": 32, "worlds": [1, 2], "frequencies": [1, 10],
              "root_method": "eigh", "warmup": 1, "repeats": 3, "refresh_repeats": 1},
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench dist``; unset options take the preset's values."""
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    add = parser.add_argument
    add("--preset", choices=tuple(PRESETS), help="gpu with a GPU per rank, else cpu; quick: a smoke test")
    add("--worlds", type=int, nargs="+", help="process counts")
    add("--model", choices=SET_NAMES, help="parameter shapes")
    add("--block-size", type=int, help="DASH block_size")
    add("--frequencies", type=int, nargs="+", help="refresh periods")
    add(
        "--configs",
        nargs="+",
        choices=tuple(CONFIGS),
        default=list(CONFIGS),
        help="what to time (× replicated needs replicated)",
    )
    add("--root-method", help="DASH root_method")
    add("--lr", type=float, default=1e-3)
    add("--warmup", type=int, help="untimed steps")
    add("--repeats", type=int, help="timed (other) steps")
    add("--refresh-repeats", type=int, help="timed refresh steps when F > 1")
    add("--backend", choices=("auto", "gloo", "nccl"), default="auto", help="auto: nccl with a GPU per rank")
    add("--threads", type=int, help="torch threads per rank on a CPU (default cores // world)")
    add("--seed", type=int, default=0, help="seed of parameters and gradients")
    add("--timeout", type=float, default=600.0, help="collective timeout in seconds")
    add("--out", type=Path, default=Path("benchmarks/results"))
    add("--no-save", action="store_true", help="print the tables only")


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the preset and validate them."""
    args.preset = args.preset or ("gpu" if _gpus() >= max(args.worlds or PRESETS["gpu"]["worlds"]) else "cpu")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.worlds) < 1 or min(args.frequencies) < 1 or args.block_size < 1:
        raise ValueError("--worlds, --frequencies and --block-size must be positive")
    if args.warmup < 0 or args.repeats < 1 or args.refresh_repeats < 1:
        raise ValueError("--warmup must be >= 0, --repeats and --refresh-repeats >= 1")
    return args


def _backend(requested: str, world: int) -> str:
    """``nccl`` when asked for or (``auto``) when there is one GPU per rank; else ``gloo``."""
    if requested == "nccl" and _gpus() < world:
        raise ValueError(f"--backend nccl needs a GPU per rank: {world} ranks, {_gpus()} GPU(s)")
    return "nccl" if requested == "nccl" or (requested == "auto" and _gpus() >= world) else "gloo"


# ---------------------------------------------------------------------------------------------
# Inside one rank
# ---------------------------------------------------------------------------------------------


def checksum(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Two int64 sums of the parameters' float32 bit patterns: plain and position-weighted.

    Integer sums wrap identically whatever the reduction order, so equal parameters give equal
    checksums on any device; any single differing bit changes the plain sum.
    """
    bits = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params]).view(torch.int32)
    bits = bits.to(torch.int64)
    weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
    return torch.stack([bits.sum(), (bits * weights).sum()])


def _build(
    spec: dict[str, Any], config: str, frequency: int, device: torch.device
) -> tuple[DASH, list[torch.Tensor]]:
    """Fresh parameters (identical on every rank) and the configuration's DASH."""
    params = make_parameters(spec["shapes"], device, seed=spec["seed"])
    optimizer = DASH(
        params,
        lr=spec["lr"],
        block_size=spec["block_size"],
        precondition_frequency=frequency,
        root_method=spec["root_method"],
        process_group=CONFIGS[config],
    )
    return optimizer, params


def _interleaved_samples(
    optimizers: dict[str, DASH], frequency: int, spec: dict[str, Any], device: torch.device
) -> dict[str, list[tuple[int, float]]]:
    """Step every optimizer once per step ``t``, each after a barrier; ``(t, seconds)`` per
    configuration after the warm-up, until the preset's samples are in."""
    samples: dict[str, list[tuple[int, float]]] = {config: [] for config in optimizers}
    wanted = (spec["repeats"], 0) if frequency == 1 else (spec["refresh_repeats"], spec["repeats"])
    t = 0
    while True:
        t += 1
        for config, optimizer in optimizers.items():
            sync(device)
            dist.barrier()
            start = time.perf_counter()
            optimizer.step()
            sync(device)
            if t > spec["warmup"]:
                samples[config].append((t, time.perf_counter() - start))
        refresh, other = split_refresh(next(iter(samples.values())), frequency)
        if len(refresh) >= wanted[0] and len(other) >= wanted[1]:
            return samples


def _largest_difference(params: list[torch.Tensor], others: list[torch.Tensor]) -> float:
    return max(float((p.detach().cpu() - q.detach().cpu()).abs().max()) for p, q in zip(params, others))


def _run_frequency(
    world: int, frequency: int, spec: dict[str, Any], device: torch.device
) -> list[dict[str, Any]]:
    """Time every configuration at one refresh period; one record per configuration."""
    configs = list(spec["configs"])
    built = {config: _build(spec, config, frequency, device) for config in configs}
    samples = _interleaved_samples(
        {config: pair[0] for config, pair in built.items()}, frequency, spec, device
    )
    reference = built["replicated"][1] if "replicated" in built else None
    initial = make_parameters(spec["shapes"], torch.device("cpu"), seed=spec["seed"])
    records = []
    for config, (optimizer, params) in built.items():
        local = checksum(params)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        sums = [g.cpu().tolist() for g in gathered]
        refresh, other = (stats(part) for part in split_refresh(samples[config], frequency))
        deviation = None if reference is None else _largest_difference(params, reference)
        records.append(
            {
                "config": config,
                "frequency": frequency,
                "samples": samples[config],
                "refresh": refresh,
                "other": other,
                "per_step": per_step(frequency, refresh, other),
                "stats": optimizer.distribution_stats(),
                "state_mib": state_bytes(optimizer.state) / 2**20,
                "root_failures": optimizer.root_failures,
                "skipped_steps": optimizer.skipped_steps,
                "checksums": sums,
                "ranks_equal": all(s == sums[0] for s in sums),
                "max_abs_diff_vs_replicated": deviation,
                "max_abs_change": _largest_difference(params, initial),
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
            records.extend(_run_frequency(world, frequency, spec, device))
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


def _job_summary(
    world: int, frequency: int, config: str, members: list[dict[str, Any]], numel: int
) -> dict[str, Any]:
    """One (world, frequency, configuration): the job step time is the slowest rank's at each step."""
    steps: dict[int, float] = {}
    for member in members:
        for t, seconds in member["samples"]:
            steps[t] = max(steps.get(t, 0.0), seconds)
    refresh, other = (stats(part) for part in split_refresh(steps.items(), frequency))
    first = members[0]["stats"]
    size = 4  # fp32
    return {
        "world": world,
        "frequency": frequency,
        "config": config,
        "refresh": refresh,
        "other": other,
        "per_step": per_step(frequency, refresh, other),
        "imbalance": first["imbalance"],
        "owned_blocks": [m["stats"]["owned_blocks"] for m in members],
        "state_mib": [m["state_mib"] for m in members],
        "bytes_per_refresh": first["bytes_per_refresh"],
        "bytes_per_step": first["bytes_per_refresh"] / frequency,
        "exchange_over_model": first["bytes_per_refresh"] / (numel * size),
        "ranks_equal": all(m["ranks_equal"] for m in members),
        "max_abs_diff_vs_replicated": max(
            (m["max_abs_diff_vs_replicated"] or 0.0 for m in members), default=None
        ),
        "max_abs_change": max(m["max_abs_change"] for m in members),
        "root_failures": sum(m["root_failures"] for m in members),
    }


def _speedup(base: dict[str, Any] | None, own: dict[str, Any]) -> float | None:
    return base["per_step"] / own["per_step"] if base and base["per_step"] and own["per_step"] else None


def add_job_figures(rows: list[dict[str, Any]], numel: int) -> list[dict[str, Any]]:
    """Per-rank speed-ups over ``replicated`` and one summary per (world, frequency, configuration).

    The summary's speed-ups divide the replicated job time (same world) and the world-1
    ``shared-fp32`` job time by its own. ``exchange_over_model`` is the bytes a rank receives per
    step over the ``numel`` parameters' size in the communication dtype (1.0: no padding).
    """
    by_key = {(r["world"], r["frequency"], r["config"], r["rank"]): r for r in rows}
    groups: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        row["speedup_vs_replicated"] = _speedup(
            by_key.get((row["world"], row["frequency"], "replicated", row["rank"])), row
        )
        groups.setdefault((row["world"], row["frequency"], row["config"]), []).append(row)
    summaries = [_job_summary(*key, members, numel) for key, members in groups.items()]
    index = {(s["world"], s["frequency"], s["config"]): s for s in summaries}
    for summary in summaries:
        summary["speedup_vs_replicated"] = _speedup(
            index.get((summary["world"], summary["frequency"], "replicated")), summary
        )
        summary["speedup_vs_world1"] = _speedup(index.get((1, summary["frequency"], "shared-fp32")), summary)
    return summaries


def _bytes(count: int | None) -> str:
    if not count:
        return "0"
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def _steps_text(row: dict[str, Any]) -> list[str]:
    """Per step, step time and refresh step time texts: for F = 1 every step refreshes."""
    if row["frequency"] == 1:
        return [ms(row["per_step"]), spread(row["refresh"]), "(every step)"]
    return [ms(row["per_step"]), spread(row["other"]), spread(row["refresh"])]


def summary_table(summaries: list[dict[str, Any]]) -> str:
    """One line per world size, refresh period and configuration (job = slowest rank per step)."""
    header = ["W", "F", "config", "per step ms", "step ms [min–max]", "refresh step ms [min–max]"]
    header += ["owned blocks per rank", "imbalance", "exchange / refresh step / rank (× model); / step"]
    header += ["optimizer state MiB per rank", "× replicated"]
    header += ["× W=1", "ranks bitwise equal", "max abs Δ vs replicated (of max change)"]

    def cells(s: dict[str, Any]) -> list[object]:
        deviation = s["max_abs_diff_vs_replicated"]
        exchange = _bytes(s["bytes_per_refresh"]) + (
            f" ({s['exchange_over_model']:.3f}×); {_bytes(round(s['bytes_per_step']))}"
            if s["exchange_over_model"]
            else ""
        )
        return [
            *(s["world"], s["frequency"], s["config"], *_steps_text(s)),
            *(", ".join(str(b) for b in s["owned_blocks"]), f"{s['imbalance']:.3f}", exchange),
            ", ".join(f"{m:.2f}" for m in s["state_mib"]),
            *(
                ratio(s["speedup_vs_replicated"]),
                ratio(s["speedup_vs_world1"]),
                "yes" if s["ranks_equal"] else "**NO**",
            ),
            f"{'–' if deviation is None else f'{deviation:.1e}'} ({s['max_abs_change']:.1e})",
        ]

    return markdown_table(header, map(cells, summaries))


def rank_table(rows: list[dict[str, Any]]) -> str:
    """One line per world size, refresh period, configuration and rank."""
    header = ["W", "F", "config", "rank", "threads", "owned blocks", "imbalance", "bytes / refresh step"]
    header += ["per step ms", "step ms [min–max]", "refresh step ms [min–max]", "× replicated"]

    def cells(r: dict[str, Any]) -> list[object]:
        st = r["stats"]
        return [
            *(r["world"], r["frequency"], r["config"], r["rank"], r["threads"]),
            *(st["owned_blocks"], f"{st['imbalance']:.3f}", st["bytes_per_refresh"], *_steps_text(r)),
            ratio(r["speedup_vs_replicated"]),
        ]

    return markdown_table(header, map(cells, rows))


def markdown(report: dict[str, Any]) -> str:
    """The report: setup, the summary and per-rank tables, and how to read them."""
    model = report["model"]
    cpu_note = ""
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
        + "\n".join(metadata_lines(report))
        + f"\n- preset `{report['preset']}`; backend {report['backend']}\n"
        f"- model `{model['name']}` ({model['numel'] / 1e6:.2f}M parameters: {model['description']}); "
        f"block_size {report['block_size']}, root_method `{report['root_method']}`, lr {report['lr']}, "
        f"other DASH options at their defaults; seed {report['seed']}\n"
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
        "one-process time. *owned blocks* (whose roots the rank refreshes), *imbalance* (max/mean of "
        "DASH's root-refresh cost estimate over ranks) and *bytes / refresh step* (the output of the "
        "all-gather of refreshed roots on each rank, in a step that refreshes every root: its own "
        "share and padding to the largest rank's share included) come from "
        "`DASH.distribution_stats()`; *(× model)* divides them by the size of all parameters in the "
        "communication dtype (a square block has two factors of its own size: about 2×), and */ step* "
        "divides them by F (steps between refreshes exchange nothing). *optimizer state*: every rank "
        "holds the whole state (factors, roots, moments), so `state_dict()` on rank 0 alone is "
        "complete. *ranks "
        "bitwise equal*: the int64 checksums of every rank's parameter bits, all-gathered after the "
        "timed steps, are identical. *max abs Δ vs replicated*: the largest parameter difference "
        "from the replicated configuration after the same steps (batching differences of the solver), "
        "with in brackets the largest change of a parameter from its initial "
        "value in this configuration. The gradient is the same seeded random tensor at every step and on "
        "every rank.\n"
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the tables, write ``dist-<device>.{json,md}`` under ``--out``."""
    args = _resolve(args)
    # One backend for every world size, so that the rows compare: nccl only with a GPU per rank
    # at the largest world size.
    backend = _backend(args.backend, max(args.worlds))
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    record = RunRecord.start(args, device, "dash-shampoo bench dist", threads=False)
    shapes: ShapeSet = shape_set(args.model)
    settings = (
        "block_size",
        "frequencies",
        "configs",
        "root_method",
        "lr",
        "warmup",
        "repeats",
        "refresh_repeats",
    )
    rows: list[dict[str, Any]] = []
    for world in args.worlds:
        threads = args.threads or max(1, cpu_count() // world)
        spec = {key: getattr(args, key) for key in (*settings, "seed", "timeout")}
        spec.update(backend=backend, shapes=shapes, threads=threads)
        started = time.perf_counter()
        rows.extend(run_world(world, spec))
        seconds = time.perf_counter() - started
        print(
            f"world {world}: {backend}, {threads} thread(s) per rank, {seconds:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    order = list(CONFIGS)
    rows.sort(key=lambda r: (r["world"], r["frequency"], order.index(r["config"]), r["rank"]))
    summaries = add_job_figures(rows, shapes.numel)
    report = {
        **record.metadata(),
        "cores": cpu_count(),
        "backend": backend,
        "preset": args.preset,
        "model": {"name": shapes.name, "numel": shapes.numel, "description": shapes.description},
        "worlds": args.worlds,
        **{key: getattr(args, key) for key in settings if key != "configs"},
        "seed": args.seed,
        "summaries": summaries,
        "rows": rows,
    }
    print(summary_table(summaries))
    print(rank_table(rows))
    if not args.no_save:
        written = write_report(record.stem(args.out, "dist"), report, markdown(report))
        print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 0 if all(s["ranks_equal"] for s in summaries) else 1
