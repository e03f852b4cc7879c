"""DASH with Lightning: one process, or DDP under ``torchrun``.

    python examples/lightning_trainer.py --out /tmp/pl
    torchrun --nproc_per_node 2 examples/lightning_trainer.py --out /tmp/pl --stop-after 1   # DDP
    torchrun --nproc_per_node 2 examples/lightning_trainer.py --out /tmp/pl --resume

``configure_optimizers`` returns DASH like any ``torch.optim`` optimizer. Checkpoints hold
``optimizer.state_dict()``, which is DASH's whole state on every rank, so it does not matter which
rank writes them. The model is a tiny causal language model on random tokens; replace it and the
data with yours.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch

from dash_shampoo import DASH
from dash_shampoo.distributed import exit_without_finalizing


class TinyLM(L.LightningModule):
    def __init__(self, vocab: int = 64, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.hidden = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab)
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, index: int) -> torch.Tensor:
        logits = self.head(torch.tanh(self.hidden(self.embed(batch))))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # block_size and the refresh period suit this tiny model; the defaults suit LLMs.
        return DASH(self.parameters(), lr=3e-3, block_size=32, precondition_frequency=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of 3 steps")
    parser.add_argument("--stop-after", type=int, help="stop after this many epochs, saving <out>/last.ckpt")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.ckpt")
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)
    # Three batches an epoch. Stop at an epoch's end: a run stopped mid-epoch resumes with a new
    # pass over a plain DataLoader, not at the batch where it stopped.
    tokens = torch.randint(
        64, (12 * int(os.environ.get("WORLD_SIZE", 1)), 16), generator=torch.Generator().manual_seed(0)
    )
    data = torch.utils.data.DataLoader(tokens, batch_size=4, shuffle=False)
    model = TinyLM()
    world = int(os.environ.get("WORLD_SIZE", 1))
    trainer = L.Trainer(
        accelerator="cpu" if not torch.cuda.is_available() else "auto",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        max_epochs=args.stop_after or args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data, ckpt_path=str(args.out / "last.ckpt") if args.resume else None)
    if args.stop_after:
        trainer.save_checkpoint(args.out / "last.ckpt")  # every rank calls it; rank 0 writes
    if trainer.is_global_zero:
        summary = {"world_size": world, "losses": model.losses, "step": trainer.global_step}
        print("RESULT", json.dumps(summary))
    if torch.distributed.is_initialized():
        # Lightning leaves the process group open, and a gloo group open at exit, or a gloo worker
        # thread still releasing its last collective while the interpreter finalizes, can abort the
        # process ("terminate called without an active exception"; a PyTorch teardown race): close
        # it once all ranks are done and end without the interpreter's teardown.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        exit_without_finalizing(0)


if __name__ == "__main__":
    main()
