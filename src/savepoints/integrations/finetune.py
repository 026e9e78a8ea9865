"""Fine-tune a sequence classifier from a CSV/JSONL file, with save points.

The engine of ``savepoints train``: a plain ``transformers.Trainer`` plus
:class:`SavePointsCallback`, so every save point is a normal model folder and running the
same command again resumes exactly where the last one stopped.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from savepoints.errors import InvalidArgumentError
from savepoints.keep import Keep
from savepoints.manager import SavePoints

MetricName = Literal["accuracy", "macro_f1"]
TINY_GPT2 = dict(n_layer=2, n_head=4, n_embd=128, n_positions=256)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Everything ``savepoints train`` takes. Recorded in each save point's state."""

    train_file: str
    """CSV (header row) or JSONL file of examples."""
    run: str
    """Run folder for the save points."""
    eval_file: str | None = None
    """Evaluation examples; without it, ``eval_fraction`` of the training file is held out."""
    eval_fraction: float = 0.1
    text_column: str = "text"
    label_column: str = "label"
    model: str | None = None
    """A Transformers model id or local folder; None builds a small GPT-2 and a byte-level
    BPE tokenizer trained on the training texts (no download)."""
    epochs: float = 3.0
    batch_size: int = 16
    learning_rate: float = 5e-5
    max_length: int = 128
    warmup_ratio: float = 0.06
    gradient_accumulation: int = 1
    save_every: int | None = None
    """Save (and evaluate) every N optimizer steps; None saves once per epoch."""
    keep_last: int | None = None
    keep_best: int | None = None
    metric: MetricName = "accuracy"
    seed: int = 42
    max_train_examples: int | None = None
    max_eval_examples: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.eval_fraction < 1:
            raise InvalidArgumentError(
                f"eval fraction {self.eval_fraction} must be between 0 and 1.",
                "Pass e.g. --eval-fraction 0.1, or --eval FILE.",
            )
        if self.metric not in ("accuracy", "macro_f1"):
            raise InvalidArgumentError(
                f"metric {self.metric!r} is not known.", "Use 'accuracy' or 'macro_f1'."
            )
        for name in ("epochs", "batch_size", "learning_rate", "max_length"):
            if getattr(self, name) <= 0:
                raise InvalidArgumentError(f"{name} must be positive.", f"Pass a positive {name}.")


@dataclass
class Examples:
    texts: list[str]
    labels: list[int]
    label_names: list[str] = field(default_factory=list)


