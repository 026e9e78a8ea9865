"""Fine-tune GPT-2 for tweet classification with a plain Trainer and save points.

The scenario: checkpoint every epoch, keep the last two and the best by accuracy, resume
after a crash exactly where training stopped, then load the best model and predict.
Everything savepoints adds is the three marked lines; the rest is an ordinary Trainer
script.

    python examples/finetune_gpt2_tweets.py          # the sample shipped with savepoints
    python examples/finetune_gpt2_tweets.py --data my.csv --model gpt2   # your CSV, real GPT-2

Stop it at any moment (Ctrl-C, kill -9) and run it again: it resumes from the last
committed save point. Without --model it builds a small GPT-2 from a config and a BPE
tokenizer trained on the texts, so it runs offline in seconds.
"""

from __future__ import annotations

import argparse
import csv
import random

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    pipeline,
    set_seed,
)

from savepoints import SavePoints
from savepoints.cli.demo import sample_path
from savepoints.transformers import SavePointsCallback, resume_path


def read_csv(path: str) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def small_gpt2(texts: list[str], labels: list[str]):
    """A 2-layer GPT-2 and a byte-level BPE tokenizer trained on the texts: no download."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=2000,
            special_tokens=["<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    config = GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=128,
        n_positions=256,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    return GPT2ForSequenceClassification(config), tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=str(sample_path()), help="CSV with text,label columns")
    ap.add_argument("--model", help="e.g. gpt2, or a local folder (default: a small GPT-2)")
    ap.add_argument("--run", default="runs/gpt2-tweets")
    ap.add_argument("--epochs", type=float, default=4)
    args = ap.parse_args()

    set_seed(0)
    texts, names = read_csv(args.data)
    labels = sorted(set(names))
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    n_eval = len(order) // 5
    split = {"eval": order[:n_eval], "train": order[n_eval:]}

    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # GPT-2 has none
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
        )
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model, tokenizer = small_gpt2([texts[i] for i in split["train"]], labels)

    def dataset(indices: list[int]) -> list[dict]:
        enc = tokenizer([texts[i] for i in indices], truncation=True, max_length=64)
        return [
            {
                "input_ids": enc["input_ids"][j],
                "attention_mask": enc["attention_mask"][j],
                "labels": labels.index(names[i]),
            }
            for j, i in enumerate(indices)
        ]

    def accuracy(pred) -> dict:
        return {"accuracy": float(np.mean(pred.predictions.argmax(-1) == pred.label_ids))}

    training_args = TrainingArguments(
        output_dir=f"{args.run}/.savepoints/trainer",
        num_train_epochs=args.epochs,
        per_device_train_batch_size=8,
        learning_rate=1e-3 if not args.model else 5e-5,
        eval_strategy="epoch",
        save_strategy="epoch",  # a save point per epoch ...
        save_total_limit=2,  # ... keep the last two ...
        metric_for_best_model="accuracy",  # ... and the best by accuracy
        load_best_model_at_end=True,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    points = SavePoints(args.run)  # savepoints (1/3)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset(split["train"]),
        eval_dataset=dataset(split["eval"]),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        callbacks=[SavePointsCallback(points)],  # savepoints (2/3)
    )
    trainer.train(resume_from_checkpoint=resume_path(points))  # savepoints (3/3)

    best = points.best()
    print(f"\nbest save point: step {best.step}, accuracy {best.metrics['eval_accuracy']:.3f}")
    print(f"  {best.path}  (a normal model folder)")
    classify = pipeline("text-classification", model=str(best.path))
    for text in ["absolutely loved the concert!", "so disappointed with my flight"]:
        print(f"  {classify(text)[0]}  {text}")
    points.close()


if __name__ == "__main__":
    main()
