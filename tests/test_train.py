"""The training command: model shapes, data loaders, a few-step comparison, bitwise resume, errors."""

from __future__ import annotations

import argparse
import array
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dash_shampoo import DASH
from dash_shampoo.models import Llama, ModelConfig, model_config
from dash_shampoo.train import data, report, runtime, trainer

# A 2-layer d=32 model on a small slice of the built-in corpus: a few steps take a second.
SMALL = ["--d-model", "32", "--n-layer", "2", "--n-head", "2", "--seq-len", "32", "--batch-size", "4"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these models are tiny, and on a busy machine thread barriers dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One corpus cache for the whole module (assembling it reads the standard library once)."""
    return tmp_path_factory.mktemp("corpus-cache")


def small_args(cache: Path, *extra: str) -> list[str]:
    return [*SMALL, "--corpus-bytes", "60000", "--cache-dir", str(cache), "--eval-batches", "2", *extra]


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def test_named_sizes_follow_llama_shapes() -> None:
    assert model_config("124m").hidden == 2048  # 8/3 * 768 rounded up to a multiple of 256
    assert model_config("350m").hidden == 2816
    assert model_config("tiny").hidden == 384
    assert model_config("tiny", vocab_size=32000).padded_vocab == 32000
    assert ModelConfig(vocab_size=50257).padded_vocab == 50304
    with pytest.raises(ValueError, match="--model"):
        model_config("huge")
    with pytest.raises(ValueError, match="divisible by n_head"):
        model_config("tiny", n_head=3)


def test_model_is_causal_and_untied() -> None:
    config = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, seq_len=16, multiple_of=16)
    model = Llama(config, torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 64
    logits, logits_changed = model(tokens), model(changed)
    assert logits.shape == (2, 16, 64)
    torch.testing.assert_close(logits[:, :10], logits_changed[:, :10])  # the past ignores the future
    assert not torch.allclose(logits[:, 10:], logits_changed[:, 10:])
    assert model.embedding.weight.data_ptr() != model.head.weight.data_ptr()
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())
    # Same seed, same weights: every optimizer of a comparison starts from the same model.
    again = Llama(config, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def test_builtin_corpus_is_deterministic_and_split(cache_dir: Path) -> None:
    first = data.load_corpus(cache_dir, 50_000)
    second = data.load_corpus(cache_dir, 50_000)
    assert first.vocab_size == 256 and first.train.dtype == torch.uint8
    assert len(first.train) == 45_000 and len(first.val) == 5_000
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert bytes(first.train[:7].tolist()) == b"# ==== "
    names = [p.as_posix() for p in data.corpus_files()]
    assert not any("/test/" in n or "/tests/" in n or "site-packages" in n for n in names)
    with pytest.raises(ValueError, match="--corpus-bytes"):
        data.load_corpus(cache_dir, 10)


def test_bin_loader_reads_uint16_windows(tmp_path: Path) -> None:
    train_ids = torch.arange(1000, dtype=torch.int64) * 37 % 50000
    val_ids = torch.arange(300, dtype=torch.int64) * 11 % 50000
    (tmp_path / "train.bin").write_bytes(array.array("H", train_ids.tolist()).tobytes())  # little-endian host
    (tmp_path / "val.bin").write_bytes(array.array("H", val_ids.tolist()).tobytes())
    tokens = data.load_bin(tmp_path, vocab_size=50000)
    assert len(tokens.train) == 1000 and len(tokens.val) == 300
    x, y = data.train_batch(tokens, step=3, batch_size=5, seq_len=16, seed=7)
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
    for row_x, row_y in zip(x, y):  # each row is a contiguous window; targets are shifted inputs
        start = int(torch.nonzero(train_ids == row_x[0])[0])
        assert torch.equal(row_x, train_ids[start : start + 16])
        assert torch.equal(row_y, train_ids[start + 1 : start + 17])
    again, _ = data.train_batch(tokens, step=3, batch_size=5, seq_len=16, seed=7)
    other, _ = data.train_batch(tokens, step=4, batch_size=5, seq_len=16, seed=7)
    assert torch.equal(x, again) and not torch.equal(x, other)
    batches = data.val_batches(tokens, count=2, batch_size=3, seq_len=16)
    assert len(batches) == 2 and torch.equal(batches[0][0][0], val_ids[:16])
    with pytest.raises(ValueError, match="--vocab-size"):
        data.train_batch(data.load_bin(tmp_path, vocab_size=100), 0, 4, 16, 0)


def test_bin_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        data.load_bin(tmp_path / "absent", 100)
    (tmp_path / "train.bin").write_bytes(b"\x01\x00" * 10)
    with pytest.raises(FileNotFoundError, match=r"missing val\.bin"):
        data.load_bin(tmp_path, 100)
    (tmp_path / "val.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match=r"val\.bin has 3 bytes"):
        data.load_bin(tmp_path, 100)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def test_smoke_comparison_writes_results(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "results"
    args = small_args(cache_dir, "--steps", "4", "--eval-every", "2", "--block-size", "16")
    assert trainer.main([*args, "--compare", "adamw,dash", "--out", str(out)]) == 0
    unstacked_run = ["--optimizer", "dash", "--stacking", "none", "--name", "none"]  # formerly "shampoo"
    assert trainer.main([*args, *unstacked_run, "--out", str(out)]) == 0
    document = json.loads((out / "train-cpu.json").read_text())
    unstacked = json.loads((out / "none.json").read_text())["results"][0]
    assert [r["optimizer"] for r in document["results"]] == ["adamw", "dash"]
    assert document["command"].startswith("python -m dash_shampoo.train")
    for result in [*document["results"], unstacked]:
        assert [e["step"] for e in result["evals"]] == [0, 2, 4]
        assert result["final_val_loss"] < result["evals"][0]["val_loss"]  # it learns something
        assert result["root_failures"] == 0 and not result["diverged"]
    dash = document["results"][1]
    assert dash["options"]["stacking"] == "global" and unstacked["options"]["stacking"] == "none"
    # Stacking does not change the update: DASH and its sequential baseline train alike.
    assert dash["final_val_loss"] == pytest.approx(unstacked["final_val_loss"], abs=1e-4)
    table = (out / "train-cpu.md").read_text()
    assert "| optimizer | lr |" in table and "| dash |" in table and "stacking=global" in table
    pytest.importorskip("matplotlib")
    assert (out / "train-cpu.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["dash", "adamw", "muon"])
def test_resume_matches_an_uninterrupted_run_bitwise(tmp_path: Path, cache_dir: Path, name: str) -> None:
    common = small_args(
        cache_dir, "--optimizer", name, "--steps", "6", "--eval-every", "3", "--precondition-frequency", "2"
    )
    common += ["--block-size", "16"]
    whole, first, second = tmp_path / "whole.pt", tmp_path / "first.pt", tmp_path / "second.pt"
    assert trainer.main([*common, "--checkpoint", str(whole), "--out", str(tmp_path / "a")]) == 0
    assert trainer.main([*common, "--checkpoint", str(first), "--stop-after", "3"]) == 0
    assert not (tmp_path / "b").exists()
    resumed = [*common, "--resume", str(first), "--checkpoint", str(second), "--out", str(tmp_path / "b")]
    assert trainer.main(resumed) == 0
    reference = torch.load(whole, weights_only=True)
    again = torch.load(second, weights_only=True)
    assert reference["step"] == again["step"] == 6
    assert reference["train_losses"] == again["train_losses"]  # bitwise: floats compared exactly
    for key, tensor in reference["model"].items():
        assert torch.equal(tensor, again["model"][key]), key
    a = json.loads((tmp_path / "a" / "train-cpu.json").read_text())["results"][0]
    b = json.loads((tmp_path / "b" / "train-cpu.json").read_text())["results"][0]
    assert a["evals"][-1]["val_loss"] == b["evals"][-1]["val_loss"]


@pytest.mark.parametrize(
    ("extra", "option"),
    [
        (["--compare", "adamw,sgd"], "--compare"),
        (["--optimizer", "dash", "--compare", "adamw"], "--compare"),
        (["--lr", "fast"], "--lr"),
        (["--lr", "adamw=1e-3,lion=1e-4"], "--lr"),
        (["--steps", "0"], "--steps"),
        (["--warmup", "2.5"], "--warmup"),
        (["--block-size", "0"], "--block-size"),
        (["--resume", "/nonexistent/ckpt.pt", "--optimizer", "dash"], "--resume"),
        (["--checkpoint", "x.pt"], "--checkpoint"),
        (["--seq-len", "100000"], "--seq-len"),
        (["--data", "/nonexistent/data"], "--data"),
        (["--n-head", "3"], "n_head"),
    ],
)
def test_bad_options_fail_naming_the_option(
    cache_dir: Path, capsys: pytest.CaptureFixture[str], extra: list[str], option: str
) -> None:
    assert re.search(option, usage_error(capsys, [*small_args(cache_dir, "--steps", "2"), *extra]))


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The error that ``trainer.main(argv)`` exits with: the trainer's ``SystemExit`` message, or the
    ``prog: error: ...`` line that argparse prints after the usage text."""
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(argv)
    code = exit_info.value.code
    assert code not in (0, None)
    return code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--compare", "adamw,shampoo"],
            "argument --compare: unknown optimizer 'shampoo'; choose from adamw, muon, soap, dash",
        ),
        (["--optimizer", "shampoo"], "argument --optimizer: invalid choice: 'shampoo'"),
        (["--compare", "dash,dash"], "argument --compare: lists an optimizer twice: 'dash,dash'"),
        (["--steps", "1.5"], "argument --steps: must be a whole number >= 1; got '1.5'"),
        (["--seed", "-1"], "argument --seed: must be a whole number >= 0; got '-1'"),
        (["--grad-clip", "-1"], "argument --grad-clip: must be a finite number >= 0; got '-1'"),
        (["--weight-decay", "nan"], "argument --weight-decay: must be a finite number >= 0; got 'nan'"),
        (["--warmup", "-0.5"], "argument --warmup: must be a finite number >= 0; got '-0.5'"),
        (["--lr", "dash=-1"], "argument --lr: must be a positive number, or 'name=value,...' pairs"),
        (["--lr", "0"], "argument --lr: must be a positive number"),
        (["--warmup", "3"], "--warmup 3 is longer than --steps 2"),
        (["--stop-after", "1"], "--stop-after needs --checkpoint"),
    ],
)
def test_bad_options_say_what_is_allowed(
    cache_dir: Path, capsys: pytest.CaptureFixture[str], extra: list[str], expected: str
) -> None:
    assert expected in usage_error(capsys, [*small_args(cache_dir, "--steps", "2"), *extra])


