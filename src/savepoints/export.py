"""Export a save point: a deployment bundle, or a folder plain Trainer resumes from.

``format="hf"``: weights (optionally cast to fp16/bf16), config with label names,
tokenizer, and a README model card with metrics and lineage; no training state.
``transformers.pipeline(..., model=OUT)`` loads it.

``format="hf-trainer"``: a ``checkpoint-N`` style folder that plain
``Trainer.train(resume_from_checkpoint=OUT)`` accepts, for people leaving savepoints. It
holds Trainer's own ``torch.save`` files (optimizer.pt, scheduler.pt, rng_state.pth),
because that is what Trainer reads; savepoints writes them but never reads them.

The output appears atomically: it is written beside ``OUT`` and renamed into place.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from savepoints import atomic
from savepoints.compact import require_plain
from savepoints.errors import CorruptSavePointError, InvalidArgumentError
from savepoints.layout import MANIFEST_NAME, TRAINING_STATE_DIR
from savepoints.lineage import card_command, describe_chain
from savepoints.manifest import Lineage
from savepoints.savepoint import SavePoint
from savepoints.serialize import DTYPE_ALIASES, component_path, read_json_object, reading
from savepoints.staging import FileRecorder
from savepoints.training_state import read_tree, rng_to_hf
from savepoints.version import __version__
from savepoints.weights import DEFAULT_MAX_SHARD_BYTES, read_model_tensors, write_weights

Format = Literal["hf", "hf-trainer"]
_TRAINING_ONLY = {MANIFEST_NAME, "trainer_state.json"}


def export(
    point: SavePoint,
    out: str | os.PathLike[str],
    *,
    fmt: Format = "hf",
    dtype: str | None = None,
    verify: bool = True,
) -> Path:
    """Write ``point`` to the new folder ``out``; returns its path."""
    out = Path(out)
    if fmt not in ("hf", "hf-trainer"):
        raise InvalidArgumentError(f"Unknown export format {fmt!r}.", "Use 'hf' or 'hf-trainer'.")
    if dtype is not None and dtype not in DTYPE_ALIASES:
        raise InvalidArgumentError(
            f"Unknown dtype {dtype!r}.",
            f"Use one of {', '.join(DTYPE_ALIASES)} (or none to keep it).",
        )
    if dtype is not None and fmt == "hf-trainer":
        raise InvalidArgumentError(
            "--dtype cannot be used with --format hf-trainer: training resumes in the "
            "precision it was saved in.",
            "Leave --dtype out, or export --format hf.",
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgumentError(
            f"Export target {out} already exists and is not empty; nothing was written.",
            "Pick a new folder, or remove the old one first.",
        )
    check_shippable(point, "export")
    if verify:
        point.verify().raise_if_failed()
    with atomic.stage_beside(out).begin() as staged:
        rec = FileRecorder(staged.path)
        with reading(point.path):
            _copy_model_folder(point, rec, dtype, keep_trainer_state=fmt == "hf-trainer")
            if fmt == "hf":
                rec.write_bytes("README.md", model_card(point, dtype).encode())
            else:
                _write_trainer_state_files(point, staged.path)
        staged.commit()  # over an empty `out`, if there is one: rename replaces it
    return out


#: Pickle and code files: never part of a save point written by savepoints.
NEVER_EXPORTED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".py")


def check_shippable(point: SavePoint, action: str) -> None:
    """Refuse, clearly, to ship ``point`` (``action``: "export", "publish"): it must hold a
    model, be plain (not compacted), and hold no pickle or code file."""
    if "model" not in point.contents:
        raise InvalidArgumentError(
            f"Save point {point.path} holds no model to {action}.",
            f"{action.capitalize()} a save point saved with model=...",
        )
    require_plain(point.path, point.manifest, action)
    unsafe = [rel for rel in point.manifest.files if rel.lower().endswith(NEVER_EXPORTED)]
    if unsafe:
        # savepoints never writes these: a save point holding them was made by someone
        # else, and shipping a pickle would hand its code to whoever loads the bundle.
        raise CorruptSavePointError(
            point.path,
            [f"{rel}: a pickle or code file, which savepoints never writes" for rel in unsafe],
            failed=f"is not safe to {action}",
        )


def deployable_files(point: SavePoint, *, keep_trainer_state: bool = False) -> list[str]:
    """The files of ``point`` that a deployment bundle holds, sorted: the model folder
    (weights, config, tokenizer, files saved beside them), never the training state nor
    the manifest (``trainer_state.json`` too with ``keep_trainer_state``)."""
    return [
        rel for rel in sorted(point.manifest.files)
        if not rel.startswith(f"{TRAINING_STATE_DIR}/")
        and (rel not in _TRAINING_ONLY or (keep_trainer_state and rel == "trainer_state.json"))
    ]  # fmt: skip


def _copy_model_folder(
    point: SavePoint, rec: FileRecorder, dtype: str | None, keep_trainer_state: bool
) -> None:
    model_info = point.contents["model"]
    weight_files = set(model_info.get("files", []))
    for rel in deployable_files(point, keep_trainer_state=keep_trainer_state):
        if rel in weight_files:
            continue
        if rel == "config.json" and dtype is not None:
            config = json.loads(component_path(point.path, rel).read_bytes())
            cast_to = str(DTYPE_ALIASES[dtype]).removeprefix("torch.")
            config["dtype"] = config["torch_dtype"] = cast_to
            rec.write_bytes(rel, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        else:
            rec.copy_file(rel, component_path(point.path, rel))
    if dtype is None:
        from safetensors import safe_open

        for rel in sorted(weight_files):
            source = component_path(point.path, rel)
            if rel.endswith(".safetensors"):
                # Parse the header (names, dtypes, offsets inside the file) before
                # shipping it: a bundle that from_pretrained cannot load is no bundle.
                with safe_open(str(source), "pt") as f:
                    list(f.keys())
            rec.copy_file(rel, source)
        return
    tensors = read_model_tensors(point.path, model_info)
    target = DTYPE_ALIASES[dtype]
    cast = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    write_weights(rec, cast, DEFAULT_MAX_SHARD_BYTES)


def _write_trainer_state_files(point: SavePoint, out: Path) -> None:
    contents = point.contents
    if not (point.path / "trainer_state.json").is_file():
        state: dict[str, Any] = {
            "global_step": point.step,
            "epoch": point.state.get("epoch"),
            "log_history": [],
            "best_metric": None,
            "best_model_checkpoint": None,
        }
        (out / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    for info, fname in ((contents.get("optimizer"), "optimizer.pt"),
                        (contents.get("scheduler"), "scheduler.pt")):  # fmt: skip
        if info is not None:
            state = read_tree(point.path, info)
            if info.get("keys") == "names":
                state = by_position(state)
            torch.save(state, out / fname)
    per_rank = contents.get("ranks", {}).get("rng")
    if per_rank:  # Trainer's multi-process layout: one file per process
        for rank, info in enumerate(per_rank):
            rng = rng_to_hf(read_tree(point.path, info))
            torch.save(rng, out / f"rng_state_{rank}.pth")
    elif "rng" in contents:
        torch.save(rng_to_hf(read_tree(point.path, contents["rng"])), out / "rng_state.pth")
    scaler = contents.get("extra", {}).get("scaler")
    if scaler is not None:
        torch.save(read_tree(point.path, scaler), out / "scaler.pt")
    for name in os.listdir(out):
        with open(out / name, "rb") as f:
            os.fsync(f.fileno())


def by_position(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (saved by several ranks) keyed by
    position instead, as ``torch.optim.Optimizer.load_state_dict`` takes it."""
    groups = state.get("param_groups", [])
    index = {name: i for i, name in enumerate(n for g in groups for n in g["params"])}
    return {
        "state": {index[name]: value for name, value in state.get("state", {}).items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups],
    }


