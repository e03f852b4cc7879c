"""``dash-shampoo train``: train a small Llama-style model with DASH and with AdamW, and compare.

Read top to bottom: the options (:func:`add_arguments`), the learning-rate schedule, the optimizer
factory (:data:`OPTIMIZERS`), the training loop of one optimizer (:func:`train_one`) with
evaluation and checkpoints, and :func:`run`, which trains each optimizer of ``--compare`` from the
same initial weights on the same batches and writes the comparison (:mod:`dash_shampoo.train.report`).
Devices, ranks, progress, memory and checkpoint files are in :mod:`dash_shampoo.train.runtime`.

The default run (no options) trains the ``tiny`` model on the built-in corpus (the standard
library's Python sources as bytes, :mod:`dash_shampoo.train.data`) with AdamW and with DASH and
finishes in a few minutes on two CPU cores. The learning rates and the DASH configuration of the
defaults come from the sweep recorded in ``benchmarks/results/train-cpu.md``.

With ``torchrun --nproc-per-node N`` (``WORLD_SIZE > 1``) the model is wrapped in
``DistributedDataParallel`` (``nccl`` on CUDA, ``gloo`` on CPU) and DASH shares its root refreshes
over the ranks by itself, or with ``--parallel fsdp`` sharded by FSDP2's ``fully_shard`` (each
block, then the model), and each rank preconditions its shard of every parameter. Each rank draws
its own batches. Checkpoints hold the whole state as one process would save it (FSDP2 gathers it),
so a run resumes under any parallelism and number of ranks.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer

from .. import DASH
from ..linalg import METHODS, PRECISIONS, SCALINGS
from ..models import SIZES, Llama, ModelConfig, model_config
from ..optimizer import STACKINGS
from ..peers import MuonWithAdamW, state_bytes
from ..results import command_text, write_report
from . import data as data_module
from . import report
from .runtime import (
    PARALLEL,
    Progress,
    Runtime,
    full_state,
    load_checkpoint,
    load_full_state,
    parallelize,
    peak_memory,
    reset_peak_memory,
    save_checkpoint,
    setup_runtime,
)

DEFAULT_COMPARE = ("adamw", "dash")
SWEEP_FACTOR = 2.0  # --lr-sweep: neighbouring learning rates differ by this factor
SWEEP_EXTENSIONS = 2  # ... and the grid grows outwards at most this many times
BETAS = (0.9, 0.95)  # the paper's β₁ (gradient EMA) and β₂ (Adam / grafting second moment)
EPS = 1e-8
START_LR_FRACTION = 0.01  # warmup starts at lr/100 (the paper's OneCycleLR div_factor)
FINAL_LR_FRACTION = 0.1  # the cosine ends at lr/10
#: Options that must match between a checkpoint and the run that resumes it.
RESUME_KEYS = tuple(
    "model d_model n_layer n_head seq_len batch_size steps warmup weight_decay grad_clip seed block_size "
    "root_method scaling root_eps root_eps_relative precision stacking precondition_frequency "
    "start_preconditioning_step data corpus_bytes".split()
)


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


def number(kind: type[int] | type[float], low: float, *, above: bool = False) -> Callable[[str], Any]:
    """The argparse type of an option that takes a finite ``kind`` (int or float) ``>= low``
    (``> low`` if ``above``); a bad value fails naming the option, the value and what is allowed."""
    allowed = f"{'a whole' if kind is int else 'a finite'} number {'>' if above else '>='} {low:g}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if above else value >= low)):
            raise argparse.ArgumentTypeError(f"must be {allowed}; got {text!r}")
        return value

    return parse


def warmup_length(text: str) -> float:
    """``--warmup``: a fraction of the steps in [0, 1), or a whole number of steps."""
    value = number(float, 0)(text)
    if value >= 1 and value != int(value):
        raise argparse.ArgumentTypeError(
            f"must be a fraction in [0, 1) or a whole number of steps; got {text!r}"
        )
    return value


def learning_rate(text: str) -> float | dict[str, float]:
    """``--lr``: one peak learning rate for every optimizer, or ``name=value`` pairs."""
    positive = number(float, 0, above=True)
    try:
        if "=" not in text:
            return positive(text)
        pairs = [item.partition("=") for item in text.split(",")]
        return {name.strip(): positive(value) for name, _, value in pairs}
    except argparse.ArgumentTypeError:
        message = f"must be a positive number, or 'name=value,...' pairs of them; got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def optimizer_list(text: str) -> list[str]:
    """``--compare``: distinct names of :data:`OPTIMIZERS`, comma-separated."""
    names = [name.strip() for name in text.split(",")]
    for name in names:
        if name not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}"
            )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"lists an optimizer twice: {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` options to ``parser``; each option checks its own value when parsed."""
    parser.description = "Train a Llama-style model with DASH and AdamW and compare them."
    count, whole, non_negative = number(int, 1), number(int, 0), number(float, 0)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="tiny", choices=tuple(SIZES), help="named size (default: tiny)")
    model.add_argument("--d-model", type=count, help="override the width of the named size")
    model.add_argument("--n-layer", type=count, help="override the number of blocks")
    model.add_argument("--n-head", type=count, help="override the number of attention heads")
    model.add_argument("--seq-len", type=count, help="sequence length (default: the size's, 128 for tiny)")

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
    train.add_argument("--steps", type=count, default=400, help="optimizer steps (default: %(default)s)")
    train.add_argument("--batch-size", type=count, default=16, help="sequences per step and rank")
    default_lr = ",".join(f"{name}={choice.default_lr:g}" for name, choice in OPTIMIZERS.items())
    train.add_argument(
        "--lr",
        type=learning_rate,
        help=f"peak learning rate: a number, or per optimizer as 'name=value,...' (default: {default_lr})",
    )
    train.add_argument(
        "--warmup",
        type=warmup_length,
        default=0.1,
        help="linear warmup from lr/100: a fraction of --steps if < 1, else a step count (default 0.1)",
    )
    train.add_argument(
        "--weight-decay", type=non_negative, default=0.0, help="decoupled weight decay (default 0)"
    )
    train.add_argument(
        "--grad-clip", type=non_negative, default=1.0, help="global gradient-norm clip; 0 disables"
    )
    train.add_argument("--seed", type=whole, default=0, help="seed of the initial weights and of the batches")
    train.add_argument(
        "--lr-sweep",
        action="store_true",
        help=f"train each optimizer at lr/{SWEEP_FACTOR:g}, lr and lr*{SWEEP_FACTOR:g} (going on outwards "
        "while the best is at an edge, at most twice) and compare each at its best validation loss",
    )
    train.add_argument(
        "--seeds",
        type=count,
        default=1,
        help="seeds from --seed on at each optimizer's (best) lr (default 1)",
    )
    train.add_argument(
        "--threads",
        type=count,
        help="torch CPU threads (default: 1 for the tiny model, whose small matmuls gain little from "
        "threads and stall at thread barriers on a busy machine; torch's choice otherwise)",
    )

    optim = parser.add_argument_group("optimizers")
    which = optim.add_mutually_exclusive_group()
    which.add_argument("--optimizer", choices=tuple(OPTIMIZERS), help="train one optimizer (no comparison)")
    which.add_argument(
        "--compare",
        type=optimizer_list,
        help=f"comma-separated optimizers trained in turn, from {', '.join(OPTIMIZERS)} "
        f"(default: {','.join(DEFAULT_COMPARE)})",
    )
    optim.add_argument("--block-size", type=count, default=128, help="DASH block size (default 128)")
    optim.add_argument("--root-method", default="ndb", choices=METHODS, help="DASH inverse-root solver")
    optim.add_argument("--scaling", default=None, choices=SCALINGS, help="spectral scaling (default: DASH's)")
    optim.add_argument(
        "--root-eps", type=number(float, 0), help="absolute ridge of the roots (default: DASH's)"
    )
    optim.add_argument(
        "--root-eps-relative", type=number(float, 0), help="ridge relative to tr/n (default: DASH's)"
    )
    optim.add_argument("--precision", default="fp32", choices=PRECISIONS, help="solver matmul precision")
    optim.add_argument(
        "--stacking",
        default="global",
        choices=STACKINGS,
        help="DASH stacking mode; 'none' preconditions block by block: the sequential block-Shampoo "
        "baseline (the same update, slower)",
    )
    optim.add_argument("--precondition-frequency", type=count, default=10, help="root refresh period")
    optim.add_argument(
        "--start-preconditioning-step", type=count, default=1, help="first step with the Shampoo direction"
    )

    run = parser.add_argument_group("evaluation, checkpoints and output")
    run.add_argument("--eval-every", type=count, help="evaluate every K steps (default steps/10)")
    run.add_argument("--eval-batches", type=count, default=8, help="fixed validation batches per evaluation")
    run.add_argument("--log-every", type=count, default=10, help="progress line period when not a terminal")
    run.add_argument(
        "--parallel",
        default="ddp",
        choices=PARALLEL,
        help="under torchrun: DistributedDataParallel (default) or FSDP2 fully_shard",
    )
    run.add_argument("--checkpoint", type=Path, help="save model, optimizer, schedule and step here")
    run.add_argument("--resume", type=Path, help="continue from this checkpoint")
    run.add_argument("--stop-after", type=count, help="stop (and checkpoint) after this many steps")
    run.add_argument("--out", type=Path, default=Path("dash-shampoo-results"), help="results directory")
    run.add_argument("--name", default=None, help="results file stem (default: train-<device>)")


