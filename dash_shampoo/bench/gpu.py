"""``dash-shampoo bench gpu``: everything a lent GPU should measure, in one command of a few minutes.

Stages, each with its own time budget, run in order; after each one the command rewrites
``OUT/summary.md``, ``OUT/summary.json`` and ``OUT/results.tar.gz`` (every file the stages wrote),
so a run cut short still brings back what finished, in three files:

1. ``check``: DASH on the device against the same DASH on the CPU (every solver and stacking mode,
   3 steps; max difference over max update), every matmul precision finite, and a state-dict
   round trip on the device that resumes bitwise;
2. ``sync``: steps under ``torch.cuda.set_sync_debug_mode("error")``, which raises on every host
   synchronisation; the stage reports the first one, or none;
3. ``step``: ``dash-shampoo bench step`` with the device's preset (the peers that are installed,
   the authors' ``DashGpu`` among them);
4. ``roots``: ``dash-shampoo bench roots`` in fp32, tf32 and bf16;
5. ``train``: ``dash-shampoo train`` of the ``124m`` model, AdamW against DASH, for as many steps as
   the budget allows.

The lent machine has no network: to time the peers, download their wheels elsewhere (``pip download
--no-deps -d wheels pytorch_optimizer heavyball``), put the folder in the working tree and pass
``--wheels wheels``; they are installed with ``pip install --no-index --find-links`` first.
``--dry-run`` runs every stage on the CPU with tiny settings (CI runs it, so the command cannot rot).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..optimizer import DASH, STACKINGS
from ..results import RunRecord, metadata_lines

STAGES = ("check", "sync", "step", "roots", "train")
#: Seconds per command stage on a GPU (with check and sync, about five minutes in all) and in a dry run.
BUDGETS = {"step": 130, "roots": 60, "train": 60}
DRY_BUDGETS = {"step": 120, "roots": 120, "train": 120}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench gpu``."""
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = "Peers without network: see --wheels."
    parser.add_argument("--out", type=Path, default=Path("gpu-results"), help="where the three files go")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run")
    parser.add_argument("--wheels", type=Path, help="install the peers' wheels from this folder first")
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU, tiny settings")


def _device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("dash-shampoo bench gpu: error: no CUDA device (use --dry-run on a CPU)")
    return torch.device("cuda")


def check(device: torch.device, out: Path, dry_run: bool, budget: float) -> dict[str, Any]:
    """DASH on ``device`` against the CPU, per solver and stacking mode; precisions; a round trip."""
    shapes = [(40, 24), (24,), (8, 3, 5), ()]

    def run(where: torch.device, steps: int = 3, **options: Any) -> tuple[list[torch.Tensor], DASH, float]:
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=generator).to(where).requires_grad_() for s in shapes]
        optimizer = DASH(params, lr=1e-2, block_size=16, precondition_frequency=1, **options)
        update = 0.0
        for _ in range(steps):
            before = [p.detach().clone() for p in params]
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(where)
            optimizer.step()
            update = max(update, *(float((p - b).abs().max()) for p, b in zip(params, before)))
        return [p.detach().cpu() for p in params], optimizer, update

    rows = []
    for method in ("ndb", "newton", "chebyshev", "eigh"):
        reference, _, update = run(torch.device("cpu"), root_method=method)
        for stacking in STACKINGS:
            params, optimizer, _ = run(device, root_method=method, stacking=stacking)
            worst = max(float((p - r).abs().max()) for p, r in zip(params, reference))
            rows.append({"method": method, "stacking": stacking, "diff_over_update": worst / update,
                         "root_failures": optimizer.root_failures})  # fmt: skip
    precisions = {}
    for precision in ("fp32", "tf32", "bf16", "fp16"):
        params, optimizer, _ = run(device, precision=precision)
        precisions[precision] = {
            "finite": all(bool(torch.isfinite(p).all()) for p in params),
            "root_failures": optimizer.root_failures,
        }
    return {"solvers": rows, "precisions": precisions, "round_trip": _round_trip(device, shapes)}


def _round_trip(device: torch.device, shapes: list[tuple[int, ...]]) -> bool:
    """4 steps equal 2 steps, a state-dict round trip into a fresh DASH, and 2 more (bitwise)."""

    def steps(params: list[torch.Tensor], optimizer: DASH, seeds: range) -> None:
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(device)
            optimizer.step()

    def fresh() -> tuple[list[torch.Tensor], DASH]:
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=generator).to(device).requires_grad_() for s in shapes]
        return params, DASH(params, lr=1e-2, block_size=16, precondition_frequency=2)

    whole, whole_optimizer = fresh()
    steps(whole, whole_optimizer, range(4))
    half, half_optimizer = fresh()
    steps(half, half_optimizer, range(2))
    resumed, resumed_optimizer = fresh()
    with torch.no_grad():
        for r, h in zip(resumed, half):
            r.copy_(h)
    resumed_optimizer.load_state_dict(half_optimizer.state_dict())
    steps(resumed, resumed_optimizer, range(2, 4))
    return all(torch.equal(a, b) for a, b in zip(whole, resumed))


