"""A Trainer fine-tune used by test_transformers.py, run as its own process.

    python tests/trainer_run.py --tokenizer DIR --run RUN --out W.safetensors [--stop-at K]

Trains a tiny GPT-2 classifier on real tweets (dropout, shuffling, gradient accumulation
2, warmup; the position embeddings frozen, so incremental snapshots reuse them) with a
SavePointsCallback; resumes from the run's latest save point if it has one. Writes the
final weights and the logged losses.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from savepoints import SavePoints
from savepoints.transformers import SavePointsCallback, resume_path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tweeteval" / "sentiment"
LABELS = ["negative", "neutral", "positive"]


def load_rows(split: str, n: int) -> list[tuple[str, int]]:
    with open(DATA / f"{split}.csv", newline="", encoding="utf-8") as f:
        rows = [(r["text"], LABELS.index(r["label"])) for r in csv.DictReader(f)]
    return rows[:n]


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows, tokenizer) -> None:
        enc = tokenizer([t for t, _ in rows], truncation=True, max_length=32, padding="max_length")
        self.items = [
            {
                "input_ids": enc["input_ids"][i],
                "attention_mask": enc["attention_mask"][i],
                "labels": y,
            }
            for i, (_, y) in enumerate(rows)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {k: torch.tensor(v) for k, v in self.items[i].items()}


class StopAt(TrainerCallback):
    """An interruption: save at step k, then stop as if the job had been preempted."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


class SignalDuring(TrainerCallback):
    """A preemption: the scheduler's signal lands while optimizer step k runs."""

    def __init__(self, step: int, name: str) -> None:
        self.step, self.signal = step, getattr(signal, name)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), self.signal)


def accuracy(pred) -> dict:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stop-at", type=int)
    ap.add_argument("--load-best", action="store_true")
    ap.add_argument("--save-total-limit", type=int)
    ap.add_argument("--save-strategy", default="steps")
    ap.add_argument("--async-save", action="store_true")
    ap.add_argument("--snapshot", choices=["eager", "deferred"])
    ap.add_argument(
        "--plain",
        action="store_true",
        help="plain Trainer: no savepoints, checkpoint-N folders in --run",
    )
    ap.add_argument("--signal-during", type=int, help="send --signal to itself in step K")
    ap.add_argument("--signal", default="SIGTERM")
    ap.add_argument("--resume-from", help="resume from this folder instead of the run's latest")
    args = ap.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(
        GPT2Config(
            n_layer=2,
            n_head=2,
            n_embd=32,
            n_positions=64,
            vocab_size=len(tokenizer),
            num_labels=3,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    model.transformer.wpe.requires_grad_(False)  # frozen: saved once, never copied again
    training_args = TrainingArguments(
        output_dir=args.run if args.plain else str(Path(args.run).parent / "hf-output"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=3,
        learning_rate=2e-3,
        warmup_steps=3,
        save_strategy=args.save_strategy,
        save_steps=4,
        eval_strategy="steps",
        eval_steps=4,
        logging_steps=1,
        metric_for_best_model="accuracy",
        load_best_model_at_end=args.load_best,
        save_total_limit=args.save_total_limit,
        seed=42,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    points = None if args.plain else SavePoints(args.run)
    callbacks: list = (
        []
        if points is None
        else [SavePointsCallback(points, async_save=args.async_save, snapshot=args.snapshot)]
    )
    if args.stop_at:
        callbacks.append(StopAt(args.stop_at))
    if args.signal_during:
        callbacks.append(SignalDuring(args.signal_during, args.signal))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Rows(load_rows("train", 64), tokenizer),
        eval_dataset=Rows(load_rows("validation", 32), tokenizer),
        processing_class=tokenizer,
        compute_metrics=accuracy,
        callbacks=callbacks,
    )
    resume = args.resume_from or (resume_path(points) if points else None)
    if resume:
        print(f"# resuming from {resume}", file=sys.stderr)
    trainer.train(resume_from_checkpoint=resume)
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()},
        args.out,
    )
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    print(json.dumps({"losses": losses, "best": trainer.state.best_model_checkpoint}))
    if points is not None:
        points.close()


if __name__ == "__main__":
    main()
