"""Fine-tune a sequence classifier from a CSV/JSONL file, with save points.

The engine of ``savepoints train``: a plain ``transformers.Trainer`` plus
:class:`SavePointsCallback`, so every save point is a normal model folder and running the
same command again resumes exactly where the last one stopped.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np
import torch

from savepoints.errors import DataFileError, InvalidArgumentError
from savepoints.keep import Keep
from savepoints.manager import SavePoints
from savepoints.textfile import decode_utf8

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
        # Paths given as pathlib objects are kept as text: the config goes into the
        # save point's JSON state.
        for name in ("train_file", "eval_file", "run", "model"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        if not 0 < self.eval_fraction < 1:
            raise InvalidArgumentError(
                f"eval fraction {self.eval_fraction} must be between 0 and 1.",
                "Pass e.g. --eval-fraction 0.1, or --eval FILE.",
            )
        if self.metric not in ("accuracy", "macro_f1"):
            raise InvalidArgumentError(
                f"metric {self.metric!r} is not known.", "Use 'accuracy' or 'macro_f1'."
            )
        for name in ("epochs", "batch_size", "learning_rate", "max_length",
                     "gradient_accumulation", "save_every", "max_train_examples",
                     "max_eval_examples"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InvalidArgumentError(f"{name} must be positive.", f"Pass a positive {name}.")


@dataclass
class Examples:
    texts: list[str]
    labels: list[int]
    label_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Row:
    """One example as read from its file."""

    text: str
    label: str
    """The label as written (stripped); turned into an id by :func:`encode_labels`."""
    line: int
    """The line of the file it starts on, for error messages."""


JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_FORMAT_HINT = (
    "Pass a UTF-8 CSV file with a header row (text,label; .tsv: tab-separated) or a "
    'JSONL file with one object per line, e.g. {"text": "...", "label": "..."}.'
)


def read_examples(path: str | Path, text_column: str, label_column: str) -> list[Row]:
    """The examples of a CSV/TSV (with a header row) or JSON-lines file.

    Anything wrong with the file is a :class:`DataFileError` naming the file, the line and
    what is wrong: a text or label that is missing or empty, a quote that is never closed,
    a row with more fields than the header, a line that is not a JSON object...
    """
    path = Path(path)
    if not path.is_file():
        why = "it is a folder, not a file" if path.is_dir() else "the file does not exist"
        raise DataFileError(path, why, _FORMAT_HINT)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataFileError(path, e.strerror or str(e), "Check the file's permissions.") from None
    text = decode_utf8(data, path)
    if not text.strip():
        raise DataFileError(path, "the file is empty", _FORMAT_HINT)
    if path.suffix.lower() in JSONL_SUFFIXES:
        rows = _read_jsonl(path, text, text_column, label_column)
    else:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        rows = _read_csv(path, text, text_column, label_column, delimiter)
    if not rows:
        raise DataFileError(path, "it has a header row but no examples", _FORMAT_HINT)
    return rows


def _read_csv(
    path: Path, text: str, text_column: str, label_column: str, delimiter: str
) -> list[Row]:
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.reader(lines, delimiter=delimiter)
    records: list[tuple[int, list[str]]] = []  # (line it starts on, fields)
    start = 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):  # blank lines are no examples
                records.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:  # in this lenient mode: only a field longer than the limit
        raise DataFileError(
            path, f"{e} ({csv.field_size_limit()} characters): a quote that is never closed, "
            "or a text far too long to classify",
            'Close the quote (a quote inside a quoted field is written ""), or shorten the text.',
            line=start,
        ) from None  # fmt: skip
    if records:
        _check_quotes_closed(path, lines, records[-1][0], delimiter)
    (header_line, header), *body = records
    header = [h.strip() for h in header]
    columns = {name: i for i, name in reversed(list(enumerate(header)))}
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        hint = "Name the columns with --text-column and --label-column."
        odd = [sep for sep in (";", "\t", "|") if len(header) == 1 and sep in header[0]]
        if odd:
            hint += (
                f" The header looks separated by {odd[0]!r}: .csv files are read "
                "comma-separated, .tsv files tab-separated."
            )
        raise DataFileError(
            path, f"it has no column {_names(missing, 'or')} (its columns: {_names(header)})", hint,
            line=header_line,
        )  # fmt: skip
    rows = []
    for line, fields in body:
        if len(fields) > len(header) and any(f.strip() for f in fields[len(header) :]):
            raise DataFileError(
                path, f"it has {len(fields)} fields, the header has {len(header)}",
                'Put a text that holds the delimiter in double quotes ("like, this"), and '
                'double any quote inside it ("").', line=line,
            )  # fmt: skip
        values = []
        for name in (text_column, label_column):
            i = columns[name]
            if i >= len(fields):
                _empty(path, line, name, f"it has {len(fields)} field(s) and no {name!r}")
            values.append(fields[i])
        rows.append(_row(path, line, text_column, label_column, *values))
    return rows


def _check_quotes_closed(path: Path, lines: list[str], start: int, delimiter: str) -> None:
    """A quote that is never closed swallows the rest of the file into one field of the
    last record, which the lenient reader accepts; read that record strictly to tell."""
    try:
        for _ in csv.reader(lines[start - 1 :], delimiter=delimiter, strict=True):
            pass
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise DataFileError(
                path,
                'a quoted field that starts on this line is never closed (a " is missing)',
                'Close the quote, and write a quote inside a quoted field as two ("").',
                line=start,
            ) from None


def _read_jsonl(path: Path, text: str, text_column: str, label_column: str) -> list[Row]:
    rows = []
    array_hint = (
        "savepoints train reads JSON Lines: one object per line, e.g. "
        '{"text": "...", "label": "..."}. A JSON array converts with jq -c \'.[]\' FILE.'
    )
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if n == 1 and line.lstrip().startswith("["):
                raise DataFileError(path, "it is a JSON array, not JSON Lines", array_hint,
                                    line=n) from None  # fmt: skip
            raise DataFileError(
                path, f"it is not valid JSON ({e.msg}, column {e.colno})",
                'Write one JSON object per line, e.g. {"text": "...", "label": "..."}.', line=n,
            ) from None  # fmt: skip
        if not isinstance(obj, dict):
            raise DataFileError(path, f"it is a JSON {_json_type(obj)}, not an object",
                                array_hint, line=n)  # fmt: skip
        missing = [c for c in (text_column, label_column) if c not in obj]
        if missing:
            raise DataFileError(
                path, f"it has no column {_names(missing, 'or')} (its columns: {_names(obj)})",
                "Name the columns with --text-column and --label-column.", line=n,
            )  # fmt: skip
        values = []
        for name in (text_column, label_column):
            value = obj[name]
            if isinstance(value, (dict, list)):
                raise DataFileError(
                    path, f"its {name!r} is a JSON {_json_type(value)}, not a string",
                    "Give each example a string text and a string or integer label.", line=n,
                )  # fmt: skip
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # a label 1.0 is the label 1
            values.append("" if value is None else str(value))
        rows.append(_row(path, n, text_column, label_column, *values))
    return rows


def _row(path: Path, line: int, text_column: str, label_column: str, text: str,
         label: str) -> Row:  # fmt: skip
    if not text.strip():
        _empty(path, line, text_column, f"its {text_column!r} is empty")
    if not label.strip():
        _empty(path, line, label_column, f"its {label_column!r} is empty")
    return Row(text, label.strip(), line)


def _empty(path: Path, line: int, column: str, why: str) -> NoReturn:
    raise DataFileError(
        path, why, f"Give every example its {column!r}, or remove the line.", line=line
    )


def _names(names: Any, last: str = "and") -> str:
    quoted = [repr(n) for n in names]
    return f" {last} ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)


def _json_type(value: Any) -> str:
    return {list: "array", dict: "object", str: "string", bool: "boolean"}.get(
        type(value), "number" if isinstance(value, (int, float)) else "null"
    )


def label_names_for(rows: Sequence[Row], path: Path) -> list[str]:
    """Label names in id order: integer labels keep their ids, names are sorted."""
    values = {r.label for r in rows}
    if all(_is_int(v) for v in values):
        negative = next((r for r in rows if int(r.label) < 0), None)
        if negative is not None:
            raise DataFileError(
                path, f"its label {negative.label} is negative",
                "Number labels from 0, or use label names.", line=negative.line,
            )  # fmt: skip
        return [str(i) for i in range(max(int(v) for v in values) + 1)]
    return sorted(values)


def _is_int(value: str) -> bool:
    return value.removeprefix("-").isdecimal()


def encode_labels(rows: Sequence[Row], names: list[str], path: Path, hint: str) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    ids = all(_is_int(n) for n in names)
    out = []
    for row in rows:
        key = str(int(row.label)) if ids and _is_int(row.label) else row.label
        if key not in index:
            raise DataFileError(
                path, f"its label {row.label!r} is not among the training labels "
                f"({', '.join(names)})", hint, line=row.line,
            )  # fmt: skip
        out.append(index[key])
    return out


def _require_labels(rows: Sequence[Row], path: Path, what: str, hint: str) -> None:
    labels = {r.label for r in rows}
    if len(labels) < 2:
        raise DataFileError(
            path,
            f"{what} the label {next(iter(labels))!r}; a classifier needs at least two labels",
            hint,
        )


def load_data(cfg: FinetuneConfig) -> tuple[Examples, Examples]:
    train_path = Path(cfg.train_file)
    train_raw = read_examples(train_path, cfg.text_column, cfg.label_column)
    _require_labels(
        train_raw, train_path, "every example has",
        f"Add examples of another label, or check that {cfg.label_column!r} is the label "
        "column (--label-column).",
    )  # fmt: skip
    if cfg.eval_file:
        eval_path = Path(cfg.eval_file)
        eval_raw = read_examples(eval_path, cfg.text_column, cfg.label_column)
        unseen_hint = "Use the same label names in the training and evaluation files."
    else:
        eval_path = train_path
        shuffled = list(train_raw)
        random.Random(cfg.seed).shuffle(shuffled)
        n_eval = max(1, int(len(shuffled) * cfg.eval_fraction))
        eval_raw, train_raw = shuffled[:n_eval], shuffled[n_eval:]
        unseen_hint = "Add examples of that label, or pass an evaluation file with --eval."
    if cfg.max_train_examples:
        train_raw = train_raw[: cfg.max_train_examples]
    if cfg.max_eval_examples:
        eval_raw = eval_raw[: cfg.max_eval_examples]
    _require_labels(
        train_raw, train_path, "every example left for training has",
        "Add examples of each label"
        + (", or raise --max-train-examples" if cfg.max_train_examples else "")
        + ("" if cfg.eval_file else ", or pass an evaluation file with --eval") + ".",
    )  # fmt: skip
    names = label_names_for(train_raw, train_path)
    train = Examples(
        [r.text for r in train_raw], encode_labels(train_raw, names, train_path, ""), names
    )
    evaluation = Examples(
        [r.text for r in eval_raw], encode_labels(eval_raw, names, eval_path, unseen_hint), names
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
    remote: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    on_commit: Callable[[int], None] | None = None,
) -> SavePoints:
    """Train (or resume) and return the run. Safe to call again after any interruption.

    ``preemption``: what SavePointsCallback does on SIGTERM/SIGUSR1 (by default: an
    emergency save point at the next step, then exit code 75). ``remote``: a URL
    (``s3://bucket/prefix``...) every save point is pushed to, and resumed from when the
    run folder is empty (a new machine). ``on_commit(step)``: called once each save point
    is committed (saves are written in the background)."""
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
    # Under torchrun or accelerate launch, the TrainingArguments initialise
    # torch.distributed: before the run is opened, so that every rank writes it together.
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
    keep = Keep(last=cfg.keep_last, best=cfg.keep_best, metric=metric, mode="max")
    # With a remote, an empty run folder resumes from the remote's latest save point.
    # The data files read go into every manifest's lineage (their hashes, a fingerprint).
    data_files = [cfg.train_file, *([cfg.eval_file] if cfg.eval_file else [])]
    points = SavePoints(cfg.run, keep=keep, remote=remote, storage_options=storage_options,
                        data_files=data_files)  # fmt: skip
    if on_commit is not None:
        points.on_commit(on_commit)
    latest = points.latest()
    if latest is not None:
        # Rebuild from the save point itself: the same config and tokenizer, whatever the
        # command line builds; the Trainer then restores weights and training state.
        saved = latest.state.get("finetune", {})
        # Where the run lives is not a setting: a run resumed on another machine from
        # its remote sits in another folder.
        changed = {k: (saved[k], v) for k, v in asdict(cfg).items()
                   if k in saved and saved[k] != v and k != "run"}  # fmt: skip
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
