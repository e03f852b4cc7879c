"""The options of a DASH parameter group and their checks, one per option.

Each check raises ``ValueError`` or ``TypeError`` naming the option, its value and what is allowed.
:class:`GroupChecks` remembers the values it last checked, so options changed in
``optimizer.param_groups`` between steps are checked again before they are used; only changed
values are checked, and a tensor ``lr`` is compared by identity and checked by its shape, never by
reading its value (which would synchronise with an accelerator).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from . import distributed
from ._checks import check_choice, check_number
from .linalg.precision import PRECISIONS
from .linalg.roots import EIGEN_FIXES, METHODS
from .linalg.scaling import SCALINGS
from .preconditioner import GRAFTINGS

OneDim = Literal["shampoo", "adam"]
ONE_DIM: tuple[str, ...] = ("shampoo", "adam")


def _lr(group: dict[str, Any]) -> None:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr as a tensor must have one element; got shape {tuple(lr.shape)}")
        return
    check_number("lr", lr, low=0)


def _betas(group: dict[str, Any]) -> None:
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2); got {betas!r}")
    check_number("betas[0]", betas[0], low=0, high=1, high_open=True)
    check_number("betas[1]", betas[1], low=0, high=1, high_open=True)


def _start_step(group: dict[str, Any]) -> None:
    if group["start_preconditioning_step"] == -1:  # Distributed Shampoo's "the frequency"
        raise ValueError(
            "start_preconditioning_step must be in [1, inf]; got -1 (Distributed Shampoo's 'start at "
            f"the frequency'): pass start_preconditioning_step={group['precondition_frequency']}"
        )
    check_number("start_preconditioning_step", group["start_preconditioning_step"], low=1, integer=True)


def _flag(name: str) -> Callable[[dict[str, Any]], None]:
    def check(group: dict[str, Any]) -> None:
        if not isinstance(group[name], bool):
            raise TypeError(f"{name} must be a bool; got {group[name]!r}")

    return check


def _number(name: str, **bounds: Any) -> Callable[[dict[str, Any]], None]:
    return lambda group: check_number(name, group[name], **bounds)


def _choice(name: str, allowed: tuple[str, ...]) -> Callable[[dict[str, Any]], None]:
    return lambda group: check_choice(name, group[name], allowed)


def _root_tol(group: dict[str, Any]) -> None:
    if group["root_tol"] is not None:
        check_number("root_tol", group["root_tol"], low=0, low_open=True)


def _matrix_root(group: dict[str, Any]) -> None:
    root = group["matrix_root"]
    if root is not None:
        check_number("matrix_root", root, low=1, integer=True)
        if group["root_method"] == "ndb" and root & (root - 1):
            raise ValueError(f"matrix_root must be 1 or a power of two with root_method 'ndb'; got {root}")


#: Option -> its check (a check may read other options of the group, e.g. matrix_root's method).
CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "lr": _lr,
    "betas": _betas,
    "eps": _number("eps", low=0),
    "weight_decay": _number("weight_decay", low=0),
    "block_size": _number("block_size", low=1, integer=True),
    "factor_beta": _number("factor_beta", low=0, high=1, low_open=True),
    "precondition_frequency": _number("precondition_frequency", low=1, integer=True),
    "start_preconditioning_step": _start_step,
    "stagger": _flag("stagger"),
    "grafting": _choice("grafting", GRAFTINGS),
    "bias_correction": _flag("bias_correction"),
    "momentum": _number("momentum", low=0, high=1, high_open=True),
    "nesterov": _flag("nesterov"),
    "root_method": _choice("root_method", METHODS),
    "root_eps": _number("root_eps", low=0),
    "root_eps_relative": _number("root_eps_relative", low=0),
    "root_steps": _number("root_steps", low=1, integer=True),
    "root_tol": _root_tol,
    "scaling": _choice("scaling", SCALINGS),
    "scaling_steps": _number("scaling_steps", low=0, integer=True),
    "num_vectors": _number("num_vectors", low=1, integer=True),
    "safety": _number("safety", low=0, low_open=True),
    "precision": _choice("precision", PRECISIONS),
    "eigen_fix": _choice("eigen_fix", EIGEN_FIXES),
    "chebyshev_degree": _number("chebyshev_degree", low=1, integer=True),
    "chebyshev_interval_lower": _number("chebyshev_interval_lower", low=0, low_open=True),
    "one_dim": _choice("one_dim", ONE_DIM),
    "matrix_root": _matrix_root,
    "maximize": _flag("maximize"),
}
# Checks that read another option run again when that one changes.
_DEPENDENTS = {"root_method": ("matrix_root",)}


def check_params(params: list[torch.Tensor]) -> None:
    """Raise for a parameter DASH cannot step: ``TypeError`` for complex or not floating-point,
    ``ValueError`` for a DTensor not sharded by rows (:func:`~dash_shampoo.distributed.check_placements`)."""
    for index, p in enumerate(params):
        if p.is_complex():
            raise TypeError(f"DASH does not support complex parameters; got a parameter of dtype {p.dtype}")
        if not p.is_floating_point():
            raise TypeError(f"DASH needs floating-point parameters; got dtype {p.dtype}")
        if distributed.is_dtensor(p):
            distributed.check_placements(p, f"parameter {index} of the group")


def check_group(group: dict[str, Any]) -> None:
    """Check every option of a parameter group (constructor defaults or a group override)."""
    for check in CHECKS.values():
        check(group)


def loaded_groups(
    saved: list[dict[str, Any]],
    groups: list[dict[str, Any]],
    defaults: dict[str, Any],
    counters: tuple[str, ...],
) -> tuple[list[dict[str, Any]], list[int]]:
    """The parameter groups after loading ``saved`` (from a state dict) into ``groups``: copies of
    the saved options with each group's own ``params`` (and its ``param_names`` if the saved one
    has none), options the saved groups lack from the group or ``defaults``, and the ``counters``
    keys taken out (returned as integers from the first group, 0 where absent).

    Raises:
        ValueError: the saved groups do not hold as many parameters as ``groups``.
    """
    saved_sizes, sizes = [len(g["params"]) for g in saved], [len(g["params"]) for g in groups]
    if saved_sizes != sizes:
        raise ValueError(
            f"the state dict has parameter groups of {saved_sizes} parameters, this optimizer of "
            f"{sizes}; load it into an optimizer built with the same parameter groups"
        )
    loaded = copy.deepcopy(saved)
    counts = [int(loaded[0].get(key, 0)) for key in counters]
    for new, group in zip(loaded, groups):
        for key in counters:
            new.pop(key, None)
        for key, value in {**defaults, **group}.items():
            if key not in new or key == "params":
                new[key] = value
    return loaded, counts


class GroupChecks:
    """The option values last checked for each parameter group."""

    def __init__(self) -> None:
        self._checked: list[dict[str, Any]] = []

    def check(self, groups: list[dict[str, Any]]) -> None:
        """Check the options that changed since the last call (all of a group seen first).

        Raises:
            ValueError, TypeError: a changed option is not allowed; nothing is remembered for it,
                so it is checked again at the next call.
        """
        del self._checked[len(groups) :]
        for index, group in enumerate(groups):
            if index == len(self._checked):
                self._checked.append({})
            seen = self._checked[index]
            changed = [key for key in CHECKS if key not in seen or not _same(seen[key], group[key])]
            dependents = [d for key in changed for d in _DEPENDENTS.get(key, ())]
            for key in changed + dependents:
                CHECKS[key](group)
            seen.update((key, group[key]) for key in changed)


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, torch.Tensor) or isinstance(new, torch.Tensor):
        return old is new
    return type(old) is type(new) and old == new


#: Keywords of the peers (Meta's Distributed Shampoo, pytorch_optimizer's DASH/SOAP/Shampoo,
#: heavyball) -> what DASH calls the same thing, and where the meaning differs.
PEER_KEYWORDS: dict[str, str] = {
    "max_preconditioner_dim": "block_size (Distributed Shampoo's block size)",
    "max_precond_dim": "block_size (heavyball's largest preconditioned dimension)",
    "max_precondition_dim": "block_size (pytorch_optimizer's largest preconditioned dimension)",
    "epsilon": "root_eps (Distributed Shampoo's epsilon damps the factors; DASH's eps is the "
    "grafting denominator)",
    "matrix_eps": "root_eps",
    "correct_bias": "bias_correction",
    "use_bias_correction": "bias_correction",
    "inverse_root_method": "root_method ('newton_db' is 'ndb', 'eigh' is 'eigh')",
    "newton_steps": "root_steps",
    "shampoo_beta": "factor_beta (the EMA of the factors; DASH's betas[1] is the grafting Adam's β₂)",
    "grafting_beta": "betas[1] (the grafting Adam's β₂)",
    "grafting_config": "grafting ('adam', 'adagrad', 'rmsprop', 'sgd' or 'none', with betas[1] and eps)",
    "graft_type": "grafting",
    "matrix_scaling": "scaling ('power' is 'power', 'frobenius' is 'fro')",
    "power_iteration_steps": "scaling_steps",
    "power_iteration_vectors": "num_vectors",
    "preconditioning_compute_steps": "precondition_frequency",
    "use_decoupled_weight_decay": "weight_decay (always decoupled)",
    "weight_decouple": "weight_decay (always decoupled)",
    "distributed_config": "process_group",
}


def check_keywords(unknown: dict[str, Any], known: Sequence[str]) -> None:
    """Raise ``TypeError`` for keywords DASH does not take, naming DASH's equivalent of a peer's
    keyword (:data:`PEER_KEYWORDS`) or the nearest of ``known``."""
    if not unknown:
        return
    name = next(iter(unknown))
    if name in PEER_KEYWORDS:
        hint = f"; DASH calls it {PEER_KEYWORDS[name]}"
    else:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    raise TypeError(f"DASH got an unexpected keyword argument {name!r}{hint}")
