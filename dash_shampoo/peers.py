"""Other Shampoo-family optimizers a user could pick instead of DASH (timed by ``bench step``), each
an optional import.

A peer is built with the benchmark's block size ``B`` (or its nearest equivalent, e.g. the largest
preconditioned dimension) and refresh period ``F``, and otherwise with its own defaults except where
:attr:`Peer.settings` says otherwise; that string also lists how its algorithm differs from DASH's
defaults (block Shampoo, root 4, Adam grafting, factor EMA 0.95, ``root_eps`` 1e-10, fp32). None of
these packages is a dependency of ``dash_shampoo``: install them with the ``bench`` extra.

A peer that is not installed, cannot run on the device, or would build a preconditioner that cannot
fit (:attr:`Peer.check`) becomes a row with the reason instead of a time; so does one that raises.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .blocking import local_tensor

Shapes = Sequence[tuple[int, ...]]
#: ``build(params, block_size, frequency, lr=LR)``: the peer's optimizer on ``params``.
Builder = Callable[..., torch.optim.Optimizer]

#: Largest dimension a peer without blocking may build a full ``d × d`` factor for, per device type
#: (bytes and an O(d³) SVD per refresh: 32000² is 4.1 GB; a 4096² SVD takes about a minute on one
#: CPU core).
MAX_UNBLOCKED_DIM: dict[str, int] = {"cuda": 8192, "cpu": 2048}
LR = 1e-3
BETAS = (0.9, 0.95)


@dataclass(frozen=True)
class Peer:
    """One optimizer from another package.

    Attributes:
        name: row label, ``package.Class`` (the package's absence makes a "not installed" row).
        settings: how this row's settings and algorithm differ from DASH's (``{B}``/``{F}`` are
            filled in).
        build: ``build(params, block_size, frequency, lr=LR)``, called after the import succeeded.
        check: optional ``check(shapes, block_size, device)`` returning a reason to skip, or None.
        load: imports the package (default: ``import`` of the name's first part).
        solver: the DASH root method this peer's algorithm matches (``"ndb"``, ``"eigh"``), if any.
    """

    name: str
    settings: str
    build: Builder
    check: Callable[[Shapes, int, torch.device], str | None] | None = None
    load: Callable[[], Any] | None = None
    solver: str | None = None

    def describe(self, block_size: int, frequency: int) -> str:
        """:attr:`settings` with the block size and frequency filled in."""
        return self.settings.format(B=block_size, F=frequency)

    def unavailable(self, shapes: Shapes, block_size: int, device: torch.device) -> str | None:
        """Why this peer cannot run here (import error, device, size), or None when it can."""
        try:
            if self.load is not None:
                self.load()
            else:
                importlib.import_module(self.name.partition(".")[0])
        except Exception as error:  # ImportError, or a package that fails while importing
            return f"not installed ({type(error).__name__}: {error})"
        if self.check is not None:
            return self.check(shapes, block_size, device)
        return None


def _constructor(path: str, block_key: str | None, frequency_key: str, **options: Any) -> Builder:
    """A builder of the class at ``path`` (``module.Class``) that passes the learning rate, the block
    size as ``block_key`` (none if None), the refresh period as ``frequency_key`` and ``options``."""
    module_name, _, class_name = path.rpartition(".")

    def build(
        params: list[torch.Tensor], block_size: int, frequency: int, lr: float = LR
    ) -> torch.optim.Optimizer:
        cls = getattr(importlib.import_module(module_name), class_name)
        sized = {block_key: block_size} if block_key else {}
        return cls(params, lr=lr, **sized, **{frequency_key: frequency}, **options)

    return build


def _scalable_shampoo(
    params: list[torch.Tensor], block_size: int, frequency: int, lr: float = LR
) -> torch.optim.Optimizer:
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    build = _constructor(
        "pytorch_optimizer.ScalableShampoo",
        "block_size",
        "preconditioning_compute_steps",
        betas=BETAS,
        start_preconditioning_step=1,
        no_preconditioning_for_layers_with_dim_gt=10**9,
        graft_type=LayerWiseGrafting.RMSPROP,
    )
    return build(params, block_size, frequency, lr)


def _unblocked_check(shapes: Shapes, block_size: int, device: torch.device) -> str | None:
    largest = max((d for shape in shapes for d in shape), default=0)
    limit = MAX_UNBLOCKED_DIM.get(device.type, MAX_UNBLOCKED_DIM["cuda"])
    if largest > limit:
        gb = largest * largest * 4 / 1e9
        return (
            f"skipped: no blocking, it would build a {largest}×{largest} factor ({gb:.2f} GB fp32) and "
            f"SVD it every refresh (limit on {device.type}: {limit})"
        )
    return None


def _heavyball(class_name: str) -> Builder:
    construct = _constructor(
        f"heavyball.{class_name}",
        "max_precond_dim",
        "precondition_frequency",
        betas=BETAS,
        weight_decay=0.0,
        use_precond_schedule=False,
        compile_step=False,
    )

    def build(
        params: list[torch.Tensor], block_size: int, frequency: int, lr: float = LR
    ) -> torch.optim.Optimizer:
        import heavyball.utils

        # Eager mode: torch.compile's first step on a CPU takes minutes and is not the step.
        heavyball.utils.compile_mode = None
        return construct(params, block_size, frequency, lr)

    return build


#: The modules of the authors' package that need CUDA or a logger, and the names DASH's code uses.
_AUTHORS_CUDA_ONLY = {
    "ista_daslab_optimizers.utils.triton_kernels": ("update_dash_preconditioner",),
    "ista_daslab_optimizers.utils.newton_schulz_triton": ("ns_line_1", "newton_schulz_triton"),
}


def authors_dash() -> Any:
    """The authors' ``ista_daslab_optimizers.dash`` module, importable without CUDA.

    Where the package imports as it is (a CUDA machine with its dependencies), that. Otherwise its
    top-level ``__init__`` (which imports every optimizer of the package, with CUDA extensions and
    ``wandb``) is skipped, its two Triton modules are replaced by stubs that raise if called (the
    fp32 ``DashGpu`` step calls neither: factors by ``bmm``, NDB without ``out_dtype``) and
    ``wandb`` is a no-op module during the import only (``DashGpu`` logs only on request).
    """
    try:
        return importlib.import_module("ista_daslab_optimizers.dash")
    except ImportError:
        pass
    import sys
    import types

    for name in [m for m in sys.modules if m.startswith("ista_daslab_optimizers")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("ista_daslab_optimizers")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(
            "ista_daslab_optimizers is not installed (pip install ista-daslab-optimizers --no-deps)"
        )
    package = types.ModuleType("ista_daslab_optimizers")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules[package.__name__] = package

    def cuda_only(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this Triton kernel of the authors' package needs CUDA")

    for module_name, names in _AUTHORS_CUDA_ONLY.items():
        module = types.ModuleType(module_name)
        module.__dict__.update(dict.fromkeys(names, cuda_only))
        sys.modules[module_name] = module
    had_wandb = "wandb" in sys.modules or importlib.util.find_spec("wandb") is not None
    if not had_wandb:
        sys.modules["wandb"] = types.ModuleType("wandb")
    try:
        return importlib.import_module("ista_daslab_optimizers.dash")
    finally:
        if not had_wandb:
            del sys.modules["wandb"]


def _dash_gpu(method: str) -> Builder:
    """A builder of the authors' ``DashGpu`` with root method ``method`` ("ndb" or "evd"), fp32."""

    def build(
        params: list[torch.Tensor], block_size: int, frequency: int, lr: float = LR
    ) -> torch.optim.Optimizer:
        dash = authors_dash()
        config = dash.DashConfig(
            block_size=block_size,
            inv_root_freq=frequency,
            inv_root_method=dash.DashInverseRootMethodType.from_string(method),
            matrix_scaling_type=dash.DashMatrixScalingType.from_string("pim"),
            mu=0.0,
        )
        return dash.DashGpu(params, lr=lr, weight_decay=0.0, config=config)

    return build


PEERS: tuple[Peer, ...] = (
    Peer(
        "pytorch_optimizer.DASH",
        "B={B}, F={F}; newton_db (= ndb, 10 steps), PI scale in bf16 ×2 (16 vectors); per-layer loop "
        "(layerwise batching only); same Adam grafting, EMA 0.95, matrix_eps 1e-10",
        _constructor(
            "pytorch_optimizer.DASH",
            "block_size",
            "precondition_frequency",
            betas=BETAS,
            inverse_root_method="newton_db",
            matrix_scaling="power",
            newton_steps=10,
            power_iteration_steps=10,
            power_iteration_vectors=16,
            eps=1e-8,
            matrix_eps=1e-10,
        ),
        solver="ndb",
    ),
    Peer(
        "pytorch_optimizer.DASH-eigh",
        "B={B}, F={F}; eigh roots; per-layer loop (layerwise batching only); same Adam grafting, "
        "EMA 0.95, matrix_eps 1e-10",
        _constructor(
            "pytorch_optimizer.DASH",
            "block_size",
            "precondition_frequency",
            betas=BETAS,
            inverse_root_method="eigh",
            eps=1e-8,
            matrix_eps=1e-10,
        ),
        solver="eigh",
    ),
    Peer(
        "pytorch_optimizer.Shampoo",
        "no blocking (one d×d factor per dimension), F={F}; SVD roots, factor sums (no EMA), "
        "no grafting, matrix_eps 1e-6",
        _constructor("pytorch_optimizer.Shampoo", None, "preconditioning_compute_steps"),
        _unblocked_check,
    ),
    Peer(
        "pytorch_optimizer.ScalableShampoo",
        "B={B}, F={F}, start 1, all layers preconditioned; RMSProp grafting (no Adam), Nesterov "
        "momentum β1 0.9, β2 0.95; Schur–Newton roots per block in a loop; matrix_eps 1e-6",
        _scalable_shampoo,
    ),
    Peer(
        "pytorch_optimizer.SOAP",
        "SOAP (Adam in Shampoo's eigenbasis), max_precondition_dim={B} (no blocking: larger dims "
        "are not rotated), F={F} QR refresh, betas (0.9, 0.95), wd 0",
        _constructor(
            "pytorch_optimizer.SOAP",
            "max_precondition_dim",
            "precondition_frequency",
            betas=BETAS,
            weight_decay=0.0,
        ),
    ),
    Peer(
        "heavyball.SOAP",
        "SOAP, max_precond_dim={B} (no blocking: larger dims not rotated), F={F} fixed "
        "(no precond schedule), eager (compile off), wd 0",
        _heavyball("SOAP"),
    ),
    Peer(
        "heavyball.KLShampoo",
        "KL-Shampoo (heavyball has no plain Shampoo), max_precond_dim={B} (no blocking), F={F} "
        "fixed, eager (compile off), no grafting, wd 0",
        _heavyball("KLShampoo"),
    ),
    Peer(
        "ista_daslab_optimizers.DashGpu",
        "the authors' DashGpu: B={B}, F={F}, NDB 10 steps, multi-vector power-iteration scale, "
        "fp32 matmuls, Adam grafting, AdamW on 1-D parameters",
        _dash_gpu("ndb"),
        load=authors_dash,
        solver="ndb",
    ),
    Peer(
        "ista_daslab_optimizers.DashGpu-evd",
        "the authors' DashGpu: B={B}, F={F}, eigendecomposition roots, fp32, Adam grafting, AdamW on "
        "1-D parameters",
        _dash_gpu("evd"),
        load=authors_dash,
        solver="eigh",
    ),
)


def _matches(peer: Peer, name: str) -> bool:
    return name.lower() in (peer.name.lower(), peer.name.rsplit(".", 1)[-1].lower())


def find(names: Sequence[str] | None) -> list[Peer]:
    """The peers named in ``names`` (full name or class name, case-insensitive); all when None.

    Raises:
        ValueError: a name that matches no peer.
    """
    if names is None:
        return list(PEERS)
    unknown = [name for name in names if not any(_matches(peer, name) for peer in PEERS)]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; known: {', '.join(p.name for p in PEERS)}")
    return [peer for peer in PEERS if any(_matches(peer, name) for name in names)]


def state_bytes(state: Any) -> int:
    """Bytes of every distinct tensor reachable from ``state`` (dicts, lists, tuples, sets, objects);
    of a DTensor, this rank's shard."""
    seen_objects: set[int] = set()
    seen_tensors: set[tuple[int, int, torch.dtype, tuple[int, ...]]] = set()
    total = 0
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            item = local_tensor(item.detach())
            key = (item.data_ptr(), item.numel(), item.dtype, tuple(item.shape))
            if key not in seen_tensors:
                seen_tensors.add(key)
                total += item.numel() * item.element_size()
            continue
        if id(item) in seen_objects or isinstance(item, (str, bytes, int, float, bool, type(None))):
            continue
        seen_objects.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not callable(item):
            stack.extend(vars(item).values())
    return total


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the 2-D weights of the hidden layers and AdamW on the rest
    (embeddings, output head, norms, biases), as Muon's authors recommend, as one optimizer.

    Both optimizers share this object's ``param_groups`` (group 0 Muon's, group 1 AdamW's) and its
    ``state``, so a learning-rate scheduler scales both and ``state_dict``/``load_state_dict`` are
    :class:`torch.optim.Optimizer`'s own.

    Args:
        hidden: the parameters Muon updates (2-D).
        rest: the parameters AdamW updates.
        lr: Muon's learning rate, used with Muon's default ``adjust_lr_fn`` (the original
            ``lr · sqrt(max(1, rows/cols))`` scaling, under which Muon's own lr of about 0.02 is
            right; ``"match_rms_adamw"`` would instead put it on AdamW's scale).
        adamw_lr, betas, eps: AdamW's settings for ``rest``.
        weight_decay: decoupled weight decay of both.
    """

    def __init__(
        self,
        hidden: list[torch.Tensor],
        rest: list[torch.Tensor],
        lr: float = 0.02,
        adamw_lr: float = 3e-3,
        betas: tuple[float, float] = BETAS,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay)
        self.adamw = torch.optim.AdamW(rest, lr=adamw_lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], {})
        self._share()

    def _share(self) -> None:
        """Point both optimizers at this object's groups and state (again after a load)."""
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:1], self.param_groups[1:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step of both optimizers; returns the closure's loss (``None`` without closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()