def learning_rates(args: argparse.Namespace) -> dict[str, float]:
    """The optimizers to train (``--optimizer``, or ``--compare``), each with its peak learning rate."""
    names = available([args.optimizer] if args.optimizer else args.compare or list(DEFAULT_COMPARE))
    if not names:
        raise ValueError("none of the optimizers asked for can be trained here (see the messages above)")
    rates = {name: OPTIMIZERS[name].default_lr for name in names}
    if isinstance(args.lr, float):
        return dict.fromkeys(rates, args.lr)
    for name, value in (args.lr or {}).items():
        if name not in rates:
            raise ValueError(f"--lr names {name!r}, which is not trained in this run ({', '.join(rates)})")
        rates[name] = value
    return rates


def check_combinations(args: argparse.Namespace, optimizers: int) -> None:
    """Reject options that cannot go together (each option checks its own value when parsed)."""
    if (args.checkpoint or args.resume) and optimizers > 1:
        raise ValueError("--checkpoint and --resume need a single optimizer (--optimizer NAME)")
    if (args.checkpoint or args.resume) and (args.lr_sweep or args.seeds > 1):
        raise ValueError("--checkpoint and --resume train one run: not with --lr-sweep or --seeds")
    if args.stop_after is not None and args.checkpoint is None:
        raise ValueError("--stop-after needs --checkpoint (where to save the stopped run)")
    if warmup_steps(args) > args.steps:
        raise ValueError(f"--warmup {args.warmup:g} is longer than --steps {args.steps}")


