"""The Hugging Face Trainer and Lightning recipes in examples/, in one process and under torchrun
with 2 gloo ranks (DDP): they train, checkpoint from rank 0 (no collective in DASH's state_dict,
so nothing deadlocks), and a run resumed from the half-way checkpoint logs the losses of the
uninterrupted run bitwise. Skipped when transformers / lightning are not installed
(``pip install -e ".[integrations]"``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, out: Path, *options: str, ranks: int = 1) -> dict:
    """Run an example (under torchrun with ``ranks`` > 1); returns the RESULT line rank 0 prints."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [*launcher, str(EXAMPLES / script), "--out", str(out), *options]
    # A session of its own, so a timeout kills torchrun's workers too, not only torchrun.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{script} {' '.join(options)} ran past 240 s\n{stdout[-3000:]}{stderr[-3000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    (line,) = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("ranks", [1, 2])
def test_hf_trainer_saves_and_resumes_exactly(tmp_path: Path, ranks: int) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    whole = run("hf_trainer.py", tmp_path, ranks=ranks)
    assert whole["world_size"] == ranks and whole["step"] == 6 and len(whole["losses"]) == 6
    assert (tmp_path / "checkpoint-3" / "optimizer.pt").exists()
    shutil.rmtree(tmp_path / "checkpoint-6")  # resume from step 3
    resumed = run("hf_trainer.py", tmp_path, "--resume", ranks=ranks)
    assert resumed["losses"] == whole["losses"]


@pytest.mark.parametrize("ranks", [1, 2])
def test_lightning_saves_and_resumes_exactly(tmp_path: Path, ranks: int) -> None:
    pytest.importorskip("lightning")
    whole = run("lightning_trainer.py", tmp_path / "whole", ranks=ranks)
    assert whole["world_size"] == ranks and whole["step"] == 6
    first = run("lightning_trainer.py", tmp_path, "--stop-after", "1", ranks=ranks)
    resumed = run("lightning_trainer.py", tmp_path, "--resume", ranks=ranks)
    assert first["losses"] + resumed["losses"] == whole["losses"]
