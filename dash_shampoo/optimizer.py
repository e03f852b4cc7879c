"""DASH: block Shampoo with every block of equal shape processed in one batched operation."""

from __future__ import annotations

import functools
import math
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from . import distributed
from ._checks import check_choice, check_number
from .blocking import BlockPlan
from .linalg import RootOptions, solve_inverse_root
from .linalg.precision import PRECISIONS
from .linalg.roots import EIGEN_FIXES, METHODS, matrices_per_chunk, root_matmuls
from .linalg.scaling import SCALINGS
from .preconditioner import (
    GRAFTINGS,
    accumulate_factor,
    accumulate_second_moment,
    graft,
    grafting_direction,
    precondition,
)
from .stacks import Bank, Member, Stack, bind

Stacking = Literal["global", "layer", "none"]
STACKINGS: tuple[str, ...] = ("global", "layer", "none")
NONFINITE: tuple[str, ...] = ("skip", "raise")
COMMUNICATION: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
ONE_DIM: tuple[str, ...] = ("shampoo", "adam")

# Group options that decide how blocks are cut, stacked and inverted: changing one re-plans.
_LAYOUT_KEYS = (
    "block_size",
    "one_dim",
    "matrix_root",
    "precondition_frequency",
    "start_preconditioning_step",
    "stagger",
    "root_method",
    "root_eps",
    "root_steps",
    "root_tol",
    "scaling",
    "scaling_steps",
    "num_vectors",
    "safety",
    "precision",
    "eigen_fix",
    "chebyshev_degree",
    "chebyshev_interval_lower",
    "grafting",
    "momentum",
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
            ``k`` of the plan is refreshed when ``t % frequency == k % frequency``).
        grafting: ``"adam"``, ``"adagrad"``, ``"rmsprop"``, ``"sgd"`` or ``"none"`` (no norm matching).
        bias_correction: bias-correct the gradient EMA and Adam's second moment.
        momentum: momentum ``μ`` on the final direction: ``M ← μM + P``; Nesterov ``P + μM``.
        nesterov: use Nesterov momentum.
        root_method: ``"eigh"``, ``"newton"``, ``"ndb"`` or ``"chebyshev"``
            (:func:`dash_shampoo.linalg.inverse_root`).
        root_eps: ridge added to each factor's diagonal before the root.
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
        process_group: ranks that share the preconditioner work (default: the default group when
            ``torch.distributed`` is initialised). Each rank refreshes and applies its share of the
            blocks and the updates are all-gathered (:mod:`dash_shampoo.distributed`); every rank
            must hold the same gradients (DDP). Call :meth:`state_dict` on every rank: it gathers.
            ``False``: no distribution (every rank computes every block, as in one process).
        communication: dtype of the exchanged updates, ``"fp32"`` or ``"bf16"``.

    A root refresh that fails, is not finite or has an entry above ``100·root_eps^(-1/p)`` (an exact
    root is below ``root_eps^(-1/p)``; a diverged low-precision iteration can be far above) keeps
    the previous root of that factor (the identity before the first success) and is counted in
    :attr:`root_failures`.
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
        grafting: str = "adam",
        bias_correction: bool = True,
        momentum: float = 0.0,
        nesterov: bool = False,
        root_method: str = "ndb",
        root_eps: float = 1e-10,
        root_steps: int = 10,
        root_tol: float | None = None,
        scaling: str = "power_multi",
        scaling_steps: int = 10,
        num_vectors: int = 16,
        safety: float = 2.0,
        precision: str = "fp32",
        eigen_fix: str = "shift",
        chebyshev_degree: int = 40,
        chebyshev_interval_lower: float = 1e-3,
        one_dim: str = "shampoo",
        matrix_root: int | None = None,
        maximize: bool = False,
        stacking: str = "global",
        nonfinite: str = "skip",
        seed: int = 0,
        process_group: Any = None,
        communication: str = "fp32",
    ) -> None:
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
        _check_group(defaults)
        self.stacking = check_choice("stacking", stacking, STACKINGS)
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE)
        self.seed = check_number("seed", seed, low=0, integer=True)
        self.communication = check_choice("communication", communication, tuple(COMMUNICATION))
        self._group = distributed.resolve_group(process_group)
        super().__init__(params, defaults)
        self._plan: _Plan | None = None
        self._failures: dict[torch.device, torch.Tensor] = {}
        self._root_hooks: OrderedDict[int, RootHook] = OrderedDict()
        self.skipped_steps = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see :class:`torch.optim.Optimizer`); its options are validated first."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group)
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(
                        f"DASH does not support complex parameters; got a parameter of dtype {p.dtype}"
                    )
                if not p.is_floating_point():
                    raise TypeError(f"DASH needs floating-point parameters; got dtype {p.dtype}")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._plan = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in ("stacking", "nonfinite", "seed", "communication", "skipped_steps"):
            state[key] = getattr(self, key)
        # A ProcessGroup cannot be pickled or copied: record which kind of group this was.
        state.pop("_group", None)
        state.pop("_root_hooks", None)
        state["_group_kind"] = _group_kind(self._group)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("stacking", "global")
        self.__dict__.setdefault("nonfinite", "skip")
        self.__dict__.setdefault("seed", 0)
        self.__dict__.setdefault("communication", "fp32")
        kind = self.__dict__.pop("_group_kind", "default")
        if kind == "custom":
            warnings.warn(
                "DASH was copied or unpickled from an optimizer with a custom process_group, which "
                "cannot be copied; the copy distributes over the default group if one is initialised",
                stacklevel=2,
            )
        self._group = distributed.resolve_group(False if kind == "none" else None)
        self.__dict__.setdefault("_plan", None)
        self.__dict__.setdefault("_failures", {})
        self.__dict__.setdefault("_root_hooks", OrderedDict())
        self.__dict__.setdefault("skipped_steps", 0)
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
        return int(sum(int(count) for count in self._failures.values()))

    def distribution_stats(self) -> dict[str, Any]:
        """How the work is shared (after the first step): world size, this rank, the cost imbalance
        ``max/mean`` over ranks, the blocks this rank owns and the bytes it receives per step."""
        rank, world_size = distributed.world(self._group)
        plan = self._plan
        return {
            "world_size": world_size,
            "rank": rank,
            "imbalance": plan.ownership.imbalance() if plan else None,
            "owned_blocks": sum(stack.rows for stack in plan.stacks) if plan else None,
            "bytes_per_step": plan.exchange.bytes_per_step if plan and plan.exchange else 0,
        }

    # ------------------------------------------------------------------------------------------
    # state_dict
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, per parameter and independent of stacking mode and world size.

        With several ranks every rank must call it (it gathers each rank's blocks); every rank
        gets the full state, which loads at any world size.
        """
        local = super().state_dict()
        if distributed.world(self._group)[1] > 1:
            local["state"] = self._gathered_state(local["state"])
        return local

    def _gathered_state(self, local: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Every rank's blocks of ``local`` (per-parameter state by index), joined in block order."""
        merged: dict[int, dict[str, Any]] = {}
        for rank_state in distributed.gather_state(self._group, local):
            for index, entry in rank_state.items():
                target = merged.setdefault(index, {})
                for key, value in entry.items():
                    if key == "step" or key not in target:
                        target[key] = value
                    else:
                        target[key] = torch.cat([target[key], value])
        return dict(sorted(merged.items()))

    def _regather_state(self) -> None:
        """Before re-planning across ranks, give every rank the full state of every parameter."""
        params = [p for group in self.param_groups for p in group["params"]]
        local = {i: self.state[p] for i, p in enumerate(params) if p in self.state}
        for index, entry in self._gathered_state(local).items():
            p = params[index]
            self.state[p] = {key: _restore(key, value, p.device) for key, value in entry.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, whatever the stacking mode that saved it.

        Unlike the base class, floating state stays float32 (it is not cast to a bf16
        parameter's dtype); it is moved to each parameter's device.
        """
        saved_state = state_dict["state"]
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in zip(saved_ids, params):
            if index not in saved_state:
                continue
            self.state[p] = {key: _restore(key, value, p.device) for key, value in saved_state[index].items()}
        self._plan = None

    # ------------------------------------------------------------------------------------------
    # step
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (``None`` without closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = set()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("DASH does not support sparse gradients")
                active.add(p)
        if not active:
            return loss
        plan = self._plan
        if plan is None or not plan.covers(active) or plan.signature != _signature(self.param_groups):
            if plan is not None and plan.exchange is not None:
                self._regather_state()
            plan = self._plan = _Plan.build(self, active)

        for stack in plan.stacks:
            _gather_gradients(stack, self.param_groups[stack.group]["maximize"])
        if not self._gradients_finite(plan):
            return loss

        inactive = [p for p in plan.params if p not in active]
        saved = plan.save_rows(inactive) if inactive else None
        for p in active:
            self.state[p]["step"] += 1
        for stack in plan.stacks:
            self._update_statistics(stack)
        for bank in plan.banks:
            self._refresh(bank)
        self._apply_weight_decay(active)
        targets = {p: (p if p.is_contiguous() else p.contiguous()) for p in active}
        updates = [self._direction(stack) for stack in plan.stacks]
        if plan.exchange is None:
            for stack, update in zip(plan.stacks, updates):
                row = 0
                for member in stack.members:
                    if member.param in active:
                        member.subtract_from(targets[member.param], update[row : row + member.count])
                    row += member.count
        else:
            plan.exchange.run(self._group, plan.stacks, updates, targets, active)
        for p, target in targets.items():
            if target is not p:
                p.copy_(target)
        if saved is not None:
            plan.restore_rows(saved)
        return loss

    def _gradients_finite(self, plan: _Plan) -> bool:
        # A sum is finite only if every term is (inf, -inf and NaN all propagate), so one reduction
        # per stack decides the usual case; only a non-finite sum (possibly an overflow of finite
        # values) is checked element by element.
        per_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for stack in plan.stacks:
            per_device[stack.grad.device].append(stack.grad.sum())
        flags = [torch.isfinite(torch.stack(f)).all().cpu() for f in per_device.values()]
        local = bool(torch.stack(flags).all()) if flags else True
        bad = [] if local else [s for s in plan.stacks if not bool(torch.isfinite(s.grad).all())]
        if distributed.all_finite(self._group, torch.tensor(not bad)):
            return True
        if self.nonfinite == "raise":
            names = sorted({f"group {s.group}, shape {tuple(m.param.shape)}" for s in bad for m in s.members})
            where = "; ".join(names) if names else "another rank's gradients"
            raise FloatingPointError(f"DASH got a non-finite gradient in: {where}")
        self.skipped_steps += 1
        return False

    def _row_values(self, stack: Stack, fn: Callable[[int], Any]) -> Any:
        """``fn(t)`` for the stack's rows: a scalar when all members share ``t``, else (S, 1, 1)."""
        steps = [int(self.state[m.param]["step"]) for m in stack.members]
        if all(s == steps[0] for s in steps):
            return fn(steps[0])
        values = [fn(s) for m, s in zip(stack.members, steps) for _ in range(m.count)]
        return torch.tensor(values, device=stack.grad.device).view(-1, 1, 1)

    def _update_statistics(self, stack: Stack) -> None:
        group = self.param_groups[stack.group]
        g = stack.grad
        for side, location in (("left", stack.left), ("right", stack.right)):
            if location is not None:
                bank, first = location
                accumulate_factor(bank.factors[first : first + stack.rows], g, side, group["factor_beta"])
        if "moment" in stack.tensors:
            accumulate_second_moment(stack.tensors["moment"], g, group["grafting"], group["betas"][1])
        beta1 = group["betas"][0]
        if beta1 > 0:
            stack.tensors["grad_ema"].lerp_(g, 1 - beta1)

    def _refresh(self, bank: Bank) -> None:
        group = self.param_groups[bank.group]
        rows = self._due_rows(bank, group)
        if rows is None:
            return
        device = bank.factors.device
        step = max(int(self.state[m.param]["step"]) for m, _ in bank.members)
        generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + step)
        factors = bank.factors if rows == "all" else bank.factors.index_select(0, rows)
        old = bank.roots if rows == "all" else bank.roots.index_select(0, rows)
        call = RootCall(factors, bank.root, _root_options(group))
        solve = functools.partial(solve_inverse_root, factors, bank.root, call.options, generator=generator)
        for hook in self._root_hooks.values():
            solve = functools.partial(hook, call, solve)
        new = solve()
        # Exact roots obey |X_ij| <= ||X||_2 <= eps^(-1/p) (every eigenvalue of the ridged factor
        # is at least eps); a diverged iteration can be finite and 1e16 times beyond that. The slack
        # allows for fp32 iterations on singular factors, which overshoot by a few times (2.1x
        # measured on the first refresh of the tiny trainer model).
        eps = group["root_eps"]
        bound = ROOT_BOUND_SLACK * eps ** (-1.0 / bank.root) if eps > 0 else math.inf
        peak = new.abs().flatten(1).amax(dim=1)
        ok = torch.isfinite(peak) & (peak <= bound)
        new = torch.where(ok[:, None, None], new, old)
        if rows == "all":
            bank.roots.copy_(new)
        else:
            bank.roots.index_copy_(0, rows, new)
        failures = self._failures.setdefault(device, torch.zeros((), dtype=torch.int64, device=device))
        failures += (~ok).sum()

    def _due_rows(self, bank: Bank, group: dict[str, Any]) -> str | torch.Tensor | None:
        """Rows of ``bank`` whose roots are refreshed this step: ``"all"``, an index tensor, or None."""
        start, frequency = group["start_preconditioning_step"], group["precondition_frequency"]
        steps = {int(self.state[member.param]["step"]) for member, _ in bank.members}
        if len(steps) == 1:  # the usual case: decide for the whole bank at once
            t = steps.pop()
            if t < start:
                return None
            if t == start or (not group["stagger"] and t % frequency == 0):
                return "all"
            return bank.phase_rows(t % frequency, frequency) if group["stagger"] else None
        due: list[int] = []
        for first, (member, _) in zip(bank.member_rows(), bank.members):
            t = int(self.state[member.param]["step"])
            if t < start:
                continue
            if t == start or (not group["stagger"] and t % frequency == 0):
                due.extend(range(first, first + member.count))
            elif group["stagger"]:
                phase = t % frequency
                ordinals = bank.ordinals[first : first + member.count]
                due.extend(first + k for k, o in enumerate(ordinals) if o % frequency == phase)
        if not due:
            return None
        if len(due) == bank.rows:
            return "all"
        return torch.tensor(due, device=bank.factors.device)

    def _apply_weight_decay(self, active: set[torch.Tensor]) -> None:
        for group in self.param_groups:
            wd = group["weight_decay"]
            params = [p for p in group["params"] if p in active]
            if wd and params:
                torch._foreach_mul_(params, 1 - group["lr"] * wd)

    def _direction(self, stack: Stack) -> torch.Tensor:
        """The step's update blocks ``lr · P`` of a stack (momentum and grafting applied).

        On the CPU a large stack is computed in chunks of rows (:data:`CPU_CHUNK_ELEMENTS`), so
        the ten or so elementwise passes over each chunk run in cache; the result is the same.
        """
        group = self.param_groups[stack.group]
        beta1, beta2 = group["betas"]
        correct = group["bias_correction"]
        start = group["start_preconditioning_step"]
        per_row = {
            "bias1": self._row_values(stack, lambda t: 1 - beta1**t) if correct and beta1 > 0 else None,
            "bias2": self._row_values(stack, lambda t: 1 - beta2**t) if correct else 1.0,
            "started": self._row_values(stack, lambda t: t >= start),
        }
        size = matrices_per_chunk(stack.grad, CPU_CHUNK_ELEMENTS)
        if size >= stack.rows:
            return self._direction_rows(stack, group, slice(None), per_row)
        out = torch.empty_like(stack.grad)
        for first in range(0, stack.rows, size):
            rows = slice(first, first + size)
            chunk = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in per_row.items()}
            out[rows] = self._direction_rows(stack, group, rows, chunk)
        return out

    def _direction_rows(
        self, stack: Stack, group: dict[str, Any], rows: slice, per_row: dict[str, Any]
    ) -> torch.Tensor:
        """:meth:`_direction` for the rows ``rows`` of a stack (``per_row`` already sliced)."""
        beta1 = group["betas"][0]
        g_hat = (stack.tensors["grad_ema"] if beta1 > 0 else stack.grad)[rows]
        if per_row["bias1"] is not None:
            g_hat = g_hat / per_row["bias1"]
        moment = stack.tensors.get("moment")
        direction = grafting_direction(
            g_hat, None if moment is None else moment[rows], group["grafting"], group["eps"], per_row["bias2"]
        )
        started = per_row["started"]
        if stack.left is not None or stack.right is not None:
            if started is not False:
                left, right = _roots(stack.left, stack.rows), _roots(stack.right, stack.rows)
                U = precondition(
                    g_hat, None if left is None else left[rows], None if right is None else right[rows]
                )
                shampoo = U if group["grafting"] == "none" else graft(U, direction)
                direction = shampoo if started is True else torch.where(started, shampoo, direction)
            elif group["grafting"] == "none":
                direction = g_hat
        mu = group["momentum"]
        if mu > 0:
            buffer = stack.tensors["momentum"][rows]
            buffer.mul_(mu).add_(direction)
            direction = direction.add(buffer, alpha=mu) if group["nesterov"] else buffer.clone()
        return direction * group["lr"]


# A refreshed root with an entry above ROOT_BOUND_SLACK · root_eps^(-1/p) counts as a failure.
ROOT_BOUND_SLACK = 100.0

# On the CPU the per-step elementwise work runs over chunks of a stack's rows of at most this many
# elements per torch thread (1 MiB of fp32), which stay in the cores' caches between the passes.
CPU_CHUNK_ELEMENTS = 1 << 18


def _roots(location: tuple[Bank, int] | None, rows: int) -> torch.Tensor | None:
    if location is None:
        return None
    bank, first = location
    return bank.roots[first : first + rows]


def _restore(key: str, value: Any, device: torch.device) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if key == "step":
        return value.detach().to(device="cpu", dtype=torch.int64).clone()
    return value.detach().to(device=device, dtype=torch.float32).clone()


def _gather_gradients(stack: Stack, maximize: bool) -> None:
    row = 0
    for member in stack.members:
        rows = stack.grad[row : row + member.count]
        if member.param.grad is None:
            rows.zero_()
        else:
            member.gather(member.param.grad, rows)
        row += member.count
    if maximize:
        stack.grad.neg_()


def _signature(groups: list[dict[str, Any]]) -> tuple:
    return tuple(tuple(_freeze(group[key]) for key in _LAYOUT_KEYS) for group in groups)


def _freeze(value: Any) -> Any:
    return float(value) if isinstance(value, torch.Tensor) else value


def _group_kind(group: Any) -> str:
    """``"none"`` (no distribution), ``"default"`` (the default group) or ``"custom"``."""
    if group is None:
        return "none"
    return "default" if group is torch.distributed.group.WORLD else "custom"


def _check_group(group: dict[str, Any]) -> None:
    """Validate every option of a parameter group (constructor defaults or a group override)."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"lr as a tensor must have one element; got shape {tuple(lr.shape)}")
    check_number("lr", lr, low=0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2); got {betas!r}")
    check_number("betas[0]", betas[0], low=0, high=1, high_open=True)
    check_number("betas[1]", betas[1], low=0, high=1, high_open=True)
    check_number("eps", group["eps"], low=0)
    check_number("weight_decay", group["weight_decay"], low=0)
    check_number("block_size", group["block_size"], low=1, integer=True)
    check_number("factor_beta", group["factor_beta"], low=0, high=1, low_open=True)
    check_number("precondition_frequency", group["precondition_frequency"], low=1, integer=True)
    check_number("start_preconditioning_step", group["start_preconditioning_step"], low=1, integer=True)
    for flag in ("stagger", "bias_correction", "nesterov", "maximize"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be a bool; got {group[flag]!r}")
    check_choice("grafting", group["grafting"], GRAFTINGS)
    check_number("momentum", group["momentum"], low=0, high=1, high_open=True)
    check_choice("root_method", group["root_method"], METHODS)
    check_number("root_eps", group["root_eps"], low=0)
    check_number("root_steps", group["root_steps"], low=1, integer=True)
    if group["root_tol"] is not None:
        check_number("root_tol", group["root_tol"], low=0, low_open=True)
    check_choice("scaling", group["scaling"], SCALINGS)
    check_number("scaling_steps", group["scaling_steps"], low=0, integer=True)
    check_number("num_vectors", group["num_vectors"], low=1, integer=True)
    check_number("safety", group["safety"], low=0, low_open=True)
    check_choice("precision", group["precision"], PRECISIONS)
    check_choice("eigen_fix", group["eigen_fix"], EIGEN_FIXES)
    check_number("chebyshev_degree", group["chebyshev_degree"], low=1, integer=True)
    check_number("chebyshev_interval_lower", group["chebyshev_interval_lower"], low=0, low_open=True)
    check_choice("one_dim", group["one_dim"], ONE_DIM)
    root = group["matrix_root"]
    if root is not None:
        check_number("matrix_root", root, low=1, integer=True)
        if group["root_method"] == "ndb" and root & (root - 1):
            raise ValueError(f"matrix_root must be 1 or a power of two with root_method 'ndb'; got {root}")


class _Plan:
    """The stacks and banks of all parameters that have state, bound to ``optimizer.state``."""

    def __init__(self, signature: tuple) -> None:
        self.exchange: _Exchange | None = None
        self.ownership: distributed.Ownership | None = None
        self.stacks: list[Stack] = []
        self.banks: list[Bank] = []
        self.params: list[torch.Tensor] = []
        self.signature = signature

    def covers(self, active: set[torch.Tensor]) -> bool:
        """True when every parameter with a gradient already has its blocks in the plan."""
        return active.issubset(self.param_set)

    @classmethod
    def build(cls, optimizer: DASH, active: set[torch.Tensor]) -> _Plan:
        """Plan every parameter that has state or a gradient now, and bind the state buffers.

        Pass 1 puts each region (or, without stacking, each block) into the stack of its scope and
        block shape; pass 2 appends each stack's factors to the bank of its scope, factor size and
        root, stack by stack, so every stack sees its factors as contiguous bank rows.
        """
        plan = cls(_signature(optimizer.param_groups))
        rank, world_size = distributed.world(optimizer._group)
        # Ownership is planned over every parameter, with a gradient yet or not, so that it stays
        # the same when a parameter starts later.
        regions = []  # canonical order: (group, param index, param, blocking, region, has state)
        fingerprint = []
        for g_index, group in enumerate(optimizer.param_groups):
            for p_index, p in enumerate(group["params"]):
                # Reading optimizer.state[p] would create an empty entry for a parameter without
                # a gradient; torch's optimizers create none.
                state = optimizer.state[p] if p in optimizer.state or p in active else {}
                used = p.numel() > 0 and (p in active or "step" in state)
                fingerprint.append((g_index, p_index, tuple(p.shape), used))
                if p.numel() == 0:
                    continue
                if used:
                    plan.params.append(p)
                    state.setdefault("step", torch.zeros((), dtype=torch.int64))
                blocking = BlockPlan.build(p.shape, group["block_size"], group["one_dim"])
                for r_index, region in enumerate(blocking.regions):
                    if used:
                        _check_region(state, r_index, region.block, p.shape)
                    regions.append((g_index, p_index, p, blocking, r_index, used))
        distributed.check_same_everywhere(optimizer._group, [*fingerprint, plan.signature])
        costs = []
        for g_index, _, _, blocking, r_index, _ in regions:
            group = optimizer.param_groups[g_index]
            region = blocking.regions[r_index]
            sides = [size for _, size in blocking.sides(region)]
            root = _matrix_root(group, len(sides))
            cost = distributed.block_cost(
                region.block, sides, group["precondition_frequency"], _solver_matmuls(group, root)
            )
            costs.extend([cost] * region.count)
        plan.ownership = distributed.Ownership(distributed.split_costs(costs, world_size), costs)

        stacks: dict[tuple, Stack] = {}
        ordinals: dict[tuple[int, str], range] = {}  # (id(member), side) -> factor ordinals
        remote: list[list[Member]] = [[] for _ in range(world_size)]
        next_block = next_ordinal = 0
        for g_index, p_index, p, blocking, r_index, used in regions:
            region = blocking.regions[r_index]
            sides = blocking.sides(region)
            chunks = plan.ownership.chunks(next_block, region.count) if used else []
            mine = [(first, count) for owner, first, count in chunks if owner == rank]
            if used:
                _keep_owned_rows(optimizer.state[p], r_index, region.count, *(mine[0] if mine else (0, 0)))
            for owner, owned_first, owned_count in chunks:
                remote[owner].append(Member(p, blocking, r_index, owned_first, owned_count))
                if owner != rank:
                    continue
                per_block = optimizer.stacking == "none"
                runs = [(k, 1) for k in range(owned_count)] if per_block else [(0, owned_count)]
                for offset, count in runs:
                    first = owned_first + offset
                    member = Member(p, blocking, r_index, first, count, owned_first, owned_count)
                    scope = _scope(optimizer.stacking, g_index, p_index, r_index, first)
                    key = (scope, p.device, region.block)
                    if key not in stacks:
                        stacks[key] = Stack(region.block, g_index, scope)
                    stacks[key].add(member)
                    for s_index, (side, _) in enumerate(sides):
                        start = next_ordinal + s_index * region.count + first
                        ordinals[id(member), side] = range(start, start + count)
            next_block += region.count
            next_ordinal += len(sides) * region.count
        plan.stacks = list(stacks.values())
        banks: dict[tuple, Bank] = {}
        for stack in plan.stacks:
            group = optimizer.param_groups[stack.group]
            first_member = stack.members[0]
            region = first_member.plan.regions[first_member.region]
            sides = first_member.plan.sides(region)
            root = _matrix_root(group, len(sides))
            for side, size in sides:
                bank_key = ((stack.scope, side) if optimizer.stacking == "none" else stack.scope, size, root)
                bank = banks.get(bank_key)
                if bank is None:
                    bank = banks[bank_key] = Bank(size, root, stack.group)
                first_row = None
                for member in stack.members:
                    row = bank.add(member, side, ordinals[id(member), side])
                    first_row = row if first_row is None else first_row
                setattr(stack, side, (bank, first_row))
        plan.banks = list(banks.values())
        plan.param_set = set(plan.params)
        plan._bind(optimizer)
        if world_size > 1:
            dtype = COMMUNICATION[optimizer.communication]
            plan.exchange = _Exchange(plan.stacks, remote, rank, dtype)
        return plan

    def _bind(self, optimizer: DASH) -> None:
        """Allocate (or view) every stack and bank buffer from the per-parameter region tensors."""
        for bank in self.banks:
            factors, roots = [], []
            for member, side in bank.members:
                state = optimizer.state[member.param]
                shape = (member.owned_count, bank.size, bank.size)
                device, first = member.param.device, member.first - member.owned_first
                factors.append((state, f"{side}.{member.region}", first, member.count, _zeros(shape, device)))
                roots.append(
                    (state, f"{side}_root.{member.region}", first, member.count, _eyes(shape, device))
                )
            bank.factors = bind(factors)
            bank.roots = bind(roots)
        for stack in self.stacks:
            group = optimizer.param_groups[stack.group]
            device = stack.members[0].param.device
            for kind in _elementwise_kinds(group):
                entries = []
                for member in stack.members:
                    shape = (member.owned_count, *stack.shape)
                    key = f"{kind}.{member.region}"
                    state = optimizer.state[member.param]
                    first = member.first - member.owned_first
                    entries.append((state, key, first, member.count, _zeros(shape, device)))
                stack.tensors[kind] = bind(entries)
            stack.grad = torch.empty(stack.rows, *stack.shape, device=device)

    def save_rows(self, params: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of every state row that belongs to ``params`` (restored by :meth:`restore_rows`)."""
        wanted = set(params)
        saved = []
        for stack in self.stacks:
            rows = _member_first_rows(stack.members)
            for first, member in zip(rows, stack.members):
                if member.param in wanted:
                    for tensor in stack.tensors.values():
                        view = tensor[first : first + member.count]
                        saved.append((view, view.clone()))
        for bank in self.banks:
            for first, (member, _) in zip(bank.member_rows(), bank.members):
                if member.param in wanted:
                    for tensor in (bank.factors, bank.roots):
                        view = tensor[first : first + member.count]
                        saved.append((view, view.clone()))
        return saved

    @staticmethod
    def restore_rows(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write back the rows copied by :meth:`save_rows`."""
        for view, copy in saved:
            view.copy_(copy)


def _member_first_rows(members: list[Member]) -> list[int]:
    rows, row = [], 0
    for member in members:
        rows.append(row)
        row += member.count
    return rows


def _elementwise_kinds(group: dict[str, Any]) -> list[str]:
    kinds = []
    if group["betas"][0] > 0:
        kinds.append("grad_ema")
    if group["grafting"] in ("adam", "rmsprop", "adagrad"):
        kinds.append("moment")
    if group["momentum"] > 0:
        kinds.append("momentum")
    return kinds


def _zeros(shape: tuple[int, ...], device: torch.device) -> Callable[[], torch.Tensor]:
    return lambda: torch.zeros(shape, device=device, dtype=torch.float32)


def _eyes(shape: tuple[int, ...], device: torch.device) -> Callable[[], torch.Tensor]:
    return lambda: torch.eye(shape[-1], device=device, dtype=torch.float32).expand(shape).clone()


def _scope(stacking: str, group: int, param: int, region: int, first: int) -> tuple:
    if stacking == "global":
        return (group,)
    if stacking == "layer":
        return (group, param)
    return (group, param, region, first)


def _check_region(state: dict, region: int, block: tuple[int, int], shape: torch.Size) -> None:
    tensor = state.get(f"grad_ema.{region}", state.get(f"moment.{region}"))
    if tensor is not None and tuple(tensor.shape[1:]) != block:
        raise ValueError(
            f"the saved state of a parameter of shape {tuple(shape)} has blocks of shape "
            f"{tuple(tensor.shape[1:])}, but block_size now gives {block}; load it with the block_size "
            "it was saved with"
        )


def _keep_owned_rows(state: dict, region: int, count: int, first: int, owned: int) -> None:
    """Cut whole-region tensors (loaded or regathered) down to the rows this rank owns (maybe none)."""
    suffix = f".{region}"
    for key, tensor in list(state.items()):
        if not key.endswith(suffix):
            continue
        if owned == 0:
            del state[key]
        elif tensor.shape[0] == count and owned != count:
            state[key] = tensor[first : first + owned].clone()


def _matrix_root(group: dict[str, Any], sides: int) -> int:
    """``p`` of a block's factors: the group's ``matrix_root``, else 4 with two sides and 2 with one."""
    return group["matrix_root"] or (4 if sides == 2 else 2)


def _root_options(group: dict[str, Any]) -> RootOptions:
    """The inverse-root options of a parameter group."""
    return RootOptions(
        method=group["root_method"],
        eps=group["root_eps"],
        eigen_fix=group["eigen_fix"],
        steps=group["root_steps"],
        tol=group["root_tol"],
        scaling=group["scaling"],
        scaling_steps=group["scaling_steps"],
        num_vectors=group["num_vectors"],
        safety=group["safety"],
        precision=group["precision"],
        degree=group["chebyshev_degree"],
        interval_lower=group["chebyshev_interval_lower"],
    )


def _solver_matmuls(group: dict[str, Any], p: int) -> int:
    """The n×n matmuls of one root refresh (:func:`root_matmuls`); eigh, which is not made of
    matmuls, is counted as a rough 20."""
    count = root_matmuls(group["root_method"], p, steps=group["root_steps"], degree=group["chebyshev_degree"])
    return 20 if count is None else count


class _Exchange:
    """The flat all-gather of update blocks: each rank packs its members' updates in canonical
    order into a buffer of the largest rank's size; every rank then applies every rank's part."""

    def __init__(
        self, stacks: list[Stack], remote: list[list[Member]], rank: int, dtype: torch.dtype
    ) -> None:
        self.remote = remote
        self.sizes = [sum(m.count * math.prod(m.plan.regions[m.region].block) for m in ms) for ms in remote]
        self.width = max(self.sizes)
        self.dtype = dtype
        # Where each of this rank's stack members goes in the send buffer.
        offsets: dict[tuple[int, int, int], int] = {}
        offset = 0
        for member in remote[rank]:
            offsets[id(member.param), member.region, member.first] = offset
            offset += member.count * math.prod(member.plan.regions[member.region].block)
        self.placements = []
        for stack in stacks:
            size = math.prod(stack.shape)
            places = []
            for member in stack.members:
                base = offsets[id(member.param), member.region, member.owned_first]
                places.append(base + (member.first - member.owned_first) * size)
            self.placements.append(places)

    @property
    def bytes_per_step(self) -> int:
        """Bytes each rank receives per step from the all-gather."""
        return self.width * len(self.remote) * torch.empty((), dtype=self.dtype).element_size()

    def run(
        self,
        group: Any,
        stacks: list[Stack],
        updates: list[torch.Tensor],
        targets: dict[torch.Tensor, torch.Tensor],
        active: set[torch.Tensor],
    ) -> None:
        """Exchange the updates and subtract every rank's blocks from the parameters."""
        device = next(iter(targets.values())).device
        send = torch.zeros(self.width, dtype=self.dtype, device=device)
        for stack, update, places in zip(stacks, updates, self.placements):
            row = 0
            for member, place in zip(stack.members, places):
                if member.param in active:
                    size = member.count * math.prod(stack.shape)
                    send[place : place + size].view(member.count, *stack.shape).copy_(
                        update[row : row + member.count]
                    )
                row += member.count
        received = distributed.all_gather_updates(group, send)
        for rank, members in enumerate(self.remote):
            offset = rank * self.width
            for member in members:
                block = member.plan.regions[member.region].block
                size = member.count * math.prod(block)
                if member.param in active:
                    update = received[offset : offset + size].view(member.count, *block)
                    member.subtract_from(targets[member.param], update)
                offset += size