def plain(value: Any) -> Any:
    """An option value as saved in checkpoints and result files (paths as strings)."""
    return str(value) if isinstance(value, Path) else value


def resume_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options a checkpoint records and a resumed run must repeat (:data:`RESUME_KEYS`)."""
    return {key: plain(getattr(args, key)) for key in RESUME_KEYS}


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule
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


# ----------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------


def dash_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :class:`DASH` from the options (recorded in the results too)."""
    options: dict[str, Any] = {
        "block_size": args.block_size,
        "root_method": args.root_method,
        "precision": args.precision,
        "stacking": args.stacking,
        "precondition_frequency": args.precondition_frequency,
        "start_preconditioning_step": args.start_preconditioning_step,
    }
    for key in ("scaling", "root_eps", "root_eps_relative"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def build_adamw(model: torch.nn.Module, lr: float, args: argparse.Namespace) -> Optimizer:
    """``torch.optim.AdamW`` with the paper's betas."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=args.weight_decay)


def build_dash(model: torch.nn.Module, lr: float, args: argparse.Namespace) -> Optimizer:
    """:class:`DASH` with the paper's betas and the DASH options (:func:`dash_options`)."""
    options = dash_options(args)
    return DASH(model.parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=args.weight_decay, **options)


def build_muon(model: torch.nn.Module, lr: float, args: argparse.Namespace) -> Optimizer:
    """``torch.optim.Muon`` on the blocks' 2-D weights, AdamW (at AdamW's default lr, on the same
    schedule) on the embedding, head and norms (:class:`~dash_shampoo.peers.MuonWithAdamW`)."""
    hidden = [p for name, p in model.named_parameters() if name.startswith("blocks.") and p.ndim == 2]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    return MuonWithAdamW(
        hidden, rest, lr=lr, adamw_lr=OPTIMIZERS["adamw"].default_lr, betas=BETAS, eps=EPS,
        weight_decay=args.weight_decay,
    )  # fmt: skip


def build_soap(model: torch.nn.Module, lr: float, args: argparse.Namespace) -> Optimizer:
    """pytorch_optimizer's ``SOAP`` (the ``bench`` extra) with the paper's betas, DASH's refresh
    period and largest preconditioned dimension the DASH block size."""
    from pytorch_optimizer import SOAP

    return SOAP(
        model.parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=args.weight_decay,
        precondition_frequency=args.precondition_frequency, max_precondition_dim=args.block_size,
    )  # fmt: skip


@dataclass(frozen=True)
class OptimizerChoice:
    """An optimizer ``--optimizer`` and ``--compare`` can name.

    Attributes:
        build: ``build(model, lr, args)`` makes the optimizer of ``model``'s parameters.
        default_lr: peak learning rate without ``--lr`` (the sweep of the module docstring).
        requires: the module it needs beyond torch (None: none), checked before training.
    """

    build: Callable[[torch.nn.Module, float, argparse.Namespace], Optimizer]
    default_lr: float
    requires: str | None = None


#: The optimizers the trainer can train, by name; adding one is a builder and an entry here.
OPTIMIZERS: dict[str, OptimizerChoice] = {
    "adamw": OptimizerChoice(build_adamw, default_lr=3e-3),
    "muon": OptimizerChoice(build_muon, default_lr=0.02),
    "soap": OptimizerChoice(build_soap, default_lr=1e-2, requires="pytorch_optimizer"),
    "dash": OptimizerChoice(build_dash, default_lr=3e-3),
}


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
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a fresh model (seeded by ``--seed``) with optimizer ``name``, or continue the checkpoint
    ``resume``; returns the run's measurements."""
    device = runtime.device
    model = Llama(config, torch.Generator().manual_seed(args.seed)).to(device)
    trained = parallelize(model, runtime, args.parallel)
    optimizer = OPTIMIZERS[name].build(model, lr, args)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps(args), args.steps))
    validation = data_module.val_batches(data, args.eval_batches, args.batch_size, config.seq_len)
    eval_every = args.eval_every or max(1, args.steps // 10)
    end = min(args.steps, args.stop_after or args.steps)
    tokens_per_step = args.batch_size * config.seq_len * runtime.world_size
    progress = Progress(runtime.main, args.log_every, tokens_per_step)
    memory_reset = reset_peak_memory(device)

    step, train_time = 0, 0.0
    evals: list[dict[str, float]] = []
    train_losses: list[float] = []
    opt_times: list[float] = []
    if resume is not None:
        load_full_state(model, optimizer, resume["model"], resume["optimizer"])
        schedule.load_state_dict(resume["scheduler"])
        step, train_time = resume["step"], resume["train_time"]
        evals, train_losses, opt_times = resume["evals"], resume["train_losses"], resume["opt_times"]
        progress.line(f"{name}: resumed from {args.resume} at step {step}")

    def record_eval() -> None:
        loss = evaluate(model, validation, device)
        evals.append({"step": step, "val_loss": loss, "train_time_s": train_time})
        progress.line(f"{name} step {step:5d}: val loss {loss:.4f}  ppl {math.exp(loss):8.3f}")

    def checkpoint() -> None:
        model_state, optimizer_state = full_state(model, optimizer)  # every rank (FSDP2 gathers)
        if not runtime.main:  # rank 0 alone saves, as nanoGPT does
            return
        payload = {
            "optimizer_name": name,
            "options": resume_options(args),
            "step": step,
            "train_time": train_time,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": schedule.state_dict(),
            "evals": evals,
            "train_losses": train_losses,
            "opt_times": opt_times,
        }
        save_checkpoint(args.checkpoint, payload)

    if step == 0:
        record_eval()
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
        lr_now = schedule.get_last_lr()[0]
        text = f"{name} step {step:5d}/{args.steps}  loss {loss_value:.4f}  lr {lr_now:.2e}"
        progress.step(step, args.steps, elapsed, opt_seconds, text)
        if not math.isfinite(loss_value):
            progress.line(f"{name}: training loss is {loss_value} at step {step}; stopping this run")
            diverged = True
            break
        if step % eval_every == 0 or step == args.steps:
            record_eval()
        if args.checkpoint is not None and (step % eval_every == 0 or step == end):
            checkpoint()

    memory, memory_kind = peak_memory(device, memory_reset)
    final = evals[-1]["val_loss"] if evals else float("nan")
    return {
        "optimizer": name,
        "lr": lr,
        "options": dash_options(args) if isinstance(optimizer, DASH) else {},
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
        # Per rank: the whole state under DDP (as DDP keeps AdamW's), a shard's under FSDP2.
        "optimizer_state_mib": state_bytes(optimizer.state) / 2**20,
        "root_failures": getattr(optimizer, "root_failures", 0),
        "skipped_steps": getattr(optimizer, "skipped_steps", 0),
        "evals": evals,
        "train_losses": train_losses,
    }


def train_runs(
    name: str, lr: float, args: argparse.Namespace, train: Callable[[str, float, argparse.Namespace], dict]
) -> list[dict[str, Any]]:
    """Every run of optimizer ``name``: at ``lr`` (or, with ``--lr-sweep``, at each lr of the sweep,
    each run marked ``best`` or not), then at the best lr with the other seeds of ``--seeds``."""
    runs: dict[float, dict[str, Any]] = {}

    def at(rate: float) -> None:
        runs[rate] = {**train(name, rate, args), "seed": args.seed}

    for rate in (lr / SWEEP_FACTOR, lr, lr * SWEEP_FACTOR) if args.lr_sweep else (lr,):
        at(rate)
    for _ in range(SWEEP_EXTENSIONS if args.lr_sweep else 0):
        rates = sorted(runs)
        best = min(rates, key=lambda rate: _score(runs[rate]))
        if best not in (rates[0], rates[-1]):
            break
        at(best / SWEEP_FACTOR if best == rates[0] else best * SWEEP_FACTOR)
    best = min(runs, key=lambda rate: _score(runs[rate]))
    for run in runs.values():
        run["best"] = run["lr"] == best
    seeds = [
        {**train(name, best, argparse.Namespace(**{**vars(args), "seed": seed})), "seed": seed, "best": True}
        for seed in range(args.seed + 1, args.seed + args.seeds)
    ]
    return [*sorted(runs.values(), key=lambda run: run["lr"]), *seeds]


def _score(run: dict[str, Any]) -> float:
    loss = run["final_val_loss"]
    return loss if not run["diverged"] and math.isfinite(loss) else math.inf


def available(names: list[str]) -> list[str]:
    """``names`` without the optimizers whose package is missing (each skipped with a message)."""
    kept = []
    for name in names:
        module = OPTIMIZERS[name].requires
        if module is not None and importlib.util.find_spec(module) is None:
            print(f"skipping {name}: it needs {module} (pip install -e '.[bench]')", file=sys.stderr)
            continue
        kept.append(name)
    return kept


# ----------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Train every optimizer asked for, print the comparison and write the result files.

    Returns:
        The exit code: 0, or 1 if a run diverged.
    """
    try:  # the usage errors of options that depend on each other, on the data or on a checkpoint
        rates = learning_rates(args)
        check_combinations(args, len(rates))
        if args.data is not None:
            data = data_module.load_bin(args.data, args.vocab_size)
        else:
            data = data_module.load_corpus(args.cache_dir, args.corpus_bytes)
        config = model_config(
            args.model,
            vocab_size=data.vocab_size,
            d_model=args.d_model,
            n_layer=args.n_layer,
            n_head=args.n_head,
            seq_len=args.seq_len,
        )
        args.seq_len = config.seq_len  # recorded (and compared on resume) as the length trained
        data_module.check_length(data.train, config.seq_len, "training")
        data_module.check_length(data.val, config.seq_len, "validation")
        resume = None
        if args.resume is not None:  # then ``rates`` names one optimizer (check_combinations)
            resume = load_checkpoint(args.resume, next(iter(rates)), resume_options(args))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"dash-shampoo train: error: {error}") from None

    if args.threads is None and args.model == "tiny" and not torch.cuda.is_available():
        args.threads = 1  # see --threads
    runtime = setup_runtime(args.threads)
    parameters = Llama(config, torch.Generator().manual_seed(args.seed)).num_parameters()
    if runtime.main:
        print(
            f"model {args.model}: {parameters:,} parameters (d={config.d_model}, layers={config.n_layer}, "
            f"heads={config.n_head}, seq={config.seq_len}, vocab={config.padded_vocab}); "
            f"device {runtime.device} x{runtime.world_size}; data: {data.source}",
            file=sys.stderr,
        )
    try:
        results = []
        for name, lr in rates.items():
            results += train_runs(
                name, lr, args, lambda n, r, a: train_one(n, r, a, config, data, runtime, resume)
            )
    finally:
        runtime.close()
    if not runtime.main:
        return 0

    meta = report.metadata(
        command=command_text(args, shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])),
        runtime_device=runtime.device,
        world_size=runtime.world_size,
        data_source=data.source,
        model=args.model,
        config=config,
        parameters=parameters,
        settings={k: plain(v) for k, v in vars(args).items() if k not in ("func", "command_line")},
    )
    text = report.markdown(results, meta)
    print(text)
    if args.stop_after is None or args.stop_after >= args.steps:
        stem = args.out / (args.name or f"train-{runtime.device.type}")
        # Strict JSON has no NaN: a diverged run's losses are written as null.
        document = report.finite({**meta, "results": results})
        for path in write_report(stem, document, text, report.plot, default=str, allow_nan=False):
            print(f"wrote {path}", file=sys.stderr)
    # A sweep's diverging edge is a finding; a diverged run at an optimizer's best lr is a failure.
    return 0 if not any(r["diverged"] for r in results if r.get("best", True)) else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m dash_shampoo.train [options]``."""
    parser = argparse.ArgumentParser(prog="python -m dash_shampoo.train")
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command_line = ["python", "-m", "dash_shampoo.train", *argv]
    return run(args)
