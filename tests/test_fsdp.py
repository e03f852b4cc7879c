"""DASH under FSDP2 (``fully_shard``, DTensor parameters) on real gloo process groups.

Each launch runs tests/fsdp_worker.py in a process session of its own with a timeout, so a hang
fails the test (its ranks are killed) instead of stalling CI.

Tolerances: with shards of whole blocks every block sees the same gradients, factors and
power-iteration start vectors as in one process, on one thread per rank, so NDB (batch-invariant
on the CPU) matches one process bitwise. With eigh the batch a root is computed in differs (one
rank's stack vs the whole model's), and the CPU's batched eigh can round the last bits of a root
differently by batch: 1e-6 absolute on parameters of size ~0.1 (a few float32 ulps, as in
tests/test_distributed.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORKER = Path(__file__).with_name("fsdp_worker.py")


def launch(world: int, names: list[str], out_dir: Path, timeout: float = 180) -> dict[str, list[dict]]:
    """Run the scenarios on ``world`` gloo ranks; each scenario's per-rank results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(WORKER), str(world), str(out_dir), *names]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{world} ranks of {names} ran past {timeout} s\n{stdout[-3000:]}{stderr[-3000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    results = {}
    for name in names:
        per_rank = [torch.load(out_dir / f"{name}-{r}.pt", weights_only=False) for r in range(world)]
        for result in per_rank:
            assert "traceback" not in result, result.get("traceback")
        results[name] = per_rank
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    return launch(2, ["equal", "unaligned", "dcp_save", "dcp_resume", "full_state"], out), out


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory, two_ranks):
    out = tmp_path_factory.mktemp("fsdp3")
    shutil.copytree(two_ranks[1] / "dcp", out / "dcp")  # the 2-rank checkpoint resumes at 3
    return launch(3, ["equal", "unaligned", "dcp_resume", "full_state"], out)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, two_ranks):
    out = tmp_path_factory.mktemp("fsdp1")
    shutil.copytree(two_ranks[1] / "dcp", out / "dcp")
    return launch(1, ["dcp_resume"], out)