def test_resume_refuses_a_different_run(tmp_path: Path, cache_dir: Path) -> None:
    checkpoint = tmp_path / "ckpt.pt"
    common = small_args(cache_dir, "--optimizer", "adamw", "--steps", "2")
    assert trainer.main([*common, "--checkpoint", str(checkpoint), "--stop-after", "1"]) == 0
    with pytest.raises(SystemExit, match="--batch-size"):
        trainer.main([*common, "--batch-size", "2", "--resume", str(checkpoint)])
    with pytest.raises(SystemExit, match="saved by optimizer 'adamw'"):
        trainer.main(
            [*small_args(cache_dir, "--optimizer", "dash", "--steps", "2"), "--resume", str(checkpoint)]
        )


def test_two_ranks_under_torchrun_then_resume_at_one(tmp_path: Path, cache_dir: Path) -> None:
    """torchrun with 2 gloo ranks (DDP, DASH sharing its roots) stops cleanly at step 2; its
    checkpoint (optimizer state gathered from both ranks) finishes the run in one process."""
    checkpoint = tmp_path / "half.pt"
    common = small_args(
        cache_dir, "--optimizer", "dash", "--block-size", "16", "--precondition-frequency", "2"
    )
    common += ["--steps", "4", "--eval-every", "2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "dash_shampoo.train", *common, "--checkpoint", str(checkpoint), "--stop-after", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "device cpu x2" in done.stderr
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] == 2 and len(saved["train_losses"]) == 2
    assert trainer.main([*common, "--resume", str(checkpoint), "--out", str(tmp_path / "one")]) == 0
    result = json.loads((tmp_path / "one" / "train-cpu.json").read_text())["results"][0]
    assert result["steps"] == 4 and [e["step"] for e in result["evals"]] == [0, 2, 4]
    assert result["final_val_loss"] < result["evals"][0]["val_loss"] and result["root_failures"] == 0


