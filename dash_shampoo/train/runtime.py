"""Where and how ``dash-shampoo train`` runs: device and ranks, the progress line, peak memory and
checkpoint files. The trainer calls these; none of them knows the model, the optimizers or the loop."""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import is_dtensor

#: Version of the checkpoint layout; a checkpoint with another value is refused.
CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# Device and ranks
# ----------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """Where this process trains.

    Attributes:
        device: the device of the model and the batches.
        rank: this process's rank (0 without torchrun).
        world_size: the number of ranks.
        owns_group: True if :func:`setup_runtime` created the process group (and so must destroy it).
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """True on the rank that prints and writes files."""
        return self.rank == 0

    def synchronize(self) -> None:
        """Wait for the queued device work, so that host timers measure it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Destroy the process group if :func:`setup_runtime` created it."""
        if self.owns_group:
            dist.destroy_process_group()
            self.owns_group = False


def setup_runtime(threads: int | None = None) -> Runtime:
    """Choose the device and join the ranks: CUDA if available, else CPU; under torchrun with
    ``WORLD_SIZE > 1`` a process group (``nccl`` on CUDA, ``gloo`` on CPU) unless one exists.

    Args:
        threads: torch's CPU thread count; ``None`` keeps torch's choice.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(torch.device("cuda" if cuda else "cpu"))
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Runtime(device, dist.get_rank(), dist.get_world_size(), owns_group)


PARALLEL = ("ddp", "fsdp")


def parallelize(model: torch.nn.Module, runtime: Runtime, parallel: str) -> torch.nn.Module:
    """The module to call for the loss: ``model`` itself with one rank; with several, wrapped in
    ``DistributedDataParallel`` (``"ddp"``), or sharded in place by FSDP2's ``fully_shard``, each of
    ``model.blocks`` and then the whole model (``"fsdp"``; its parameters become DTensors)."""
    if runtime.world_size == 1:
        return model
    if parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _sharded(model: torch.nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's whole state as one process would save it. Sharded by FSDP2:
    gathered on the CPU with ``torch.distributed.checkpoint``'s ``get_*_state_dict`` (a collective:
    every rank calls it; the optimizer state is keyed by parameter names). Else the plain
    ``state_dict()`` of each (every rank holds all of it)."""
    if not _sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(
        model, optimizer, options=options
    )


def load_full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict, saved_optim: dict
) -> None:
    """Load what :func:`full_state` returned (by any parallelism) into ``model`` and ``optimizer``;
    under FSDP2 every rank passes the whole state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    by_name = any(isinstance(i, str) for group in saved_optim["param_groups"] for i in group["params"])
    full = StateDictOptions(full_state_dict=True) if _sharded(model) else None
    if full is not None:
        set_model_state_dict(model, saved, options=full)
    else:
        model.load_state_dict(saved)
    if by_name:
        set_optimizer_state_dict(model, optimizer, saved_optim, options=full)
    else:
        optimizer.load_state_dict(saved_optim)


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------


class Progress:
    """One progress line on stderr: a bar rewritten in place on a terminal, else a plain line every
    few steps. Each line tells the optimizer's mean step time over the steps since the last line
    (a refresh step, which is much slower, shows as the slowest), the token rate over them and the
    time left at that rate.

    Args:
        enabled: False on the ranks that stay silent.
        every: the step period of the printed line when stderr is not a terminal (and the window
            of the means on one).
        tokens_per_step: tokens trained per step (all ranks).
    """

    def __init__(self, enabled: bool, every: int, tokens_per_step: int = 0) -> None:
        self.enabled = enabled
        self.every = every
        self.tokens_per_step = tokens_per_step
        self.tty = sys.stderr.isatty()
        self.open = False
        self.window: list[tuple[float, float]] = []

    def step(self, step: int, total: int, seconds: float, opt_seconds: float, text: str) -> None:
        """Record a step that took ``seconds`` (``opt_seconds`` of them in ``optimizer.step()``) and
        show ``text`` with the interval's figures (every step on a terminal, every ``every`` else)."""
        self.window = [*self.window, (seconds, opt_seconds)][-self.every :]
        if not self.enabled or not (self.tty or step % self.every == 0):
            return
        mean = sum(s for s, _ in self.window) / len(self.window)
        opt = [o for _, o in self.window]
        left = int(mean * (total - step))
        figures = (
            f"{self.tokens_per_step / mean:8.0f} tok/s  opt {1000 * sum(opt) / len(opt):6.1f} ms mean "
            f"(slowest {1000 * max(opt):.0f})  ETA {left // 60}:{left % 60:02d}"
        )
        if self.tty:
            done = 20 * step // max(total, 1)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (20 - done)}] {text}  {figures}\x1b[K")
            sys.stderr.flush()
            self.open = True
        else:
            print(f"{text}  {figures}", file=sys.stderr, flush=True)
            self.window = []

    def line(self, text: str) -> None:
        """Print ``text`` on a line of its own (after ending an in-place line)."""
        if not self.enabled:
            return
        if self.open:
            sys.stderr.write("\n")
            self.open = False
        print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------


def reset_peak_memory(device: torch.device) -> bool:
    """Start a fresh peak-memory count on ``device``; False if the platform cannot reset it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device, was_reset: bool) -> tuple[float, str]:
    """Peak memory in MiB and what the number measures.

    CUDA: the caching allocator's peak since :func:`reset_peak_memory`. CPU: the whole process's
    peak resident set (the interpreter, torch, the data and the model included, not only the
    optimizer): since the reset if ``was_reset`` (``VmHWM``), else since the process started.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max_memory_allocated"
    if was_reset:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "process peak RSS during the run"
        except OSError:
            pass
    # ru_maxrss is KiB on Linux, bytes on macOS; it is the process high-water mark since start.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, "process peak RSS"


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tagged with :data:`CHECKPOINT_FORMAT`) to ``path`` with ``torch.save``,
    atomically: a reader sees the previous file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path, optimizer_name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at ``path`` (loaded with ``weights_only=True``), if it was saved by a run of
    optimizer ``optimizer_name`` with the same ``options`` (``{option_dest: value}``).

    Raises:
        ValueError: no such file, not a checkpoint of this format, or saved by another optimizer or
            with another value of an option; the message names ``--resume`` and the option.
    """
    if not path.is_file():
        raise ValueError(f"--resume {path}: no such file")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume {path}: not a dash-shampoo train checkpoint")
    if payload["optimizer_name"] != optimizer_name:
        raise ValueError(
            f"--resume {path}: saved by optimizer {payload['optimizer_name']!r}, "
            f"this run trains {optimizer_name!r}"
        )
    for key, now in options.items():
        saved = payload["options"].get(key)
        if saved != now:
            option = "--" + key.replace("_", "-")
            raise ValueError(
                f"--resume {path}: the checkpoint was trained with {option} {saved}, this run has {now}"
            )
    return payload
