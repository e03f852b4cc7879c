"""Results of ``dash-shampoo train``: run metadata, the markdown table, the plot, and the document
that :func:`dash_shampoo.results.write_report` writes as JSON.

matplotlib is imported only to draw the plot; without it the PNG is skipped with a message.
"""

from __future__ import annotations

import datetime
import math
import platform
import statistics
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..models import ModelConfig
from ..results import device_name


def metadata(
    *,
    command: str,
    runtime_device: torch.device,
    world_size: int,
    data_source: str,
    model: str,
    config: ModelConfig,
    parameters: int,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Everything needed to reproduce and read a result: command, device, versions, date, settings."""
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{runtime_device.type}: {device_name(runtime_device)}",
        "world_size": world_size,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "dash_shampoo": __version__,
            "platform": platform.platform(),
        },
        "data": data_source,
        "model": {"name": model, "parameters": parameters, **asdict(config)},
        "settings": settings,
    }


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The comparison as markdown: settings, the summary table and val loss at each evaluation."""
    config = meta["model"]
    lines = [
        "# dash-shampoo train",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; device: {meta['device']} x{meta['world_size']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- data: {meta['data']}",
        f"- model: {config['name']}, {config['parameters']:,} parameters (d={config['d_model']}, "
        f"layers={config['n_layer']}, heads={config['n_head']}, seq={config['seq_len']}, "
        f"vocab={config['vocab_size']})",
        f"- batch: {meta['settings']['batch_size']} x {config['seq_len']} tokens per rank and step, "
        f"{meta['settings']['steps']} steps, warmup {meta['settings']['warmup']:g}, cosine to lr/10, "
        f"grad clip {meta['settings']['grad_clip']:g}, weight decay {meta['settings']['weight_decay']:g}, "
        f"seed {meta['settings']['seed']}",
        "",
    ]
    memory_kind = results[0]["peak_memory_kind"] if results else ""
    note = " (cumulative over the runs of this process)" if memory_kind == "process peak RSS" else ""
    lines += summary(results)
    lines += [
        f"| optimizer | lr | seed | steps | final val loss | val ppl | train time (s) | opt ms/step mean "
        f"(median) | tokens/s | optimizer state (MiB) | {memory_kind} (MiB){note} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = r["optimizer"] + (" (diverged)" if r["diverged"] else "")
        lines.append(
            f"| {name} | {r['lr']:g} | {r.get('seed', meta['settings']['seed'])} | {r['steps']} "
            f"| {r['final_val_loss']:.4f} | {r['final_val_ppl']:.3f} "
            f"| {r['train_time_s']:.1f} | {r['opt_ms_mean']:.1f} ({r['opt_ms_median']:.1f}) "
            f"| {r['tokens_per_s']:,.0f} | {r['optimizer_state_mib']:.1f} | {r['peak_memory_mib']:.0f} |"
        )
    for r in shown(results):
        if r["options"]:
            options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
            lines.append(
                f"\n{r['optimizer']}: DASH({options}); root failures {r['root_failures']}, "
                f"skipped steps {r['skipped_steps']}"
            )
    results = shown(results)
    steps = sorted({e["step"] for r in results for e in r["evals"]})
    by_step = [{e["step"]: e["val_loss"] for e in r["evals"]} for r in results]
    lines += [
        "",
        "Validation loss at each evaluation:",
        "",
        "| step | " + " | ".join(r["optimizer"] for r in results) + " |",
        "|---" * (len(results) + 1) + "|",
    ]
    for step in steps:
        cells = [f"{losses[step]:.4f}" if step in losses else "" for losses in by_step]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def shown(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run of each optimizer drawn and tabled per evaluation: its best lr's first seed."""
    first: dict[str, dict[str, Any]] = {}
    for r in results:
        if r.get("best", True) and r["optimizer"] not in first:
            first[r["optimizer"]] = r
    return list(first.values())


def summary(results: list[dict[str, Any]]) -> list[str]:
    """With an lr sweep or several seeds: per optimizer its best lr, the lrs tried and the final val
    loss over the seeds at the best lr (mean, min and max); else nothing."""
    if len({r["optimizer"] for r in results}) == len(results):
        return []
    lines = [
        "Each optimizer at its best learning rate (by final validation loss of the first seed):",
        "",
        "| optimizer | best lr | lrs tried | seeds | final val loss mean | min | max | opt ms/step mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["optimizer"] for r in results):
        runs = [r for r in results if r["optimizer"] == name]
        best = [r for r in runs if r.get("best", True)]
        losses, opt_ms = [r["final_val_loss"] for r in best], statistics.fmean(r["opt_ms_mean"] for r in best)
        tried = ", ".join(f"{lr:g}" for lr in sorted({r["lr"] for r in runs}))
        lines.append(
            f"| {name} | {best[0]['lr']:g} | {tried} | {len(best)} | {statistics.fmean(losses):.4f} "
            f"| {min(losses):.4f} | {max(losses):.4f} | {opt_ms:.1f} |"
        )
    return [*lines, ""]


def plot(document: dict[str, Any], path: Path) -> bool:
    """Draw ``path``: val loss vs step and vs training wall time, one line per optimizer, of a
    document of :func:`finite` ``{**metadata, "results": results}``; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)", file=sys.stderr)
        return False
    results = shown(document["results"])
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for r in results:
        evals = [e for e in r["evals"] if e["val_loss"] is not None]  # None: not finite
        label = f"{r['optimizer']} (lr {r['lr']:g})"
        by_step.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], marker=".", label=label)
        by_time.plot(
            [e["train_time_s"] for e in evals], [e["val_loss"] for e in evals], marker=".", label=label
        )
    losses = [e["val_loss"] for r in results for e in r["evals"][1:] if e["val_loss"] is not None]
    for axis, xlabel in ((by_step, "step"), (by_time, "training wall time (s, evaluation excluded)")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("validation loss (nats/token)")
        axis.grid(alpha=0.3)
        axis.legend()
        if losses:  # the step-0 loss (ln vocab) would flatten the interesting part
            low, high = min(losses), max(losses)
            axis.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    command = "\n".join(textwrap.wrap(document["command"], 140, break_on_hyphens=False))
    figure.suptitle(f"{document['model']['name']} model, {document['device']}\n{command}", fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
