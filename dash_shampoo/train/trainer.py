"""``dash-shampoo train``: train a small Llama-style model with DASH, Shampoo or AdamW, and compare.

Read top to bottom: the options (:func:`add_arguments`), the learning-rate schedule, the optimizer
factory, the training loop of one optimizer (:func:`train_one`) with evaluation and checkpoints,
and :func:`run`, which trains each optimizer of ``--compare`` from the same initial weights on
the same batches and writes the comparison (:mod:`dash_shampoo.train.report`).

The default run (no options) trains the ``tiny`` model on the built-in corpus (the standard
library's Python sources as bytes, :mod:`dash_shampoo.train.data`) with AdamW and with DASH and
finishes in a few minutes on two CPU cores. The learning rates and the DASH configuration of the
defaults come from the sweep recorded in ``benchmarks/results/train-cpu.md``.

With ``torchrun --nproc-per-node N`` (``WORLD_SIZE > 1``) the model is wrapped in
``DistributedDataParallel`` (``nccl`` on CUDA, ``gloo`` on CPU), each rank draws its own batches,
and DASH shares its preconditioner work over the ranks by itself.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .. import DASH
from ..linalg import METHODS, PRECISIONS, SCALINGS
from ..models import SIZES, Llama, ModelConfig, model_config
from ..results import command_text
from . import data as data_module

OPTIMIZERS = ("adamw", "dash", "shampoo")
#: Peak learning rates of the default run (a sweep on the tiny model; see the module docstring).
DEFAULT_LR = {"adamw": 3e-3, "dash": 3e-3, "shampoo": 3e-3}
DEFAULT_COMPARE = ("adamw", "dash")
BETAS = (0.9, 0.95)  # the paper's β₁ (gradient EMA) and β₂ (Adam / grafting second moment)
EPS = 1e-8
START_LR_FRACTION = 0.01  # warmup starts at lr/100 (the paper's OneCycleLR div_factor)
FINAL_LR_FRACTION = 0.1  # the cosine ends at lr/10
CHECKPOINT_FORMAT = 1
#: Options that must match between a checkpoint and the run that resumes it.
RESUME_KEYS = (
    "model",
    "d_model",
    "n_layer",
    "n_head",
    "seq_len",
    "batch_size",
    "steps",
    "warmup",
    "weight_decay",
    "grad_clip",
    "seed",
    "block_size",
    "root_method",
    "scaling",
    "precision",
    "stacking",
    "precondition_frequency",
    "start_preconditioning_step",
    "data",
    "corpus_bytes",
)


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` options to ``parser``."""
    parser.description = "Train a Llama-style model with DASH / Shampoo / AdamW and compare them."
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="tiny", choices=tuple(SIZES), help="named size (default: tiny)")
    model.add_argument("--d-model", type=int, help="override the width of the named size")
    model.add_argument("--n-layer", type=int, help="override the number of blocks")
    model.add_argument("--n-head", type=int, help="override the number of attention heads")
    model.add_argument("--seq-len", type=int, help="sequence length (default: the size's, 128 for tiny)")

    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, help="directory with train.bin/val.bin of uint16 token ids")
    data.add_argument("--vocab-size", type=int, default=32000, help="vocabulary of --data (default 32000)")
    data.add_argument(
        "--corpus-bytes",
        type=int,
        default=data_module.DEFAULT_CORPUS_BYTES,
        help="cap of the built-in corpus in bytes (default: %(default)s, i.e. all of it)",
    )
    data.add_argument("--cache-dir", type=Path, help="where the built-in corpus is cached")

    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=400, help="optimizer steps (default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=16, help="sequences per step and rank")
    train.add_argument(
        "--lr",
        default=None,
        help="peak learning rate: a number, or per optimizer as 'adamw=3e-3,dash=3e-3' "
        f"(default: {', '.join(f'{k}={v:g}' for k, v in DEFAULT_LR.items())})",
    )
    train.add_argument(
        "--warmup",
        type=float,
        default=0.1,
        help="linear warmup from lr/100: a fraction of --steps if < 1, else a step count (default 0.1)",
    )
    train.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (default 0)")
    train.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip; 0 disables")
    train.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the batches")
    train.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: 1 for the tiny model, whose small matmuls gain little from "
        "threads and stall at thread barriers on a busy machine; torch's choice otherwise)",
    )

    optim = parser.add_argument_group("optimizers")
    optim.add_argument("--optimizer", choices=OPTIMIZERS, help="train one optimizer (no comparison)")
    optim.add_argument(
        "--compare",
        help=f"comma-separated optimizers trained in turn (default: {','.join(DEFAULT_COMPARE)}); "
        "'shampoo' is DASH with stacking='none', the sequential block-Shampoo baseline",
    )
    optim.add_argument("--block-size", type=int, default=128, help="DASH block size (default 128)")
    optim.add_argument("--root-method", default="ndb", choices=METHODS, help="DASH inverse-root solver")
    optim.add_argument("--scaling", default=None, choices=SCALINGS, help="spectral scaling (default: DASH's)")
    optim.add_argument("--precision", default="fp32", choices=PRECISIONS, help="solver matmul precision")
    optim.add_argument(
        "--stacking", default="global", choices=("global", "layer", "none"), help="DASH stacking mode"
    )
    optim.add_argument("--precondition-frequency", type=int, default=10, help="root refresh period")
    optim.add_argument(
        "--start-preconditioning-step", type=int, default=1, help="first step with the Shampoo direction"
    )

    run = parser.add_argument_group("evaluation, checkpoints and output")
    run.add_argument("--eval-every", type=int, default=None, help="evaluate every K steps (default steps/10)")
    run.add_argument("--eval-batches", type=int, default=8, help="fixed validation batches per evaluation")
    run.add_argument("--log-every", type=int, default=10, help="progress line period when not a terminal")
    run.add_argument("--checkpoint", type=Path, help="save model, optimizer, schedule and step here")
    run.add_argument("--resume", type=Path, help="continue from this checkpoint")
    run.add_argument("--stop-after", type=int, help="stop (and checkpoint) after this many steps")
    run.add_argument("--out", type=Path, default=Path("dash-shampoo-results"), help="results directory")
    run.add_argument("--name", default=None, help="results file stem (default: train-<device>)")