def card_lineage(lineage: Lineage | None) -> list[str]:
    """The lines of a card's "Lineage" section that come from the manifest's lineage.

    A card is written to be published, so it says less than ``savepoints show``: data
    files and the repository by their last name (with sizes and hashes, which identify
    them), the command with absolute paths cut to their last name, and neither the host
    nor the repository's remote URL (internal host names and folder layouts are nobody
    else's business). The manifest beside the weights keeps everything whole."""
    if lineage is None:
        return []
    lines: list[str] = []
    code = lineage.code
    if code is not None and code.get("commit"):
        repo = Path(code.get("root", "")).name
        lines.append(f"- code: git commit {_tick(code['commit'])}"
                     + (f" of {_tick(repo)}" if repo else "")
                     + (" (with uncommitted changes)" if code.get("dirty") else ""))  # fmt: skip
    data = lineage.data
    if data is not None:
        lines.append(f"- training data fingerprint (blake3): {_tick(data.get('fingerprint', '?'))}")
        for entry in data.get("files", []):
            count = f", {entry['files']} files" if "files" in entry else ""
            lines.append(f"  - {_tick(Path(entry['path']).name)}: {entry['size']} bytes{count}, "
                         f"blake3 {_tick(entry['blake3'])}")  # fmt: skip
    if lineage.command:
        lines.append(f"- command: {_tick(shlex.join(card_command(lineage.command)))}")
    if lineage.chain:
        lines.append("- history (newest first):")
        told = describe_chain(lineage.chain, names_only=True, sessions=False)
        lines += [f"  - {_plain(line)}" for line in told]
    return lines


