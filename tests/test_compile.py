"""``torch.compile(optimizer.step)`` on a fresh DASH: the plan is built inside the first compiled
call (dynamo defers attribute writes to the end of a frame, so the step must not read back
``self._layout`` after assigning it) and the parameters match eager DASH. The eager backend
traces with dynamo but runs the captured graphs as they are, so the test takes seconds.

Tolerance: 1e-6 of the step's largest update; the traced graphs may evaluate a few reductions in
another order (measured here: at most 2.2e-7 of the update over 4 steps)."""

from __future__ import annotations

import torch

from dash_shampoo import DASH


def test_compiled_step_on_a_fresh_optimizer_matches_eager():
    torch.manual_seed(0)
    shapes = [(20, 13), (13,), (3, 2, 4)]
    compiled_params = [torch.nn.Parameter(torch.randn(s) * 0.01) for s in shapes]  # ulps below 1e-6 of a step
    eager_params = [torch.nn.Parameter(p.detach().clone()) for p in compiled_params]
    options = dict(lr=0.1, block_size=8, precondition_frequency=2)
    compiled, eager = DASH(compiled_params, **options), DASH(eager_params, **options)
    step = torch.compile(compiled.step, backend="eager")
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        before = [p.detach().clone() for p in eager_params]
        for p, q in zip(compiled_params, eager_params):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        step()
        eager.step()
        update = max(float((q - b).abs().max()) for q, b in zip(eager_params, before))
        for p, q in zip(compiled_params, eager_params):
            assert float((p - q).abs().max()) <= 1e-6 * update
