"""DASH: block Shampoo with every block of equal shape processed in one batched operation.

This module orchestrates a step; the pieces live elsewhere: the layout of stacks and banks
(:mod:`dash_shampoo.layout`), the update maths (:mod:`dash_shampoo.preconditioner`), the inverse
roots (:mod:`dash_shampoo.linalg`) and the sharing of work between processes
(:mod:`dash_shampoo.distributed`).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from . import distributed, layout
from ._checks import check_choice, check_number
from .blocking import local_tensor
from .layout import Layout
from .linalg import RootOptions, ridge, solve_inverse_root
from .linalg.precision import Precision
from .linalg.roots import EigenFix, Method
from .linalg.scaling import Scaling
from .options import GroupChecks, OneDim, check_group, check_keywords, check_params, loaded_groups
from .preconditioner import Grafting, accept_roots, may_overflow, peak_abs, stack_update, update_statistics
from .stacks import Bank, Due, Stack, select_rows, write_rows

Stacking = Literal["global", "layer", "none"]
STACKINGS: tuple[str, ...] = ("global", "layer", "none")
NonFinite = Literal["skip", "raise"]
NONFINITE: tuple[str, ...] = ("skip", "raise")
Communication = Literal["fp32"]
COMMUNICATION: tuple[str, ...] = ("fp32",)

# On the CPU the per-step elementwise work runs over chunks of a stack's rows of at most this many
# elements per torch thread (1 MiB of fp32), which stay in the cores' caches between the passes.
CPU_CHUNK_ELEMENTS = 1 << 18


#: Counters of what DASH refused or repaired; saved in the state dict.
COUNTERS = ("skipped_steps", "skipped_blocks", "root_failures", "factor_resets")
#: Attributes copies and pickles keep, with the values for pickles made before they existed.
_KEPT_BY_COPIES = dict(
    stacking="global", nonfinite="skip", seed=0, communication="fp32", skipped_steps=0, skipped_blocks=0
)


@dataclass(frozen=True)
class RootCall:
    """One batched inverse-root call of a step, as a root hook sees it.

    Attributes:
        factors: the ``(K, n, n)`` stack of factors being inverted.
        p: the root.
        options: the solver options of the factors' parameter group.
    """

    factors: torch.Tensor
    p: int
    options: RootOptions


#: ``hook(call, solve)``: must return ``solve()``, the roots of ``call.factors`` (it may time or
#: inspect the call, or return a modified copy).
RootHook = Callable[[RootCall, Callable[[], torch.Tensor]], torch.Tensor]


class DASH(Optimizer):
    r"""Distributed Accelerated SHampoo: block Shampoo, batched over blocks of equal shape.

    Each parameter is cut into blocks of at most ``block_size``² (see :mod:`dash_shampoo.blocking`).
    Per block, with raw gradient ``g`` and step ``t``:

    .. math::

        L &\leftarrow \beta_f L + (1-\beta_f)\, g g^\top,\qquad
        R \leftarrow \beta_f R + (1-\beta_f)\, g^\top g \\
        \tilde G &\leftarrow \beta_1 \tilde G + (1-\beta_1) g,\qquad \hat G = \tilde G / (1-\beta_1^t) \\
        U &= L^{-1/p} \hat G R^{-1/p},\qquad P = U\,\lVert D\rVert_F / \lVert U\rVert_F \\
        W &\leftarrow W (1 - \mathrm{lr}\cdot\mathrm{wd}) - \mathrm{lr}\cdot P

    with ``D`` the grafting method's direction (Adam by default), ``p = 4`` for blocks with two
    preconditioned sides and ``p = 2`` with one (vectors), and the roots refreshed every
    ``precondition_frequency`` steps by one batched solver call per factor size. Before
    ``start_preconditioning_step`` the update is ``D`` itself.

    Args:
        params: parameters or parameter groups; every option below may be set per group.
        lr: learning rate (a float or a 0-d tensor).
        betas: ``(β₁, β₂)``: EMA of the gradient (0 disables it) and of the grafting second moment.
        eps: grafting denominator ``sqrt(v̂) + eps``.
        weight_decay: decoupled weight decay ``W ← W (1 − lr·wd)``.
        block_size: largest block side ``B`` (the paper's 1024).
        factor_beta: EMA of ``L`` and ``R``; 1 gives plain sums (AdaGrad-style).
        precondition_frequency: refresh the roots when ``t == start`` or ``t % frequency == 0``.
        start_preconditioning_step: first step that uses the Shampoo direction (from 1).
        stagger: spread the refreshes of each frequency window evenly over its steps (factor
            ``k`` of the layout is refreshed when ``t % frequency == k % frequency``).
        grafting: ``"adam"``, ``"adagrad"``, ``"rmsprop"``, ``"sgd"`` or ``"none"`` (no norm matching).
        bias_correction: bias-correct the gradient EMA and Adam's second moment.
        momentum: momentum ``μ`` on the final direction: ``M ← μM + P``; Nesterov ``P + μM``.
        nesterov: use Nesterov momentum.
        root_method: ``"eigh"``, ``"newton"``, ``"ndb"`` or ``"chebyshev"``
            (:func:`dash_shampoo.linalg.inverse_root`).
        root_eps: ridge added to each factor's diagonal before the root (absolute, as the paper's
            ``eps`` and Distributed Shampoo's ``epsilon``).
        root_eps_relative: a further ridge relative to each factor's scale: ``root_eps_relative ·
            tr(F)/n`` (the mean eigenvalue), so singular factors (a few gradients so far) are
            inverted on a scale set by their own magnitude, not by rounding noise (default 1e-6:
            benchmarks/results/ridge-study-cpu.md; 0 for the paper's absolute ridge alone).
        root_steps, root_tol: iterations (and optional per-matrix tolerance) of the Newton methods.
        scaling, scaling_steps, num_vectors, safety: spectral scaling of the iterative methods.
        precision: matmul precision of the iterative solvers (``"fp32"``, ``"tf32"``, ``"bf16"``,
            ``"fp16"``).
        eigen_fix: eigenvalue treatment of ``"eigh"`` (``"shift"``, ``"pinv"``, ``"abs"``).
        chebyshev_degree, chebyshev_interval_lower: Chebyshev options.
        one_dim: ``"shampoo"`` (full-matrix preconditioning of length-``B`` chunks, the paper's
            choice) or ``"adam"`` (elementwise, the grafting method alone) for 0-D/1-D parameters.
        matrix_root: override ``p`` for every factor (``None``: 4, or 2 for one-sided blocks).
        maximize: maximize the objective.
        stacking: ``"global"`` (one stack per block shape over all parameters of a group, one
            solver call per factor size), ``"layer"`` (per parameter) or ``"none"`` (a loop over
            blocks, the sequential baseline). All three give the same update.
        nonfinite: on a non-finite gradient, ``"skip"`` the step (counted in
            :attr:`skipped_steps`) or ``"raise"`` ``FloatingPointError``.
        seed: seed of the power-iteration start vectors (the global RNG is never used).
        process_group: the processes that share the root refreshes (default: the default group
            when ``torch.distributed`` is initialised). All must hold the same gradients (DDP) and
            keep the whole state; each refreshes the roots of its share of the blocks and the new
            roots are all-gathered (:mod:`dash_shampoo.distributed`), so :meth:`state_dict` on any
            one rank is complete. ``False``: no sharing (each process refreshes every root). With
            FSDP2's DTensor parameters each process preconditions the rows it holds instead.
        communication: dtype of the exchanged roots: ``"fp32"`` (bf16 roots moved the parameters by
            65% of their change from the fp32 result, so it is not offered).

    A root refresh that fails, is not finite or has an entry above ``100·r^(-1/p)``, with ``r`` the
    factor's ridge (an exact root is below ``r^(-1/p)``; a diverged low-precision iteration can be
    far above; eigh's roots are PSD, so their diagonal is read) keeps the previous root of that
    factor (the identity before the first success) and is counted in :attr:`root_failures`. An
    all-zero factor keeps its previous root uncounted.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        block_size: int = 1024,
        factor_beta: float = 0.95,
        precondition_frequency: int = 10,
        start_preconditioning_step: int = 1,
        stagger: bool = False,
        grafting: Grafting = "adam",
        bias_correction: bool = True,
        momentum: float = 0.0,
        nesterov: bool = False,
        root_method: Method = "ndb",
        root_eps: float = 1e-10,
        root_eps_relative: float = 1e-6,
        root_steps: int = 10,
        root_tol: float | None = None,
        scaling: Scaling = "power_multi",
        scaling_steps: int = 10,
        num_vectors: int = 16,
        safety: float = 2.0,
        precision: Precision = "fp32",
        eigen_fix: EigenFix = "shift",
        chebyshev_degree: int = 40,
        chebyshev_interval_lower: float = 1e-3,
        one_dim: OneDim = "shampoo",
        matrix_root: int | None = None,
        maximize: bool = False,
        stacking: Stacking = "global",
        nonfinite: NonFinite = "skip",
        seed: int = 0,
        process_group: Any = None,
        communication: Communication = "fp32",
        **unknown: Any,  # refused with a hint (a peer's name for a DASH option, or a typo)
    ) -> None:
        check_keywords(unknown, list(inspect.signature(DASH.__init__).parameters)[2:-1])
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            block_size=block_size,
            factor_beta=factor_beta,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            stagger=stagger,
            grafting=grafting,
            bias_correction=bias_correction,
            momentum=momentum,
            nesterov=nesterov,
            root_method=root_method,
            root_eps=root_eps,
            root_eps_relative=root_eps_relative,
            root_steps=root_steps,
            root_tol=root_tol,
            scaling=scaling,
            scaling_steps=scaling_steps,
            num_vectors=num_vectors,
            safety=safety,
            precision=precision,
            eigen_fix=eigen_fix,
            chebyshev_degree=chebyshev_degree,
            chebyshev_interval_lower=chebyshev_interval_lower,
            one_dim=one_dim,
            matrix_root=matrix_root,
            maximize=maximize,
        )
        check_group(defaults)
        self.stacking = check_choice("stacking", stacking, STACKINGS)
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE)
        self.seed = check_number("seed", seed, low=0, integer=True)
        if communication == "bf16":
            raise ValueError(
                "communication 'bf16' is not offered: the ranks exchange inverse roots, which bf16 "
                "rounds too coarsely (see benchmarks/results/dist-cpu.md); use 'fp32'"
            )
        self.communication = check_choice("communication", communication, COMMUNICATION)
        self._process_group = distributed.resolve_group(process_group)
        super().__init__(params, defaults)
        self._layout: Layout | None = None
        self._failures: dict[torch.device, torch.Tensor] = {}
        self._root_hooks: OrderedDict[int, RootHook] = OrderedDict()
        self._checks = GroupChecks()
        self.skipped_steps = 0
        self.skipped_blocks = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see :class:`torch.optim.Optimizer`); its options are validated first."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_group(group)
            check_params(group["params"])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._layout = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({key: getattr(self, key) for key in _KEPT_BY_COPIES}, _failures=self._failures)
        # A ProcessGroup cannot be pickled or copied: record which kind of group this was.
        state["_group_kind"] = distributed.group_kind(self._process_group)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in _KEPT_BY_COPIES.items():
            self.__dict__.setdefault(key, value)
        kind = self.__dict__.pop("_group_kind", "default")
        if kind == "custom":
            warnings.warn(
                "DASH was copied or unpickled from an optimizer with a custom process_group, which "
                "cannot be copied; the copy distributes over the default group if one is initialised",
                stacklevel=2,
            )
        self._process_group = distributed.resolve_group(False if kind == "none" else None)
        self.__dict__.setdefault("_layout", None)
        self.__dict__.setdefault("_failures", {})
        self.__dict__.setdefault("_root_hooks", OrderedDict())
        self.__dict__.setdefault("_checks", GroupChecks())
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def register_root_hook(self, hook: RootHook) -> RemovableHandle:
        """Call ``hook(call, solve)`` around every batched inverse-root call (see :data:`RootHook`).

        Hooks registered later wrap those registered earlier. Returns a handle whose ``remove()``
        unregisters the hook.
        """
        handle = RemovableHandle(self._root_hooks)
        self._root_hooks[handle.id] = hook
        return handle

    @property
    def root_failures(self) -> int:
        """Number of factor roots whose refresh failed or was not finite (the old root was kept)."""
        return int(sum(int(counts[0]) for counts in self._failures.values()))

    @property
    def factor_resets(self) -> int:
        """Number of factors found not finite at a refresh (a sum of huge gradients) and reset to zero."""
        return int(sum(int(counts[1]) for counts in self._failures.values()))

    def distribution_stats(self) -> dict[str, Any]:
        """How the work is shared (:func:`dash_shampoo.distributed.sharing_stats`; after a step)."""
        return distributed.sharing_stats(self._process_group, self._layout)

    # --- state_dict and step --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, per parameter and independent of stacking mode and world size; every
        rank holds all of it, so one rank may call this alone (no collective)."""
        local = super().state_dict()
        # The counters travel in every group (param_groups survive torch.distributed.checkpoint).
        counters = {key: getattr(self, key) for key in COUNTERS}
        for group in local["param_groups"]:
            group.update(counters)
        layout.export_sharded_states(local["state"], self.param_groups)
        return local

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (any stacking mode or world size), each
        parameter's state checked against its parameter first. Hooks behave as in
        :class:`torch.optim.Optimizer` (a pre-hook may return a replacement dict, post-hooks see the
        loaded state); unlike it, the state stays float32 and the process group is kept."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        saved_state, saved_groups = state_dict["state"], state_dict["param_groups"]
        groups, counts = loaded_groups(saved_groups, self.param_groups, self.defaults, COUNTERS)
        saved_state = layout.checked_saved_state(saved_state, saved_groups, self.param_groups, self.defaults)
        self.param_groups = groups
        self.skipped_steps, self.skipped_blocks = counts[:2]
        self._failures = {torch.device("cpu"): torch.tensor(counts[2:])}
        self.state = defaultdict(dict)
        self._restore_state(saved_state, [i for group in saved_groups for i in group["params"]])
        self._layout = None
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _restore_state(self, saved: dict[int, dict[str, Any]], ids: list[int] | None = None) -> None:
        """Set each parameter's state from ``saved`` (by the index ``ids`` give it; its own position
        by default), moved to its device with floating state in float32."""
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in zip(ids if ids is not None else range(len(params)), params):
            if index in saved:
                self.state[p] = {key: _restore(key, value, p.device) for key, value in saved[index].items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (``None`` without closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active: layout.Active = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("DASH does not support sparse gradients")
                active[id(p)] = p
        if not active:
            return loss
        self._checks.check(self.param_groups)
        initializing = not self.state and _initializing_step(self.param_groups, active)
        plan = self._layout
        if plan is None or not plan.covers(active) or plan.signature != layout.signature(self.param_groups):
            plan = self._layout = self._build_layout(active)
        if initializing:  # the state exists now, at step 0; nothing else happens
            return loss

        for stack in plan.stacks:
            stack.gather_gradients(self.param_groups[stack.group_index]["maximize"])
        candidates = self._check_gradients(plan)
        if candidates is None:
            return loss

        inactive = [p for p in plan.params if id(p) not in active]
        saved = plan.save_rows(inactive) if inactive else []
        before = [stack.save_rows(rows) for stack, rows in candidates]
        for p in active.values():
            self.state[p]["step"] += 1
        update_statistics(plan.stacks, self.param_groups)
        # A block whose g gᵀ, gᵀ g or g² overflowed is skipped: its state is put back (now, and again
        # after the step) and its update is zero (counted in skipped_blocks).
        overflowing = []
        for (stack, rows), copies in zip(candidates, before):
            broken = ~stack.statistics_finite(rows)
            if bool(broken.any()):
                kept = [(tensor, where[broken], copy[broken]) for tensor, where, copy in copies]
                plan.restore_rows(kept)
                saved += kept
                overflowing.append((stack, rows[broken]))
                self.skipped_blocks += int(broken.sum())
        refreshed = [(bank, *self._refresh(bank, plan.root_options[bank.group_index])) for bank in plan.banks]
        due = [(bank, rows) for bank, rows, _ in refreshed if rows is not None]
        if due:  # the same in every process
            failed = [f for _, _, f in refreshed if f is not None]
            self._count_failures(failed, plan, due[0][0].factors.device)
            if plan.exchange is not None:
                plan.exchange.run(self._process_group, due)
        self._apply_weight_decay(active)
        shards = {key: local_tensor(p) for key, p in active.items()}  # a DTensor's rows here
        targets = {key: t if t.is_contiguous() else t.contiguous() for key, t in shards.items()}
        updates = [
            stack_update(
                stack, self.param_groups[stack.group_index], self._steps(stack.runs), CPU_CHUNK_ELEMENTS
            )
            for stack in plan.stacks
        ]
        for stack, rows in overflowing:  # zero updates (a NaN direction times a zero scale is NaN)
            for part in updates[plan.stacks.index(stack)]:
                if isinstance(part, torch.Tensor) and part.dim() == 3:
                    part.index_fill_(0, rows, 0.0)
        plan.apply(updates, targets, active)
        for key in [key for key, target in targets.items() if target is not shards[key]]:
            shards[key].copy_(targets[key])
        plan.restore_rows(saved)
        return loss

    def _build_layout(self, active: layout.Active) -> Layout:
        """A new layout for the parameters used now (the shares are re-planned from the full state)."""
        regions = layout.collect_regions(self.param_groups, self.state, active)
        distributed.check_same_everywhere(self._process_group, regions.fingerprint)
        # DTensor (FSDP2) parameters: each process preconditions its own rows, so nothing is shared.
        world = (0, 1) if regions.shards else distributed.world(self._process_group)
        return layout.build(self.param_groups, self.state, regions, self.stacking, *world)

    def _check_gradients(self, plan: Layout) -> list[tuple[Stack, torch.Tensor]] | None:
        """None when a gradient is not finite on any process (the step is skipped, or raises);
        else the blocks whose squares may overflow fp32: ``(stack, rows)`` pairs (usually none).

        One reduction per stack, brought to the host in one transfer per device (the step's one
        host sync): the norm ``||g||`` of every stack in one ``_foreach_norm`` (an upper bound of
        ``max|g|``, through which NaN and inf propagate; only where it is not finite or could
        overflow ``g gᵀ`` is ``max|g|`` itself read). Only a stack whose peak could overflow
        ``g gᵀ`` is looked at block by block.
        """
        by_device: dict[torch.device, list[Stack]] = {}
        for stack in plan.stacks:
            by_device.setdefault(stack.grad.device, []).append(stack)
        peaks: dict[int, float] = {}
        for stacks in by_device.values():
            values = torch.stack(torch._foreach_norm([stack.grad for stack in stacks])).tolist()
            for stack, value in zip(stacks, values):
                exact = math.isfinite(value) and not may_overflow(value, stack.shape)
                peaks[id(stack)] = value if exact else float(peak_abs(stack.grad))
        bad = [s for s in plan.stacks if not math.isfinite(peaks[id(s)])]
        if not distributed.all_finite(self._process_group, not bad):
            if self.nonfinite == "raise":
                names = sorted(
                    {f"group {s.group_index}, shape {tuple(r.param.shape)}" for s in bad for r in s.runs}
                )
                where = "; ".join(names) if names else "another process's gradients"
                raise FloatingPointError(f"DASH got a non-finite gradient in: {where}")
            self.skipped_steps += 1
            return None
        candidates = []
        for stack in plan.stacks:
            if may_overflow(peaks[id(stack)], stack.shape):
                block_peaks = peak_abs(stack.grad, dims=(1, 2)).double()
                rows = torch.nonzero(may_overflow(block_peaks, stack.shape)).flatten()
                candidates.append((stack, rows))
        return candidates

    def _steps(self, runs: Iterable[Any]) -> list[int]:
        return [int(self.state[run.param]["step"]) for run in runs]

    def _refresh(self, bank: Bank, options: RootOptions) -> tuple[Due | None, torch.Tensor | None]:
        """Refresh the roots of the bank's due rows this process computes, keeping the old root of each
        one refused. Returns the due rows and the mask of those refused."""
        group = self.param_groups[bank.group_index]
        steps = self._steps(entry.run for entry in bank.entries)
        start, frequency = group["start_preconditioning_step"], group["precondition_frequency"]
        due = bank.due_rows(steps, start, frequency, group["stagger"])
        if due is None:
            return None, None
        if group["factor_beta"] >= 1:  # sums can overflow; averages of finite g gᵀ cannot
            self._failure_counts(bank.factors.device)[1] += bank.reset_broken(due.rows)
        rows = due.mine
        if rows is None:
            return due, None
        factors, old = select_rows(bank.factors, rows), select_rows(bank.roots, rows)
        start = None
        if options.method != "eigh" and options.scaling in ("power", "power_multi"):
            # Power iteration starts from vectors that depend on the factor and the seed alone, so
            # every stacking mode and number of processes gives the same scale.
            count = 1 if options.scaling == "power" else options.num_vectors
            start = bank.start_vectors(rows, count, self.seed, factors.dtype)
        call = RootCall(factors, bank.root, options)
        mean_eigenvalue = factors.diagonal(dim1=-2, dim2=-1).mean(dim=-1)
        added = ridge(factors, options.eps, options.relative_eps, mean_eigenvalue)
        # Every due factor is finite: an average of finite g gᵀ, or a sum that reset_broken checked.
        solve = functools.partial(
            solve_inverse_root, factors, bank.root, options, start=start, finite=True, ridge_of=added
        )
        for hook in self._root_hooks.values():
            solve = functools.partial(hook, call, solve)
        psd = options.method == "eigh"
        refused = accept_roots(solve(), old, mean_eigenvalue, added, bank.root, psd)
        write_rows(bank.roots, rows, old)
        return due, refused

    def _failure_counts(self, device: torch.device) -> torch.Tensor:
        """This device's ``[root_failures, factor_resets]`` counts (int64, on the device)."""
        return self._failures.setdefault(device, torch.zeros(2, dtype=torch.int64, device=device))

    def _count_failures(self, failed: list[torch.Tensor], plan: Layout, device: torch.device) -> None:
        """Add the roots this step refused (per bank refreshed here) to :attr:`root_failures`; with
        several processes all of theirs (one small all-reduce), so the counters agree everywhere."""
        if failed:
            total = torch.cat([mask.to(device) for mask in failed]).sum()
        else:
            total = torch.zeros((), dtype=torch.int64, device=device)
        if plan.exchange is not None:
            total = distributed.all_reduce_sum(self._process_group, total)
        self._failure_counts(device)[0] += total

    def _apply_weight_decay(self, active: layout.Active) -> None:
        for group in self.param_groups:
            wd = group["weight_decay"]
            params = [local_tensor(p) for p in group["params"] if id(p) in active]
            if wd and params:
                torch._foreach_mul_(params, 1 - group["lr"] * wd)


def _initializing_step(groups: list[dict[str, Any]], active: layout.Active) -> bool:
    """Whether a first step is ``torch.distributed.checkpoint``'s state initialisation (every lr 0,
    every gradient zero: ``get_optimizer_state_dict`` on a fresh optimizer). Such a step creates the
    state but is not counted, so it does not consume the first refresh (one host read, once)."""
    for lr in (group["lr"] for group in groups):
        if not (lr.device.type == "cpu" and bool(lr == 0) if isinstance(lr, torch.Tensor) else lr == 0):
            return False
    peaks = [peak_abs(g).float().cpu() for g in (local_tensor(p.grad) for p in active.values()) if g.numel()]
    return not peaks or float(torch.stack(peaks).max()) == 0.0


def _restore(key: str, value: Any, device: torch.device) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if key in layout.PER_PARAMETER:
        return value.detach().to(device="cpu", dtype=torch.int64).clone()
    return value.detach().to(device=device, dtype=torch.float32).clone()