def _plain(text: str) -> str:
    """``text`` on one line, without characters that would end a card's list item."""
    return "".join(c if c.isprintable() else " " for c in text)


def _tick(text: str) -> str:
    """``text`` as inline code in Markdown; a backtick in it (a hostile manifest's) cannot
    close the span early."""
    return "`" + _plain(text).replace("`", "'") + "`"


def model_card(
    point: SavePoint, dtype: str | None, *, location: str = "PATH/TO/THIS/FOLDER"
) -> str:
    """README.md for an export or a publication: what it is, how well it did, where it
    came from; ``location`` is what the usage example loads (a folder, a Hub repo id)."""
    config = read_json_object(point.path / "config.json") or {}
    arch = (config.get("architectures") or [point.contents["model"].get("class", "model")])[0]
    labels: Mapping[str, str] = config.get("id2label") or {}
    is_classifier = arch.endswith("ForSequenceClassification")
    run = point.path.parent
    lines = ["---", "library_name: transformers"]
    if is_classifier:
        lines.append("pipeline_tag: text-classification")
    lines += ["tags:", "- savepoints", "---", "",
              f"# {run.name} — step {point.step}", "",
              f"A `{arch}` exported by savepoints {__version__} from the save point at step "
              f"{point.step} of the run `{run}`.", ""]  # fmt: skip
    if point.metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in point.metrics.items()]
        lines.append("")
    if labels and is_classifier:
        lines += ["## Labels", "", "| id | label |", "|---:|---|"]
        lines += [
            f"| {i} | {name} |" for i, name in sorted(labels.items(), key=lambda x: int(x[0]))
        ]
        lines.append("")
    weights = {
        rel: e.hash for rel, e in point.manifest.files.items()
        if rel in point.contents["model"].get("files", [])
    }  # fmt: skip
    lines += ["## Lineage", "",
              f"- run: `{run}`", f"- step: {point.step}",
              f"- parent save point: {point.parent if point.parent is not None else '—'}",
              f"- tags: {', '.join(point.tags) if point.tags else '—'}",
              f"- saved: {point.created.isoformat(timespec='seconds')}",
              f"- weights dtype: {dtype or config.get('dtype', config.get('torch_dtype'))}",
              ]  # fmt: skip
    lines += card_lineage(point.manifest.lineage)
    lines += [f"- source `{rel}` blake3: `{h}`" for rel, h in sorted(weights.items())]
    for k, v in sorted(point.manifest.versions.items()):
        lines.append(f"- {k} {v}")
    lines += ["", "## Use", "", "```python"]
    if is_classifier:
        lines += ["from transformers import pipeline", "",
                  f'classify = pipeline("text-classification", model="{location}")',
                  'classify("I love this!")']  # fmt: skip
    else:
        lines += ["from transformers import AutoModel", "",
                  f'model = AutoModel.from_pretrained("{location}")']  # fmt: skip
    lines += ["```", ""]
    return "\n".join(lines)
