"""A slow, plain float64 block Shampoo with per-block grafting, written from the documented algorithm.

It deliberately shares no code with ``dash_shampoo`` (no blocking, stacks or preconditioner import):
every block is a Python loop iteration, every root a float64 ``torch.linalg.eigh``. Tests feed it
the same gradients as :class:`dash_shampoo.DASH` and compare the parameters.

Per parameter (matrix view: size-1 dims dropped; 0-D → (1, 1); 1-D ``E`` → ``(E, 1)`` column with
only a left factor, or with ``one_dim="adam"`` one unpreconditioned ``(1, E)`` block; N-D →
``(d0, prod(rest))``), cut into ``block_size`` blocks plus rest blocks, with step ``t`` from 1:

    L ← βf L + (1−βf) g gᵀ, R ← βf R + (1−βf) gᵀ g       (sums when βf = 1; no factor on a side of 1)
    m ← β1 m + (1−β1) g, Ĝ = m / (1 − β1^t);  v: Adam/RMSprop EMA β2, AdaGrad sum
    D = Ĝ / (sqrt(v̂) + eps)   (the grafting direction)
    roots refreshed when t == start or t % frequency == 0 (staggered: factor k when t % f == k % f)
    P = D before start; else U = L^(-1/p) Ĝ R^(-1/p), P = U ‖D‖_F / (‖U‖_F + 1e-16) per block
    M ← μM + P; P ← P + μM (Nesterov) or M
    W ← W (1 − lr·wd) − lr·P
"""

from __future__ import annotations

import math
from typing import Any

import torch

DEFAULTS: dict[str, Any] = dict(
    lr=1e-3,
    betas=(0.9, 0.95),
    eps=1e-8,
    weight_decay=0.0,
    block_size=1024,
    factor_beta=0.95,
    precondition_frequency=10,
    start_preconditioning_step=1,
    stagger=False,
    grafting="adam",
    bias_correction=True,
    momentum=0.0,
    nesterov=False,
    root_eps=1e-10,
    root_eps_relative=1e-6,
    one_dim="shampoo",
    matrix_root=None,
    maximize=False,
)