def fail(message: str) -> SystemExit:
    """A ``SystemExit`` carrying a usage error (printed on stderr, exit code 1)."""
    return SystemExit(f"dash-shampoo train: error: {message}")


def optimizer_names(args: argparse.Namespace) -> list[str]:
    """The optimizers to train, from ``--optimizer`` or ``--compare``."""
    if args.optimizer and args.compare:
        raise fail("give either --optimizer or --compare, not both")
    if args.optimizer:
        return [args.optimizer]
    names = [n.strip() for n in args.compare.split(",")] if args.compare else list(DEFAULT_COMPARE)
    for name in names:
        if name not in OPTIMIZERS:
            raise fail(f"--compare: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    if len(set(names)) != len(names):
        raise fail(f"--compare lists an optimizer twice: {args.compare!r}")
    return names


def learning_rates(spec: str | None, names: Iterable[str]) -> dict[str, float]:
    """Peak learning rate per optimizer from ``--lr`` (one number, or ``name=value`` pairs)."""
    rates = {name: DEFAULT_LR[name] for name in names}
    if spec is None:
        return rates
    try:
        if "=" not in spec:
            return dict.fromkeys(rates, float(spec))
        for item in spec.split(","):
            name, value = item.split("=")
            name = name.strip()
            if name not in rates:
                raise fail(f"--lr names {name!r}, which is not trained in this run ({', '.join(rates)})")
            rates[name] = float(value)
    except ValueError:
        raise fail(f"--lr must be a number or 'name=value,...'; got {spec!r}") from None
    for name, value in rates.items():
        if not value > 0 or not math.isfinite(value):
            raise fail(f"--lr for {name} must be positive and finite; got {value}")
    return rates


def check_options(args: argparse.Namespace) -> None:
    """Reject option values that cannot work, naming the option."""
    positive = ("steps", "batch_size", "eval_batches", "log_every", "block_size", "precondition_frequency")
    for key in positive:
        if getattr(args, key) < 1:
            raise fail(f"--{key.replace('_', '-')} must be at least 1; got {getattr(args, key)}")
    for key in ("seq_len", "eval_every", "stop_after"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise fail(f"--{key.replace('_', '-')} must be at least 1; got {value}")
    if args.warmup < 0 or (args.warmup >= 1 and args.warmup != int(args.warmup)):
        raise fail(f"--warmup must be a fraction in [0, 1) or a whole number of steps; got {args.warmup}")
    if warmup_steps(args) > args.steps:
        raise fail(f"--warmup {args.warmup:g} is longer than --steps {args.steps}")
    if args.grad_clip < 0:
        raise fail(f"--grad-clip must be >= 0 (0 disables clipping); got {args.grad_clip}")
    if args.weight_decay < 0:
        raise fail(f"--weight-decay must be >= 0; got {args.weight_decay}")
    if args.start_preconditioning_step < 1:
        raise fail(f"--start-preconditioning-step must be at least 1; got {args.start_preconditioning_step}")
    if args.threads is not None and args.threads < 1:
        raise fail(f"--threads must be at least 1; got {args.threads}")
    if args.seed < 0:
        raise fail(f"--seed must be >= 0; got {args.seed}")
    if args.resume is not None and not args.resume.is_file():
        raise fail(f"--resume {args.resume}: no such file")


# ----------------------------------------------------------------------------------------------
# Schedule and optimizers
# ----------------------------------------------------------------------------------------------


def warmup_steps(args: argparse.Namespace) -> int:
    """``--warmup`` as a step count."""
    return round(args.warmup * args.steps) if args.warmup < 1 else int(args.warmup)


class WarmupCosine:
    """LR multiplier: linear from 1/100 to 1 over ``warmup`` steps, then a cosine down to 1/10.

    A class (not a lambda) so that ``LambdaLR.state_dict`` saves its fields.
    """

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = warmup
        self.total = total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return START_LR_FRACTION + (1 - START_LR_FRACTION) * step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def dash_options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :class:`DASH` for ``name`` ("dash" or "shampoo")."""
    options: dict[str, Any] = {
        "block_size": args.block_size,
        "root_method": args.root_method,
        "precision": args.precision,
        "stacking": "none" if name == "shampoo" else args.stacking,
        "precondition_frequency": args.precondition_frequency,
        "start_preconditioning_step": args.start_preconditioning_step,
    }
    if args.scaling is not None:
        options["scaling"] = args.scaling
    return options


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, args: argparse.Namespace
) -> torch.optim.Optimizer:
    """AdamW, or DASH (``"dash"``), or DASH without stacking (``"shampoo"``), with the paper's betas."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=args.weight_decay)
    return DASH(
        params, lr=lr, betas=BETAS, eps=EPS, weight_decay=args.weight_decay, **dash_options(name, args)
    )


# ----------------------------------------------------------------------------------------------
# Devices, distribution, progress
# ----------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """Where this process trains: device, rank and number of ranks."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """True on the rank that prints and writes files."""
        return self.rank == 0

    def synchronize(self) -> None:
        """Wait for queued device work (so host timers measure it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def setup_runtime() -> Runtime:
    """CUDA if available else CPU; a process group when launched by torchrun with several ranks."""
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


class Progress:
    """One progress line on stderr: rewritten in place on a terminal, else a line every few steps."""

    def __init__(self, enabled: bool, every: int) -> None:
        self.enabled = enabled
        self.every = every
        self.tty = sys.stderr.isatty()
        self.open = False

    def step(self, step: int, text: str) -> None:
        """Show ``text`` for ``step`` (every step on a terminal, every ``every`` steps otherwise)."""
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r" + text + "\x1b[K")
            sys.stderr.flush()
            self.open = True
        elif step % self.every == 0:
            print(text, file=sys.stderr, flush=True)

    def line(self, text: str) -> None:
        """Print ``text`` on a line of its own."""
        if not self.enabled:
            return
        if self.open:
            sys.stderr.write("\n")
            self.open = False
        print(text, file=sys.stderr, flush=True)


def reset_peak_memory(runtime: Runtime) -> bool:
    """Start a fresh peak-memory count for this run; False if the platform cannot (see below)."""
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
        return True
    try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(runtime: Runtime, reset: bool) -> tuple[float, str]:
    """Peak memory in MiB since :func:`reset_peak_memory`, and what the number measures.

    CUDA: the caching allocator's peak of this run. CPU: the whole process's peak resident set
    (``VmHWM``: the Python interpreter, torch, the data and the model included, not only the
    optimizer), since this run started if it could be reset, else since the process started.
    """
    if runtime.device.type == "cuda":
        return torch.cuda.max_memory_allocated(runtime.device) / 2**20, "CUDA max_memory_allocated"
    if reset:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "process peak RSS during the run"
        except OSError:
            pass
    # ru_maxrss is KiB on Linux, bytes on macOS; it is the process high-water mark since start.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, "process peak RSS"


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer state of this rank (each storage counted once)."""
    storages: dict[int, int] = {}
    for entry in optimizer.state.values():
        for value in entry.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically with ``torch.save``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load a checkpoint (``weights_only=True``) and check it belongs to this run's settings."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise fail(f"--resume {path}: not a dash-shampoo train checkpoint")
    if payload["optimizer_name"] != name:
        raise fail(
            f"--resume {path}: saved by optimizer {payload['optimizer_name']!r}, this run trains {name!r}"
        )
    for key in RESUME_KEYS:
        saved, now = payload["options"].get(key), _option_value(getattr(args, key))
        if saved != now:
            option = "--" + key.replace("_", "-")
            raise fail(
                f"--resume {path}: the checkpoint was trained with {option} {saved}, this run has {now}"
            )
    return payload


def _option_value(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


# ----------------------------------------------------------------------------------------------
# Training one optimizer
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> float:
    """Mean cross-entropy over the fixed validation batches."""
    was_training = model.training
    model.eval()
    losses = [model(x.to(device), y.to(device)) for x, y in batches]
    model.train(was_training)
    return float(torch.stack(losses).mean())


def train_one(
    name: str,
    lr: float,
    args: argparse.Namespace,
    config: ModelConfig,
    data: data_module.TokenData,
    runtime: Runtime,
) -> dict[str, Any]:
    """Train a fresh model (seeded by ``--seed``) with optimizer ``name``; returns its measurements."""
    device = runtime.device
    model = Llama(config, torch.Generator().manual_seed(args.seed)).to(device)
    trained = DistributedDataParallel(model) if runtime.world_size > 1 else model
    optimizer = build_optimizer(name, model.parameters(), lr, args)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps(args), args.steps))
    validation = data_module.val_batches(data, args.eval_batches, args.batch_size, config.seq_len)
    eval_every = args.eval_every or max(1, args.steps // 10)
    progress = Progress(runtime.main, args.log_every)
    memory_reset = reset_peak_memory(runtime)

    step, train_time = 0, 0.0
    evals: list[dict[str, float]] = []
    train_losses: list[float] = []
    opt_times: list[float] = []
    if args.resume is not None:
        saved = load_checkpoint(args.resume, name, args)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["scheduler"])
        step, train_time = saved["step"], saved["train_time"]
        evals, train_losses, opt_times = saved["evals"], saved["train_losses"], saved["opt_times"]
        progress.line(f"{name}: resumed from {args.resume} at step {step}")

    def record_eval() -> None:
        loss = evaluate(model, validation, device)
        evals.append({"step": step, "val_loss": loss, "train_time_s": train_time})
        progress.line(f"{name} step {step:5d}: val loss {loss:.4f}  ppl {math.exp(loss):8.3f}")

    def checkpoint() -> None:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "optimizer_name": name,
            "options": {key: _option_value(getattr(args, key)) for key in RESUME_KEYS},
            "step": step,
            "train_time": train_time,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),  # every rank calls it (DASH gathers)
            "scheduler": schedule.state_dict(),
            "evals": evals,
            "train_losses": train_losses,
            "opt_times": opt_times,
        }
        if runtime.main:
            save_checkpoint(args.checkpoint, payload)

    if step == 0:
        record_eval()
    end = min(args.steps, args.stop_after) if args.stop_after else args.steps
    tokens_per_step = args.batch_size * config.seq_len * runtime.world_size
    diverged = False
    while step < end:
        started = time.perf_counter()
        x, y = data_module.train_batch(data, step, args.batch_size, config.seq_len, args.seed, runtime.rank)
        loss = trained(x.to(device), y.to(device))
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        runtime.synchronize()
        before_step = time.perf_counter()
        optimizer.step()
        runtime.synchronize()
        opt_seconds = time.perf_counter() - before_step
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        step += 1
        elapsed = time.perf_counter() - started
        train_time += elapsed
        train_losses.append(loss_value)
        opt_times.append(opt_seconds)
        progress.step(
            step,
            f"{name} step {step:5d}/{args.steps}  loss {loss_value:.4f}  lr {schedule.get_last_lr()[0]:.2e}  "
            f"{tokens_per_step / elapsed:8.0f} tok/s  opt {1000 * opt_seconds:7.1f} ms",
        )
        if not math.isfinite(loss_value):
            progress.line(f"{name}: training loss is {loss_value} at step {step}; stopping this run")
            diverged = True
            break
        if step % eval_every == 0 or step == args.steps:
            record_eval()
        if args.checkpoint is not None and (step % eval_every == 0 or step == end):
            checkpoint()

    memory, memory_kind = peak_memory(runtime, memory_reset)
    final = evals[-1]["val_loss"] if evals else float("nan")
    return {
        "optimizer": name,
        "lr": lr,
        "options": dash_options(name, args) if name != "adamw" else {},
        "steps": step,
        "diverged": diverged,
        "final_val_loss": final,
        "final_val_ppl": math.exp(final) if final < 50 else float("inf"),
        "train_time_s": train_time,
        "opt_ms_mean": 1000 * statistics.fmean(opt_times) if opt_times else float("nan"),
        "opt_ms_median": 1000 * statistics.median(opt_times) if opt_times else float("nan"),
        "tokens_per_s": tokens_per_step * len(opt_times) / train_time if train_time else float("nan"),
        "peak_memory_mib": memory,
        "peak_memory_kind": memory_kind,
        "optimizer_state_mib": state_bytes(optimizer) / 2**20,
        "root_failures": getattr(optimizer, "root_failures", 0),
        "skipped_steps": getattr(optimizer, "skipped_steps", 0),
        "evals": evals,
        "train_losses": train_losses,
    }


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def load_data(args: argparse.Namespace) -> data_module.TokenData:
    """The built-in corpus, or ``--data``; usage errors become ``SystemExit`` naming the option."""
    try:
        if args.data is not None:
            return data_module.load_bin(args.data, args.vocab_size)
        return data_module.load_corpus(args.cache_dir, args.corpus_bytes)
    except (FileNotFoundError, ValueError) as error:
        raise fail(str(error)) from None