def sync(device: torch.device, out: Path, dry_run: bool, budget: float) -> dict[str, Any]:
    """Steps after the first under ``set_sync_debug_mode("error")``: the first host sync, or none."""
    if device.type != "cuda":
        return {"skipped": "no CUDA device (torch.cuda.set_sync_debug_mode needs one)"}
    found = {}
    for method in ("ndb", "eigh"):
        params = [
            torch.randn(s, device=device, requires_grad=True) for s in [(512, 512), (512,), (1376, 512)]
        ]
        optimizer = DASH(params, lr=1e-3, block_size=256, precondition_frequency=1, root_method=method)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()  # builds the layout (syncs allowed)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step()
            found[method] = None
        except RuntimeError:
            found[method] = traceback.format_exc(limit=-6)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"first_sync": found}


def _command(arguments: list[str], out: Path, budget: float) -> dict[str, Any]:
    """Run ``python -m dash_shampoo ARGUMENTS`` with ``budget`` seconds; its log goes to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "dash_shampoo", *arguments]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=budget)
        code, log = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        code, log = "timeout", f"{error.stdout or ''}{error.stderr or ''}"
    (out / "log.txt").write_text(" ".join(command) + "\n" + (log if isinstance(log, str) else log.decode()))
    return {"command": " ".join(command[2:]), "exit": code}


def step(device: torch.device, out: Path, dry_run: bool, budget: float) -> dict[str, Any]:
    """``bench step``: on a GPU the GPU preset's rows of the 124m model and of one rank's share of the
    953M model at block 1024 (the GPU targets); the ``quick`` preset in a dry run."""
    models = ["--models", "124m", "953m-rank", "--block-sizes", "1024", "--row-seconds", "4"]
    preset = ["--preset", "quick", "--device", "cpu"] if dry_run else ["--preset", "gpu", *models]
    return _command(["bench", "step", *preset, "--out", str(out)], out, budget)


def roots(device: torch.device, out: Path, dry_run: bool, budget: float) -> dict[str, Any]:
    """``bench roots`` in fp32, tf32 and bf16 (``quick`` in a dry run)."""
    grid = [
        "--sizes",
        "256",
        "1024",
        "--methods",
        "eigh",
        "ndb",
        "newton",
        "--scalings",
        "power_multi",
        "fro",
    ]
    options = ["--preset", "quick", "--device", "cpu"] if dry_run else grid
    precisions = ["--precisions", "fp32", "tf32", "bf16"]
    return _command(["bench", "roots", *options, *precisions, "--out", str(out)], out, budget)


def train(device: torch.device, out: Path, dry_run: bool, budget: float) -> dict[str, Any]:
    """``dash-shampoo train``: the 124m model for 60 steps (the tiny one for 4 in a dry run)."""
    size = (
        ["--model", "tiny", "--steps", "4", "--eval-every", "2"]
        if dry_run
        else ["--model", "124m", "--steps", "60"]
    )
    return _command(["train", *size, "--out", str(out)], out, budget)


RUNNERS: dict[str, Callable[[torch.device, Path, bool, float], dict[str, Any]]] = {
    "check": check, "sync": sync, "step": step, "roots": roots, "train": train,
}  # fmt: skip


def _install(wheels: Path) -> None:
    names = sorted(str(w) for w in wheels.glob("*.whl"))
    if names:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
                        str(wheels), *names], check=True)  # fmt: skip


def _write(out: Path, work: Path, record: RunRecord, results: dict[str, Any]) -> None:
    """The three result files, from what the stages have written so far."""
    meta = record.metadata()
    document = {**meta, "stages": results}
    (out / "summary.json").write_text(json.dumps(document, indent=2, default=str))
    lines = ["# dash-shampoo bench gpu", "", *metadata_lines(meta), ""]
    for name, result in results.items():
        text = json.dumps(result, indent=1, default=str)[:4000]
        lines += [f"## {name} ({result.get('seconds', 0):.0f} s)", "", "```", text, "```", ""]
    (out / "summary.md").write_text("\n".join(lines))
    with tarfile.open(out / "results.tar.gz", "w:gz") as archive:
        archive.add(work, arcname="results")


def run(args: argparse.Namespace) -> int:
    """Run the stages; returns 1 if one raised or its command failed."""
    device = _device(args.dry_run)
    if args.wheels is not None:
        _install(args.wheels)
    budgets = DRY_BUDGETS if args.dry_run else BUDGETS
    args.out.mkdir(parents=True, exist_ok=True)
    record = RunRecord.start(args, device, "dash-shampoo bench gpu")
    results: dict[str, Any] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="dash-gpu-") as tmp:
        work = Path(tmp)
        for name in args.stages:
            started = time.perf_counter()
            print(f"bench gpu: {name} ...", file=sys.stderr, flush=True)
            try:
                result = RUNNERS[name](device, work / name, args.dry_run, budgets.get(name, 0))
            except Exception:
                result = {"error": traceback.format_exc(limit=-8)}
            result["seconds"] = time.perf_counter() - started
            failed |= "error" in result or result.get("exit", 0) != 0
            results[name] = result
            _write(args.out, work, record, results)
    print(f"wrote {args.out}/summary.md, summary.json, results.tar.gz ({record.device})", file=sys.stderr)
    return 1 if failed else 0
