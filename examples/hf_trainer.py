"""DASH with the Hugging Face ``Trainer``: one process, or DDP under ``torchrun``.

    python examples/hf_trainer.py --out /tmp/hf
    torchrun --nproc_per_node 2 examples/hf_trainer.py --out /tmp/hf        # DDP (gloo on a CPU)
    torchrun --nproc_per_node 2 examples/hf_trainer.py --out /tmp/hf --resume   # from the last checkpoint

The ``Trainer`` saves ``optimizer.state_dict()`` from the main process alone; DASH's state is whole
on every rank, so that is the full state and nothing waits for the other ranks. The model is a
tiny causal language model on random tokens, so the recipe runs anywhere in seconds; replace it
and the data set with yours.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import Trainer, TrainingArguments

from dash_shampoo import DASH
from dash_shampoo.distributed import exit_without_finalizing


class TinyLM(torch.nn.Module):
    """Embedding, one hidden layer, a head; returns ``{"loss": ...}`` as the ``Trainer`` expects."""

    def __init__(self, vocab: int = 64, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.hidden = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(torch.tanh(self.hidden(self.embed(input_ids))))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return {"loss": loss}


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, count: int = 64, length: int = 16, vocab: int = 64) -> None:
        self.tokens = torch.randint(vocab, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the Trainer's output_dir")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TinyLM()
    # block_size and the refresh period suit this tiny model; the defaults suit LLMs.
    optimizer = DASH(model.parameters(), lr=3e-3, block_size=32, precondition_frequency=2)
    training = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=4,
        save_steps=args.steps // 2,
        logging_steps=1,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=RandomTokens(), optimizers=(optimizer, None))
    trainer.train(resume_from_checkpoint=args.resume or None)
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        world = int(os.environ.get("WORLD_SIZE", 1))
        summary = {"world_size": world, "losses": losses, "step": trainer.state.global_step}
        print("RESULT", json.dumps(summary))
    if torch.distributed.is_initialized():
        # A gloo group open at exit, or a gloo worker thread still releasing its last collective
        # while the interpreter finalizes, can abort the process ("terminate called without an
        # active exception"; a PyTorch teardown race): close the group once every rank is done and
        # end without the interpreter's teardown.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        exit_without_finalizing(0)


if __name__ == "__main__":
    main()