def test_fsdp_under_torchrun_resumes_bitwise_and_at_one(tmp_path: Path, cache_dir: Path) -> None:
    """--parallel fsdp with 2 gloo ranks: the checkpoint (gathered to the one-process layout) resumes
    under FSDP2 to the uninterrupted run's losses bitwise (block size 16 divides every shard's
    rows), and finishes the run in one process."""
    common = small_args(
        cache_dir, "--optimizer", "dash", "--block-size", "16", "--precondition-frequency", "2"
    )
    common += ["--steps", "4", "--eval-every", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def fsdp(*extra: str) -> None:
        command = [*torchrun, "-m", "dash_shampoo.train", *common, "--parallel", "fsdp", *extra]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "cut through blocks" not in done.stderr  # every shard holds whole blocks

    checkpoint = tmp_path / "half.pt"
    fsdp("--out", str(tmp_path / "whole"))
    fsdp("--checkpoint", str(checkpoint), "--stop-after", "2", "--out", str(tmp_path / "half"))
    fsdp("--resume", str(checkpoint), "--out", str(tmp_path / "resumed"))
    whole, resumed = (
        json.loads((tmp_path / d / "train-cpu.json").read_text())["results"][0] for d in ("whole", "resumed")
    )
    assert resumed["train_losses"] == whole["train_losses"] and len(whole["train_losses"]) == 4
    saved = torch.load(checkpoint, weights_only=True)
    assert isinstance(saved["optimizer"]["state"]["embedding.weight"]["left.0"], torch.Tensor)
    assert trainer.main([*common, "--resume", str(checkpoint), "--out", str(tmp_path / "one")]) == 0


# ----------------------------------------------------------------------------------------------
# Optimizers and runtime helpers
# ----------------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    trainer.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_optimizer_factory_builds_each_name() -> None:
    model = trainer.Llama(trainer.model_config("tiny", vocab_size=64, n_layer=1))
    # no "shampoo": that is --stacking none
    assert list(trainer.OPTIMIZERS) == ["adamw", "muon", "soap", "dash"]
    args = parse("--stacking", "none", "--block-size", "4", "--weight-decay", "0.1")
    adamw = trainer.OPTIMIZERS["adamw"].build(model, 1e-3, args)
    dash = trainer.OPTIMIZERS["dash"].build(model, 2e-3, args)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.1
    assert isinstance(dash, DASH) and dash.stacking == "none" and dash.defaults["block_size"] == 4
    assert dash.defaults["lr"] == 2e-3 and dash.defaults["betas"] == trainer.BETAS
    muon = trainer.OPTIMIZERS["muon"].build(model, 0.02, args)
    hidden = {id(p) for p in muon.muon.param_groups[0]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in hidden}
    assert names and all(name.startswith("blocks.") for name in names)  # embedding, head, norms: AdamW
    assert len(hidden) + len(muon.adamw.param_groups[0]["params"]) == len(list(model.parameters()))
    assert [g["lr"] for g in muon.param_groups] == [0.02, trainer.OPTIMIZERS["adamw"].default_lr]


def test_the_lr_sweep_goes_outwards_while_the_best_is_at_an_edge_then_adds_seeds() -> None:
    calls = []

    def train(name: str, lr: float, args: argparse.Namespace) -> dict:
        calls.append((lr, args.seed))
        loss = abs(math.log2(lr / 0.25)) + (0.1 if lr > 1 else 0)  # best at 0.25, diverges above 1
        return {"optimizer": name, "lr": lr, "final_val_loss": loss, "diverged": lr > 1}

    runs = trainer.train_runs("x", 1.0, parse("--lr-sweep", "--seeds", "3", "--seed", "5"), train)
    # 0.5, 1, 2, then 0.25 (best at the low edge), then 0.125 (the second and last extension).
    assert calls == [(0.5, 5), (1.0, 5), (2.0, 5), (0.25, 5), (0.125, 5), (0.25, 6), (0.25, 7)]
    assert [r["lr"] for r in runs] == [0.125, 0.25, 0.5, 1.0, 2.0, 0.25, 0.25]
    assert [r["best"] for r in runs] == [False, True, False, False, False, True, True]
    assert [r["seed"] for r in runs] == [5, 5, 5, 5, 5, 6, 7]
    assert trainer.train_runs("x", 0.25, parse(), train)[0]["lr"] == 0.25  # no sweep: one run


def test_an_optimizer_whose_package_is_missing_is_skipped(monkeypatch, capsys) -> None:
    monkeypatch.setattr(trainer.importlib.util, "find_spec", lambda name: None)
    assert trainer.available(["adamw", "soap"]) == ["adamw"]
    assert "skipping soap: it needs pytorch_optimizer" in capsys.readouterr().err


def test_learning_rates_per_optimizer() -> None:
    defaults = {name: choice.default_lr for name, choice in trainer.OPTIMIZERS.items()}
    assert trainer.learning_rates(parse()) == {name: defaults[name] for name in trainer.DEFAULT_COMPARE}
    assert trainer.learning_rates(parse("--lr", "1e-3")) == {"adamw": 1e-3, "dash": 1e-3}
    assert trainer.learning_rates(parse("--lr", "dash=2e-3")) == {"adamw": defaults["adamw"], "dash": 2e-3}
    assert trainer.learning_rates(parse("--optimizer", "dash", "--lr", "4e-3")) == {"dash": 4e-3}
    assert trainer.learning_rates(parse("--compare", "dash, adamw")) == {"dash": 3e-3, "adamw": 3e-3}
    with pytest.raises(ValueError, match="--lr names 'adamw', which is not trained in this run"):
        trainer.learning_rates(parse("--optimizer", "dash", "--lr", "adamw=1e-3"))


def test_progress_prints_every_few_steps_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    progress = runtime.Progress(enabled=True, every=2, tokens_per_step=100)
    # Steps of 0.5 s; the optimizer takes 0.01 s, except 0.3 s on the refresh steps 2 and 3.
    for step, opt in zip(range(1, 5), (0.01, 0.3, 0.3, 0.01)):
        progress.step(step, 10, 0.5, opt, f"step {step}")
    progress.line("done")
    runtime.Progress(enabled=False, every=1).line("not on this rank")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "step 2       200 tok/s  opt  155.0 ms mean (slowest 300)  ETA 0:04",
        "step 4       200 tok/s  opt  155.0 ms mean (slowest 300)  ETA 0:03",
        "done",
    ]