@pytest.mark.parametrize("ranks", ["two_ranks", "three_ranks"])
def test_shards_of_whole_blocks_give_the_one_process_update(ranks, request):
    results = request.getfixturevalue(ranks)
    results = results[0] if ranks == "two_ranks" else results
    rows = [result["ndb"]["local_rows"][-1] for result in results["equal"]]
    assert rows == ([16, 15] if ranks == "two_ranks" else [16, 16, 14])  # uneven shards, whole blocks
    for result in results["equal"]:
        for method, tolerance in (("ndb", 0.0), ("eigh", 1e-6)):
            run = result[method]
            assert run["warnings"] == []
            assert run["stats"]["bytes_per_refresh"] == 0  # no exchange of DASH's own
            for name, expected in run["reference"].items():
                torch.testing.assert_close(run["params"][name], expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("ranks", ["two_ranks", "three_ranks"])
def test_shards_that_cut_blocks_run_finite_and_checkpoint_per_element(ranks, request):
    results = request.getfixturevalue(ranks)
    results = results[0] if ranks == "two_ranks" else results
    for result in results["unaligned"]:
        assert result["finite"]
        assert all(change > 0 for change in result["moved"].values()), result["moved"]
        messages = " ".join(result["warnings"])
        assert "shard boundaries cut through blocks" in messages
        assert "the factors restart when loaded" in messages
        assert "their factors restart from zero" in messages
        keys = result["saved_keys"]
        assert "left.0" in keys["parts.a.weight"]  # whole blocks: the one-process layout
        assert keys["parts.u.weight"] == ["grad_ema", "moment", "shape", "step"]  # per element
        everything = ["grad_ema", "left", "left_root", "moment", "right", "right_root", "shape", "step"]
        assert result["restored"]["a"] == everything
        assert result["restored"]["u"] == ["grad_ema", "moment", "shape", "step"]  # factors restarted


def test_distributed_checkpoint_saved_at_two_ranks_resumes_at_one_two_and_three(
    two_ranks, three_ranks, one_rank
):
    uninterrupted = two_ranks[0]["dcp_save"][0]["params"]
    resumed = {2: two_ranks[0]["dcp_resume"], 3: three_ranks["dcp_resume"], 1: one_rank["dcp_resume"]}
    for world, results in resumed.items():
        for result in results:
            # DCP's state-initialising step (lr 0, zero gradients) did not count as a step.
            assert result["steps_after_load"] == [3]
            for name, expected in uninterrupted.items():
                # NDB at every world size: bitwise (see the module docstring).
                assert torch.equal(result["params"][name], expected), (world, name)


@pytest.mark.parametrize("ranks", ["two_ranks", "three_ranks"])
def test_full_state_dict_is_the_one_process_state_and_loads_back(ranks, request):
    results = request.getfixturevalue(ranks)
    results = results[0] if ranks == "two_ranks" else results
    for result in results["full_state"]:
        assert result["full_equal"]  # gathered on rank 0: the one-process state dict, bitwise
        for name, expected in result["reference"].items():
            assert torch.equal(result["broadcast"][name], expected), name  # broadcast_from_rank0
            assert torch.equal(result["direct"][name], expected), name  # one-process state dict


def test_hsdp_replicas_and_shards_give_the_one_process_update(tmp_path):
    (result, *others) = launch(4, ["hsdp"], tmp_path)["hsdp"]
    assert result["placements"][0] == "(Replicate(), Shard(dim=0))"
    for run in (result, *others):
        for name, expected in run["reference"].items():
            assert torch.equal(run["params"][name], expected), name


def test_placements_other_than_row_shards_are_refused_by_name(tmp_path):
    script = """
import os, tempfile
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from dash_shampoo import DASH
init = "file://" + os.path.join(tempfile.mkdtemp(), "i")
dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
ok = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
bad = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(1)]))
try:
    DASH([ok, bad], lr=0.1)
except ValueError as error:
    print(error)
dist.destroy_process_group()
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parameter 1 of the group is a DTensor with placements (Shard(dim=1),)" in done.stdout
    assert "not Shard(dim=1) (tensor parallelism or partial sums)" in done.stdout


@pytest.mark.parametrize("mesh_shape", [(1,), (2,), (3,), (4,), (2, 2), (2, 3)])
@pytest.mark.parametrize("rows", [1, 5, 7, 20, 48])
def test_shard_rows_are_the_rows_a_dtensor_holds(mesh_shape, rows):
    """DASH's own chunk arithmetic (no process group needed) against DTensor's, for every coordinate."""
    import itertools

    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    from dash_shampoo.distributed import shard_rows

    placements_list = [[Shard(0)] * len(mesh_shape)]
    if len(mesh_shape) == 2:
        placements_list.append([Replicate(), Shard(0)])
    for placements in placements_list:
        for coordinate in itertools.product(*(range(n) for n in mesh_shape)):
            shape, offset = _compute_local_shape_and_global_offset(
                (rows, 3), mesh_shape, list(coordinate), placements
            )
            first, count = shard_rows(rows, mesh_shape, coordinate, placements)
            assert count == shape[0] and (count == 0 or first == offset[0])  # an empty shard has no place


def test_a_shards_blocks_are_placed_among_the_full_blocks():
    from dash_shampoo.blocking import Blocking

    full = Blocking.build((40, 13), 7, "shampoo")  # regions: 5x1 (7,7), 5x1 (7,6), (5,7), (5,6)
    shard = Blocking.build((12, 13), 7, "shampoo", full_shape=(40, 13))  # rows 28..40
    assert shard.places_in(full, 28) == [(0, 4), (1, 4), (2, 0), (3, 0)]
    assert Blocking.build((14, 13), 7, "shampoo", full_shape=(40, 13)).places_in(full, 14) == [(0, 2), (1, 2)]
    cut = Blocking.build((20, 13), 7, "shampoo", full_shape=(40, 13))  # rows 20..40 cut a block
    assert cut.places_in(full, 20) == [None, None, None, None]
    one_row = Blocking.build((1, 20), 8, "shampoo", full_shape=(5, 20))
    assert one_row.matrix_shape == (1, 20)  # a row of the matrix, not a vector