def matrix_shape(shape: tuple[int, ...], one_dim: str) -> tuple[tuple[int, int], bool]:
    """The (R, C) matrix view of a parameter and whether its blocks may be preconditioned."""
    dims = [d for d in shape if d != 1]
    numel = math.prod(shape)
    if len(dims) >= 2:
        return (dims[0], numel // dims[0]), True
    if one_dim == "adam":
        return (1, numel), False
    return (numel, 1), True


def block_slices(rows: int, cols: int, block_size: int) -> list[tuple[slice, slice]]:
    """Blocks in plan order: regions (full rows × full cols, full × rest, rest × full, rest × rest),
    row-major over the block grid inside a region."""

    def runs(n: int) -> list[list[int]]:
        full = [k * block_size for k in range(n // block_size)]
        rest = [n // block_size * block_size] if n % block_size else []
        return [r for r in (full, rest) if r]

    out = []
    for row_run in runs(rows):
        for col_run in runs(cols):
            for r0 in row_run:
                for c0 in col_run:
                    out.append((slice(r0, min(r0 + block_size, rows)), slice(c0, min(c0 + block_size, cols))))
    return out


def region_of(sl: tuple[slice, slice], block_size: int) -> tuple[bool, bool]:
    """Which region a block is in: (row piece is full, column piece is full)."""
    return (sl[0].stop - sl[0].start == block_size, sl[1].stop - sl[1].start == block_size)


def inverse_root_eigh(A: torch.Tensor, p: int, eps: float, relative_eps: float = 0.0) -> torch.Tensor:
    """(A + r I)^(-1/p) in float64, r = eps + relative_eps · tr(A)/n, with Shampoo's eigenvalue
    shift (the absolute eps is added a second time)."""
    A = A.double()
    r = eps + relative_eps * float(A.trace()) / A.shape[0]
    values, vectors = torch.linalg.eigh(A + r * torch.eye(A.shape[0], dtype=torch.float64))
    values = values - values.min().clamp_max(0) + eps
    return (vectors * values.pow(-1.0 / p)) @ vectors.T


class ReferenceShampoo:
    """Float64 per-block Shampoo over ``groups`` (dicts with ``params`` and options)."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.groups = [{**DEFAULTS, **g} for g in groups]
        self.state: dict[int, dict[str, Any]] = {}
        self.refreshes = 0  # number of factor roots computed (for schedule tests)
        ordinal = 0
        # Factor ordinals for staggering: per param, per region, left factors then right factors.
        for group in self.groups:
            B = group["block_size"]
            for p in group["params"]:
                (rows, cols), pre = matrix_shape(tuple(p.shape), group["one_dim"])
                bs = max(rows * cols, 1) if not pre else B
                blocks = block_slices(rows, cols, bs)
                st = {"t": 0, "blocks": [], "shape": (rows, cols), "pre": pre}
                regions: dict[tuple[bool, bool], list[int]] = {}
                for k, sl in enumerate(blocks):
                    regions.setdefault(region_of(sl, bs), []).append(k)
                for sl in blocks:
                    m, n = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
                    sides = [s for s, size in (("L", m), ("R", n)) if pre and size > 1]
                    st["blocks"].append({"slice": sl, "sides": sides})
                for members in regions.values():
                    sides = st["blocks"][members[0]]["sides"]
                    for s_index, side in enumerate(sides):
                        for j, k in enumerate(members):
                            st["blocks"][k][side + "_ord"] = ordinal + s_index * len(members) + j
                    ordinal += len(sides) * len(members)
                self.state[id(p)] = st

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor | None]) -> None:
        """One step; ``grads`` is aligned with the flattened list of parameters (None: no gradient)."""
        flat = [(group, p) for group in self.groups for p in group["params"]]
        assert len(flat) == len(grads)
        for (group, p), g in zip(flat, grads):
            if g is not None:
                self._step_param(group, p, g.double())

    def _step_param(self, group: dict[str, Any], p: torch.Tensor, g: torch.Tensor) -> None:
        st = self.state[id(p)]
        rows, cols = st["shape"]
        beta1, beta2 = group["betas"]
        if group["maximize"]:
            g = -g
        G = g.reshape(rows, cols)
        st["t"] += 1
        t = st["t"]
        if "m" not in st:
            st["m"] = torch.zeros_like(G)
            st["v"] = torch.zeros_like(G)
            st["M"] = torch.zeros_like(G)
        # elementwise moments
        if beta1 > 0:
            st["m"] = beta1 * st["m"] + (1 - beta1) * G
            m = st["m"]
        else:
            m = G
        grafting = group["grafting"]
        if grafting in ("adam", "rmsprop"):
            st["v"] = beta2 * st["v"] + (1 - beta2) * G * G
        elif grafting == "adagrad":
            st["v"] = st["v"] + G * G
        correct = group["bias_correction"]
        g_hat = m / (1 - beta1**t) if (correct and beta1 > 0) else m
        if grafting == "adam":
            v_hat = st["v"] / (1 - beta2**t) if correct else st["v"]
            D = g_hat / (v_hat.sqrt() + group["eps"])
        elif grafting in ("rmsprop", "adagrad"):
            D = g_hat / (st["v"].sqrt() + group["eps"])
        else:
            D = g_hat.clone()
        start, freq = group["start_preconditioning_step"], group["precondition_frequency"]
        P = D.clone()
        fb = group["factor_beta"]
        for blk in st["blocks"]:
            sl = blk["slice"]
            gb = G[sl]
            for side in blk["sides"]:
                prod = gb @ gb.T if side == "L" else gb.T @ gb
                if side not in blk:
                    blk[side] = torch.zeros_like(prod)
                    blk[side + "root"] = torch.eye(prod.shape[0], dtype=torch.float64)
                blk[side] = blk[side] + prod if fb >= 1 else fb * blk[side] + (1 - fb) * prod
            if not blk["sides"]:
                continue
            root = group["matrix_root"] or (4 if len(blk["sides"]) == 2 else 2)
            for side in blk["sides"]:
                if t < start:
                    due = False
                elif group["stagger"]:
                    due = t == start or t % freq == blk[side + "_ord"] % freq
                else:
                    due = t == start or t % freq == 0
                if due:
                    blk[side + "root"] = inverse_root_eigh(
                        blk[side], root, group["root_eps"], group["root_eps_relative"]
                    )
                    self.refreshes += 1
            if t >= start:
                U = g_hat[sl]
                if "L" in blk["sides"]:
                    U = blk["Lroot"] @ U
                if "R" in blk["sides"]:
                    U = U @ blk["Rroot"]
                if grafting != "none":
                    U = U * (D[sl].norm() / (U.norm() + 1e-16))
                P[sl] = U
        mu = group["momentum"]
        if mu > 0:
            st["M"] = mu * st["M"] + P
            P = P + mu * st["M"] if group["nesterov"] else st["M"].clone()
        lr = float(group["lr"])
        new = p.double() * (1 - lr * group["weight_decay"]) - lr * P.reshape(p.shape)
        p.copy_(new)