def test_single_process_runtime_and_peak_memory() -> None:
    threads = torch.get_num_threads()
    place = runtime.setup_runtime(threads=2)
    try:
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert place.main and place.rank == 0 and place.world_size == 1 and not place.owns_group
    place.synchronize()
    place.close()  # nothing to destroy
    device = torch.device("cpu")
    was_reset = runtime.reset_peak_memory(device)
    mib, kind = runtime.peak_memory(device, was_reset)
    assert mib > 1 and kind == ("process peak RSS during the run" if was_reset else "process peak RSS")


def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ckpt.pt"
    options = {"steps": 10, "data": None}
    runtime.save_checkpoint(path, {"optimizer_name": "dash", "options": options, "step": 3})
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no partial file left behind
    loaded = runtime.load_checkpoint(path, "dash", options)
    assert loaded["step"] == 3 and loaded["format"] == runtime.CHECKPOINT_FORMAT
    with pytest.raises(ValueError, match="saved by optimizer 'dash', this run trains 'adamw'"):
        runtime.load_checkpoint(path, "adamw", options)
    with pytest.raises(ValueError, match="trained with --steps 10, this run has 20"):
        runtime.load_checkpoint(path, "dash", {**options, "steps": 20})
    with pytest.raises(ValueError, match=r"--resume .*absent\.pt: no such file"):
        runtime.load_checkpoint(tmp_path / "absent.pt", "dash", options)
    torch.save({"step": 3}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dash-shampoo train checkpoint"):
        runtime.load_checkpoint(tmp_path / "other.pt", "dash", options)


def test_train_does_not_import_bench() -> None:
    code = "import sys, dash_shampoo.train.trainer; print([m for m in sys.modules if 'shampoo.bench' in m])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_result_document_is_strict_json_and_plots_past_a_nan(tmp_path: Path) -> None:
    evals = [
        {"step": 0, "val_loss": 5.5, "train_time_s": 0.0},
        {"step": 2, "val_loss": 3.0, "train_time_s": 1.0},
    ]
    evals += [
        {"step": 3, "val_loss": 2.5, "train_time_s": 1.5},
        {"step": 4, "val_loss": math.nan, "train_time_s": 2.0},
    ]
    run = {
        "optimizer": "dash",
        "lr": 1e-3,
        "evals": evals,
        "final_val_ppl": float("inf"),
        "betas": (0.9, 0.95),
    }
    document = report.finite(
        {"command": "x", "device": "cpu: test", "model": {"name": "tiny"}, "results": [run]}
    )
    result = document["results"][0]
    assert result["evals"][3]["val_loss"] is None and result["final_val_ppl"] is None
    assert result["evals"][1]["val_loss"] == 3.0 and result["betas"] == [0.9, 0.95]
    json.dumps(document, allow_nan=False)
    pytest.importorskip("matplotlib")
    assert report.plot(document, tmp_path / "plot.png") and (tmp_path / "plot.png").stat().st_size > 0