def run(args: argparse.Namespace) -> int:
    """Train every optimizer asked for, print the comparison, write the result files; exit code."""
    names = optimizer_names(args)
    rates = learning_rates(args.lr, names)
    if (args.checkpoint or args.resume) and len(names) > 1:
        raise fail("--checkpoint and --resume need a single optimizer (--optimizer NAME)")
    if args.stop_after is not None and args.checkpoint is None:
        raise fail("--stop-after needs --checkpoint (where to save the stopped run)")
    data = load_data(args)
    try:
        config = model_config(
            args.model,
            vocab_size=data.vocab_size,
            d_model=args.d_model,
            n_layer=args.n_layer,
            n_head=args.n_head,
            seq_len=args.seq_len,
        )
    except ValueError as error:
        raise fail(str(error)) from None
    args.seq_len = config.seq_len
    check_options(args)
    try:
        data_module.check_length(data.train, config.seq_len, "training")
        data_module.check_length(data.val, config.seq_len, "validation")
    except ValueError as error:
        raise fail(str(error)) from None

    if args.threads is None and args.model == "tiny" and not torch.cuda.is_available():
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    runtime = setup_runtime()
    parameters = Llama(config, torch.Generator().manual_seed(args.seed)).num_parameters()
    if runtime.main:
        print(
            f"model {args.model}: {parameters:,} parameters (d={config.d_model}, layers={config.n_layer}, "
            f"heads={config.n_head}, seq={config.seq_len}, vocab={config.padded_vocab}); "
            f"device {runtime.device} x{runtime.world_size}; data: {data.source}",
            file=sys.stderr,
        )
    try:
        results = [train_one(name, rates[name], args, config, data, runtime) for name in names]
    finally:
        if runtime.owns_group:
            dist.destroy_process_group()
    if not runtime.main:
        return 0

    from . import report

    meta = report.metadata(
        command=command_text(args, shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])),
        runtime_device=runtime.device,
        world_size=runtime.world_size,
        data_source=data.source,
        model=args.model,
        config=config,
        parameters=parameters,
        settings={k: _option_value(v) for k, v in vars(args).items() if k not in ("func", "command_line")},
    )
    print(report.markdown(results, meta))
    if args.stop_after is None or args.stop_after >= args.steps:
        stem = args.name or f"train-{runtime.device.type}"
        for path in report.write(args.out, stem, results, meta):
            print(f"wrote {path}", file=sys.stderr)
    return 0 if not any(r["diverged"] for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m dash_shampoo.train [options]``."""
    parser = argparse.ArgumentParser(prog="python -m dash_shampoo.train")
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command_line = ["python", "-m", "dash_shampoo.train", *argv]
    return run(args)
