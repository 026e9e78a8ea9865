"""Exact resume in a plain PyTorch training loop.

Run it, stop it at any step (here on purpose with --stop-after, or with Ctrl-C / a kill),
run the same command again: it continues from the last save point and ends with
bit-identical weights to a run that was never interrupted.

    python examples/resume_plain_loop.py --run runs/plain --steps 40 --stop-after 17
    python examples/resume_plain_loop.py --run runs/plain --steps 40   # resumes at 17

Preemption: SIGTERM or SIGUSR1 (what Kubernetes and SLURM send before they kill a job)
makes the loop take an emergency save point at the end of the current step and exit with
code 75; running the command again resumes there, exactly.

What makes it exact: savepoints restores the weights, AdamW's state, the warmup
schedule and every RNG (Python, NumPy, torch; dropout draws from torch's), and the loop
saves its data position (epoch, batch) as user state. The shuffle order of each epoch
comes from a generator seeded by the epoch, so the loop can skip to the saved batch.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from savepoints import Keep, SavePoints
from savepoints.preemption import Preemption

VOCAB, CLASSES, SEQ, N_EXAMPLES, BATCH = 200, 3, 12, 64, 8


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(VOCAB, 32)
        self.hidden = nn.Linear(32, 64)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(64, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.relu(self.hidden(self.embed(tokens)))))


def dataset(seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (N_EXAMPLES, SEQ), generator=g)
    y = (x[:, 0] % CLASSES).long()  # learnable: the label hides in the first token
    return x, y


def warmup_then_linear(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run", required=True, help="run folder for the save points")
    ap.add_argument("--steps", type=int, default=40, help="total optimizer steps")
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument(
        "--stop-after", type=int, help="save and exit after this step (a planned interruption)"
    )
    ap.add_argument("--out", help="write the final weights here (safetensors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--deadline", type=float, default=25.0, help="seconds to save after SIGTERM/SIGUSR1"
    )
    ap.add_argument(
        "--snapshot",
        choices=["eager", "deferred"],
        help="copy the state before save() returns (eager, the default) or while the next "
        "step computes (deferred)",
    )
    ap.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step")
    ap.add_argument("--freeze-embeddings", action="store_true", help="train all but the embedding")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    model = Classifier()
    if args.freeze_embeddings:
        model.embed.requires_grad_(False)  # frozen: stored once, never copied again
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.01)
    scheduler = warmup_then_linear(optimizer, warmup=5, total=args.steps)
    x, y = dataset()
    batches_per_epoch = N_EXAMPLES // BATCH
    if batches_per_epoch % args.accumulate:
        ap.error(f"--accumulate must divide the {batches_per_epoch} batches of an epoch")

    with (
        SavePoints(args.run, keep=Keep(last=2), snapshot=args.snapshot) as points,
        Preemption(deadline=args.deadline) as preemption,
    ):
        step, epoch, batch = 0, 0, 0
        if points.latest() is not None:
            state = points.restore(model=model, optimizer=optimizer, scheduler=scheduler)
            step, epoch, batch = state["step"], state["epoch"], state["batch"]
            print(
                f"# resumed from save point at step {step} (epoch {epoch}, batch {batch})",
                file=sys.stderr,
            )

        model.train()
        while step < args.steps:
            order = torch.randperm(
                N_EXAMPLES, generator=torch.Generator().manual_seed(1000 + epoch)
            )
            while batch < batches_per_epoch and step < args.steps:
                optimizer.zero_grad()
                for _ in range(args.accumulate):
                    idx = order[batch * BATCH : (batch + 1) * BATCH]
                    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                    (loss / args.accumulate).backward()
                    batch += 1
                optimizer.step()
                scheduler.step()
                step += 1
                print(json.dumps({"step": step, "loss": loss.item()}), flush=True)
                points.log(step, loss=loss.item())  # the curve `savepoints report` draws
                stop = step == args.stop_after or preemption.requested
                if step % args.save_every == 0 or stop:
                    points.save(
                        step,
                        model=model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        metrics={"train_loss": loss.item()},
                        state={"step": step, "epoch": epoch, "batch": batch},
                    )
                if preemption.requested:
                    preemption.exit(points)  # exit code 75 once the save point is committed
                if step == args.stop_after:
                    print(f"# stopping after step {step}; run again to resume", file=sys.stderr)
                    return 0
            epoch, batch = epoch + 1, 0

    if args.out:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
