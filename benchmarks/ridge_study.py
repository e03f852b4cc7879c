"""The relative ridge on the trainer's task: final validation loss per solver, ridge and seed.

Each run is ``dash-shampoo train --optimizer dash`` with one ``--root-method`` and one
``--root-eps-relative`` (everything else the trainer's defaults: the tiny model, 400 steps), one
process at a time on one thread. Runs already on disk are kept, so an interrupted study resumes.
The summary gives, per solver and ridge, the mean and sample standard deviation of the final
validation loss over the seeds and the mean of the per-seed difference from ridge 0 (paired by
seed, so the seed-to-seed spread of the task cancels).

    python benchmarks/ridge_study.py --out runs/ridge-study
    python benchmarks/ridge_study.py --out runs/ridge-study --summary benchmarks/results/ridge-study-cpu

``--share 0/2`` and ``--share 1/2`` run half the configurations each (two processes on two cores);
a final run without ``--share`` finds them all on disk and writes the summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

METHODS = ("eigh", "ndb", "newton")
RIDGES = (0.0, 1e-6, 1e-4, 1e-2)
SEEDS = (0, 1, 2)


def run_name(method: str, ridge: float, seed: int) -> str:
    return f"{method}-rel{ridge:g}-seed{seed}"


def run_one(out: Path, method: str, ridge: float, seed: int, steps: int) -> dict:
    """Train once (unless the result is on disk) and return the trainer's result record."""
    name = run_name(method, ridge, seed)
    path = out / f"{name}.json"
    if not path.exists():
        command = [
            sys.executable, "-m", "dash_shampoo", "train", "--optimizer", "dash", "--threads", "1",
            "--root-method", method, "--root-eps-relative", f"{ridge:g}", "--seed", str(seed),
            "--steps", str(steps), "--out", str(out), "--name", name,
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    document = json.loads(path.read_text())
    (record,) = document["results"]
    return {"meta": {k: document[k] for k in ("date", "device", "versions", "model", "settings")}, **record}


def summarize(runs: dict[tuple[str, float, int], dict]) -> tuple[list[dict], dict]:
    """Rows of mean/std loss and mean paired difference from ridge 0, per solver and ridge."""
    rows = []
    for method, ridge in itertools.product(METHODS, RIDGES):
        seeds = [s for s in SEEDS if (method, ridge, s) in runs and (method, 0.0, s) in runs]
        losses = [runs[method, ridge, s]["final_val_loss"] for s in seeds]
        deltas = [losses[i] - runs[method, 0.0, s]["final_val_loss"] for i, s in enumerate(seeds)]
        if not seeds:
            continue
        rows.append(
            {
                "method": method,
                "root_eps_relative": ridge,
                "seeds": seeds,
                "final_val_loss": losses,
                "mean": statistics.fmean(losses),
                "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                "mean_delta_vs_0": statistics.fmean(deltas),
                "root_failures": [runs[method, ridge, s]["root_failures"] for s in seeds],
                "diverged": any(runs[method, ridge, s]["diverged"] for s in seeds),
            }
        )
    meta = next(iter(runs.values()))["meta"]
    return rows, meta


def markdown(rows: list[dict], meta: dict, command: str) -> str:
    lines = [
        "# Relative ridge study (root_eps_relative)",
        "",
        f"- command: `{command}`",
        f"- date: {meta['date']}; device: {meta['device']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- task: `dash-shampoo train --optimizer dash` defaults (model {meta['model']['name']}, "
        f"{meta['settings']['steps']} steps), one thread, seeds {', '.join(map(str, SEEDS))}",
        "",
        "| solver | root_eps_relative | final val loss per seed | mean | std | mean Δ vs 0 (paired) "
        "| root failures |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        per_seed = ", ".join(f"{x:.4f}" for x in row["final_val_loss"])
        lines.append(
            f"| {row['method']} | {row['root_eps_relative']:g} | {per_seed} | {row['mean']:.4f} "
            f"| {row['std']:.4f} | {row['mean_delta_vs_0']:+.4f} | {sum(row['root_failures'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ridge-study"), help="per-run results")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--summary", type=Path, help="write <stem>.json and <stem>.md here")
    parser.add_argument(
        "--share", default="0/1", help="K/N: run every N-th configuration from the K-th (parallel studies)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    share, shares = map(int, args.share.split("/"))
    configurations = list(itertools.product(SEEDS, METHODS, RIDGES))
    if shares > 1:
        for seed, method, ridge in configurations[share::shares]:
            run_one(args.out, method, ridge, seed, args.steps)
        return
    runs = {}
    for seed, method, ridge in configurations:
        record = runs[method, ridge, seed] = run_one(args.out, method, ridge, seed, args.steps)
        print(f"{run_name(method, ridge, seed)}: {record['final_val_loss']:.4f}", flush=True)
    rows, meta = summarize(runs)
    command = "python benchmarks/ridge_study.py " + " ".join(sys.argv[1:])
    text = markdown(rows, meta, command)
    print(text)
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.with_name(args.summary.name + ".json").write_text(
            json.dumps({"command": command, **meta, "rows": rows}, indent=1)
        )
        args.summary.with_name(args.summary.name + ".md").write_text(text)


if __name__ == "__main__":
    main()