def read_examples(path: str | Path, text_column: str, label_column: str) -> list[tuple[str, Any]]:
    """(text, raw label) pairs from a CSV/TSV (with header) or JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(
            f"Data file {path} does not exist.", "Pass the path of a CSV or JSONL file."
        )
    rows: list[dict[str, Any]]
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InvalidArgumentError(
                            f"{path} line {n} is not valid JSON ({e.msg}).",
                            'Write one JSON object per line, e.g. {"text": ..., "label": ...}.',
                        ) from None
    else:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter=delimiter))
    if not rows:
        raise InvalidArgumentError(f"{path} holds no examples.", "Check the file.")
    missing = [c for c in (text_column, label_column) if c not in rows[0]]
    if missing:
        raise InvalidArgumentError(
            f"{path} has no column {', '.join(map(repr, missing))} (it has: "
            f"{', '.join(map(repr, rows[0]))}).",
            "Name the columns with --text-column and --label-column.",
        )
    return [(str(r[text_column]), r[label_column]) for r in rows]


def label_names_for(raw: Sequence[Any]) -> list[str]:
    """Label names in id order: integer labels keep their ids, names are sorted."""
    values = {str(v).strip() for v in raw}
    if all(v.lstrip("-").isdigit() for v in values):
        ids = sorted(int(v) for v in values)
        if ids[0] < 0:
            raise InvalidArgumentError("Label ids must be 0 or more.", "Renumber the labels.")
        return [str(i) for i in range(ids[-1] + 1)]
    return sorted(values)


def encode_labels(raw: Sequence[Any], names: list[str], source: str) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    out = []
    for value in raw:
        key = str(value).strip()
        if key not in index:
            raise InvalidArgumentError(
                f"{source} has label {key!r}, which the training data does not have "
                f"(labels: {', '.join(names)}).",
                "Use the same label names in the training and evaluation files.",
            )
        out.append(index[key])
    return out


def load_data(cfg: FinetuneConfig) -> tuple[Examples, Examples]:
    train_raw = read_examples(cfg.train_file, cfg.text_column, cfg.label_column)
    if cfg.eval_file:
        eval_raw = read_examples(cfg.eval_file, cfg.text_column, cfg.label_column)
    else:
        shuffled = list(train_raw)
        random.Random(cfg.seed).shuffle(shuffled)
        n_eval = max(1, int(len(shuffled) * cfg.eval_fraction))
        eval_raw, train_raw = shuffled[:n_eval], shuffled[n_eval:]
    if cfg.max_train_examples:
        train_raw = train_raw[: cfg.max_train_examples]
    if cfg.max_eval_examples:
        eval_raw = eval_raw[: cfg.max_eval_examples]
    names = label_names_for([y for _, y in train_raw])
    train = Examples(
        [t for t, _ in train_raw],
        encode_labels([y for _, y in train_raw], names, cfg.train_file),
        names,
    )
    evaluation = Examples(
        [t for t, _ in eval_raw],
        encode_labels([y for _, y in eval_raw], names, cfg.eval_file or cfg.train_file),
        names,
    )
    return train, evaluation


class _Encoded(torch.utils.data.Dataset):
    def __init__(self, examples: Examples, tokenizer: Any, max_length: int) -> None:
        self.enc = tokenizer(examples.texts, truncation=True, max_length=max_length)
        self.labels = examples.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.enc.items()}
        item["labels"] = self.labels[i]
        return item


def compute_metrics(pred: Any) -> dict[str, float]:
    """Accuracy and macro-F1 (without scikit-learn)."""
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    predicted = np.asarray(logits).argmax(-1)
    gold = np.asarray(pred.label_ids)
    f1s = []
    for c in np.unique(np.concatenate([gold, predicted])):
        tp = float(np.sum((predicted == c) & (gold == c)))
        fp = float(np.sum((predicted == c) & (gold != c)))
        fn = float(np.sum((predicted != c) & (gold == c)))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(predicted == gold)), "macro_f1": float(np.mean(f1s))}


def build_default(train: Examples) -> tuple[Any, Any]:
    """A small GPT-2 classifier and a byte-level BPE tokenizer trained on the texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        train.texts,
        trainers.BpeTrainer(
            vocab_size=2000, special_tokens=["<|endoftext|>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )  # fmt: skip
    options: dict[str, Any] = dict(
        TINY_GPT2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = GPT2ForSequenceClassification(GPT2Config(**options, **_label_config(train)))
    return model, tokenizer


def _label_config(train: Examples) -> dict[str, Any]:
    return {
        "num_labels": len(train.label_names),
        "id2label": dict(enumerate(train.label_names)),
        "label2id": {n: i for i, n in enumerate(train.label_names)},
    }


def load_pretrained(name: str, train: Examples) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(
            name, ignore_mismatched_sizes=True, **_label_config(train)
        )
    except OSError as e:
        raise InvalidArgumentError(
            f"Cannot load model {name!r}: {str(e).splitlines()[0]}",
            "Pass a local model folder (no model hub is needed then), or check the model id.",
        ) from None
    if tokenizer.pad_token is None:
        # GPT-2 and friends ship without a pad token: batching needs one.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _warmup(args_class: Any, ratio: float) -> dict[str, Any]:
    # Transformers 5 takes a ratio as warmup_steps < 1; 4.x had warmup_ratio for it.
    import inspect

    if "warmup_ratio" in inspect.signature(args_class).parameters:
        return {"warmup_ratio": ratio}
    return {"warmup_steps": ratio}


def finetune(
    cfg: FinetuneConfig,
    *,
    on_event: Callable[[str], None] = print,
    callbacks: Sequence[Any] = (),
    preemption: Any = True,
) -> SavePoints:
    """Train (or resume) and return the run. Safe to call again after any interruption.

    ``preemption``: what SavePointsCallback does on SIGTERM/SIGUSR1 (by default: an
    emergency save point at the next step, then exit code 75)."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from savepoints.integrations.transformers import SavePointsCallback

    train, evaluation = load_data(cfg)
    metric = f"eval_{cfg.metric}"
    keep = Keep(last=cfg.keep_last, best=cfg.keep_best, metric=metric, mode="max")
    points = SavePoints(cfg.run, keep=keep)
    latest = points.latest()
    if latest is not None:
        # Rebuild from the save point itself: the same config and tokenizer, whatever the
        # command line builds; the Trainer then restores weights and training state.
        saved = latest.state.get("finetune", {})
        changed = {k: (saved[k], v) for k, v in asdict(cfg).items() if k in saved and saved[k] != v}
        if changed:
            raise InvalidArgumentError(
                f"Run {cfg.run} was started with other settings: "
                + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()),
                "Run with the original settings to resume, or use a new --run folder.",
            )
        on_event(f"Resuming from the save point at step {latest.step} ({latest.path}).")
        tokenizer = AutoTokenizer.from_pretrained(latest.path)
        model = AutoModelForSequenceClassification.from_pretrained(latest.path)
    else:
        # The new head's initial weights come from the seed, so a run is reproducible.
        from transformers import set_seed

        set_seed(cfg.seed)
        if cfg.model:
            on_event(f"Loading {cfg.model}.")
            model, tokenizer = load_pretrained(cfg.model, train)
        else:
            on_event("Building a small GPT-2 classifier and a BPE tokenizer trained on the texts.")
            model, tokenizer = build_default(train)
    on_event(
        f"{len(train.texts)} training and {len(evaluation.texts)} evaluation examples; "
        f"labels: {', '.join(train.label_names)}."
    )
    strategy = "steps" if cfg.save_every else "epoch"
    args = TrainingArguments(
        output_dir=str(Path(cfg.run) / ".savepoints" / "trainer"),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size * 2,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        learning_rate=cfg.learning_rate,
        **_warmup(TrainingArguments, cfg.warmup_ratio),
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=cfg.save_every,
        save_steps=cfg.save_every or 500,
        logging_steps=max(1, (cfg.save_every or 10) // 2),
        metric_for_best_model=cfg.metric,
        greater_is_better=True,
        seed=cfg.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        save_only_model=False,
        disable_tqdm=bool(callbacks),  # the caller shows its own progress
    )
    callback = SavePointsCallback(points, state={"finetune": asdict(cfg)}, preemption=preemption)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Encoded(train, tokenizer, cfg.max_length),
        eval_dataset=_Encoded(evaluation, tokenizer, cfg.max_length),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=[callback, *callbacks],
    )
    if callbacks:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=str(latest.path) if latest else None)
    return points
