"""Export a sequence classifier to ONNX, with a parity check against PyTorch.

The graph comes from torch's own ONNX exporter (``torch.onnx.export(dynamo=True)``:
torch.export, then onnxscript), never a hand-written one, with dynamic batch and
sequence axes. ``quantize="int8"`` applies ONNX Runtime's dynamic quantization (int8
weights of the matrix multiplications). Before the bundle appears, ONNX Runtime and
PyTorch classify the same texts: an fp32 export whose logits differ by more than
:data:`FP32_TOLERANCE` is refused, and an int8 one whose labels agree on fewer than
:data:`INT8_MIN_AGREEMENT` of the texts (int8 logits move by design; the labels are what
a deployment serves). Nothing is written half: the bundle is staged beside ``OUT`` and
renamed into place.

The bundle: ``model.onnx``, the tokenizer, ``config.json`` (label names),
``savepoints-onnx.json`` (inputs, labels, padding, the parity figures, the source save
point) and a README model card.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from savepoints import atomic
from savepoints.errors import InvalidArgumentError, MissingDependencyError, SavePointsError
from savepoints.export import check_shippable, model_card
from savepoints.interop.onnx_bundle import BUNDLE_INFO, MODEL_FILE, TOKENIZER_FILE, file_hashes
from savepoints.savepoint import SavePoint
from savepoints.serialize import read_json_object, reading
from savepoints.staging import FileRecorder
from savepoints.version import __version__

Quantize = Literal["int8"]
#: Largest |logit difference| an fp32 export may show against PyTorch (float32 kernels
#: differ in summation order: 1e-6..1e-5 is usual).
FP32_TOLERANCE = 1e-4
#: Share of texts on which an int8 export must pick PyTorch's label.
INT8_MIN_AGREEMENT = 0.9
INPUTS = ("input_ids", "attention_mask")

#: Texts the parity check classifies when none are given: short and long, plain and odd.
SAMPLE_TEXTS = (
    "absolutely loved the concert, best night ever!",
    "so disappointed with my flight, awful service",
    "checking the opening hours of the museum",
    "the new phone is fine i guess",
    "worst. game. ever. #refund",
    "Thanks for the quick reply, it works now :)",
    "is it going to rain tomorrow in Berlin?",
    "I can't believe they cancelled the show again... unbelievable",
    "ok",
    "@someone did you see the match last night? what a comeback!!!",
    "Prices went up 20% and the quality went down.",
    "Just finished my first marathon, tired but happy",
    "nothing to say about this one",
    "The update broke everything and support does not answer emails.",
    "café ☕ and croissants this morning, très bien",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3,
    "The food was cold and the waiter ignored us for an hour.",
    "What a beautiful sunset over the lake tonight",
    "Meeting moved to 3pm, room 204.",
    "I'm so proud of my little sister, she graduated today!!",
    "This traffic is driving me insane",
    "Does anyone know if the library is open on Sundays?",
    "best pizza in town, hands down 🍕",
    "my laptop died in the middle of the presentation. great.",
    "New episode drops Friday.",
    "Honestly the sequel was better than the original",
    "Customer service hung up on me twice. Never again.",
    "Grateful for friends who show up when it matters ❤️",
    "The train is delayed by 15 minutes",
    "that was the most boring lecture of my life",
    "Can't wait for the weekend, camping trip planned!",
    "The report is attached, let me know if you have questions.",
    "lost my keys again smh",
    "Our team won the championship!!! unreal",
    "the app keeps crashing after the last update",
    "It's raining. Again.",
    "Loving the new coffee place on 5th street",
    "Why is everything so expensive now",
    "Happy birthday to the best dad in the world",
    "Tickets go on sale at 10am tomorrow",
    "I feel sick, staying home today",
    "This book changed the way I think about work",
    "The hotel room smelled like smoke and the sheets were dirty",
    "Just got promoted at work, still processing it",
    "Elections are next Tuesday; polls open at 7.",
    "ugh mondays",
    "That concert was pure magic from start to finish",
    "The package arrived damaged and nobody answers the phone",
    "Reading a paper on protein folding this afternoon",
    "So happy with how the garden turned out this year",
    "the wifi here is painfully slow",
    "Nothing special, just another day at the office",
    "They fixed the bug within an hour, impressive support",
    "I miss the old design, the new one is confusing",
    "Dinner with family tonight",
    "Absolutely terrible referee decisions all game",
    "First snow of the season! ❄️",
    "The movie starts at 8:15",
    "Worst customer experience I've ever had, avoid this shop",
    "finally finished my thesis!!!",
    "Stock markets closed slightly lower on Thursday.",
    "My dog learned a new trick today and I'm thrilled",
    "The museum exhibit was fine, a bit short",
    "Can someone explain why my bill doubled this month?",
)


class OnnxExportError(SavePointsError, ValueError):
    """The model cannot be exported to ONNX, or the export does not match PyTorch."""


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime against PyTorch on the same texts."""

    texts: int
    max_abs_diff: float
    """Largest |logit difference| over all texts and labels."""
    agreement: float
    """Share of texts classified alike."""
    quantize: str | None
    tolerance: float | None
    """The fp32 limit on ``max_abs_diff`` (None for int8, judged on ``agreement``)."""
    min_agreement: float | None


def _require(feature: str) -> None:
    for module, package in (("onnx", "onnx"), ("onnxruntime", "onnxruntime"),
                            ("onnxscript", "onnxscript")):  # fmt: skip
        try:
            __import__(module)
        except ImportError as e:
            if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == module:
                raise MissingDependencyError(feature, package, "onnx") from None
            raise OnnxExportError(  # installed, but it does not import: say why
                f"{feature} needs {package}, which is installed but cannot be imported: {e}",
                "Reinstall it (pip install -U 'savepoints[onnx]'); set SAVEPOINTS_DEBUG=1 "
                "for the traceback.",
            ) from e


def export_onnx(
    point: SavePoint,
    out: str | os.PathLike[str],
    *,
    quantize: Quantize | None = None,
    texts: list[str] | None = None,
    max_length: int = 512,
    verify: bool = True,
) -> Parity:
    """Write ``point``'s sequence classifier as an ONNX bundle at the new folder ``out``
    and return the parity check's figures (see the module docstring)."""
    out = Path(out)
    if quantize not in (None, "int8"):
        raise InvalidArgumentError(f"Unknown quantization {quantize!r}.", "Use --quantize int8.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgumentError(
            f"Export target {out} already exists and is not empty; nothing was written.",
            "Pick a new folder, or remove the old one first.",
        )
    _require("`savepoints export --format onnx`")
    check_shippable(point, "export")
    config = read_json_object(point.path / "config.json") or {}
    arch = (config.get("architectures") or ["?"])[0]
    if not str(arch).endswith("ForSequenceClassification"):
        raise OnnxExportError(
            f"Save point step {point.step} holds a {arch}; the ONNX export handles sequence "
            "classifiers (…ForSequenceClassification: GPT-2, BERT and their kin).",
            "Export it with --format hf, or save a sequence classifier.",
        )
    if verify:
        point.verify().raise_if_failed()
    sample = [t for t in (texts or list(SAMPLE_TEXTS)) if t.strip()]
    if not sample:
        raise InvalidArgumentError("No texts to check the export with.",
                                   "Give --check-texts a file with one text per line.")  # fmt: skip
    with reading(point.path):
        model, tokenizer = _load(point)
    # Texts longer than the model's positions are cut where the model can read them.
    positions = [getattr(model.config, k, None) for k in ("n_positions", "max_position_embeddings")]
    max_length = min([max_length, *(p for p in positions if isinstance(p, int) and p > 0)])
    with atomic.stage_beside(out).begin() as staged:
        fp32 = staged.path / (MODEL_FILE if quantize is None else ".fp32.onnx")
        _export(model, tokenizer, fp32, point)
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(fp32, staged.path / MODEL_FILE, weight_type=QuantType.QInt8)
            fp32.unlink()
        parity = check_parity(model, tokenizer, staged.path / MODEL_FILE, sample, max_length,
                              quantize)  # fmt: skip
        _refuse_if_apart(parity, point)
        tokenizer.save_pretrained(staged.path)
        model.config.save_pretrained(staged.path)
        if not (staged.path / TOKENIZER_FILE).is_file():
            raise OnnxExportError(
                f"The tokenizer of step {point.step} has no fast version ({TOKENIZER_FILE}); "
                "the bundle runs with the `tokenizers` library alone and needs one.",
                "Export it with --format hf, or save a fast tokenizer with the model.",
            )
        rec = FileRecorder(staged.path)
        rec.write_bytes("README.md", onnx_card(point, parity, quantize).encode())
        info = {
            "format": "savepoints-onnx", "version": 1, "savepoints": __version__,
            "model": MODEL_FILE,
            "inputs": list(INPUTS), "outputs": ["logits"], "architecture": arch,
            "id2label": {str(k): v for k, v in model.config.id2label.items()},
            "pad_token_id": tokenizer.pad_token_id, "padding_side": tokenizer.padding_side,
            "truncation_side": getattr(tokenizer, "truncation_side", "right"),
            "max_length": max_length, "quantize": quantize, "parity": asdict(parity),
            "source": {"path": str(point.path), "step": point.step, "metrics": point.metrics},
            "files": file_hashes(staged.path),
        }  # fmt: skip
        rec.write_bytes(BUNDLE_INFO, (json.dumps(info, indent=2) + "\n").encode())
        staged.commit()
    return parity


def _load(point: SavePoint) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForSequenceClassification.from_pretrained(point.path, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(point.path)
    if tokenizer.pad_token is None:  # GPT-2 and its kin: batching needs one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _export(model: Any, tokenizer: Any, path: Path, point: SavePoint) -> None:
    import torch

    class Logits(torch.nn.Module):
        """Only the logits: no cache, no dict (what torch.export can trace)."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).logits  # fmt: skip

    example = tokenizer(["an example to trace", "and a longer one, to trace the padding"],
                        padding=True, return_tensors="pt")  # fmt: skip
    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=1, max=65536)
    try:
        program = torch.onnx.export(
            Logits(model).eval(), (), kwargs={k: example[k] for k in INPUTS}, dynamo=True,
            dynamic_shapes={k: {0: batch, 1: sequence} for k in INPUTS},
            input_names=list(INPUTS), output_names=["logits"], verbose=False,
        )  # fmt: skip
        assert program is not None
        program.save(str(path))
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OnnxExportError(
            f"torch's ONNX exporter could not export the {type(model).__name__} of step "
            f"{point.step}: {why}",
            "Export it with --format hf; set SAVEPOINTS_DEBUG=1 for the exporter's report.",
        ) from e


def check_parity(
    model: Any, tokenizer: Any, onnx_path: Path, texts: list[str], max_length: int,
    quantize: str | None,
) -> Parity:  # fmt: skip
    """Classify ``texts`` with PyTorch and with ONNX Runtime (batches of 8, padded)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst, same = 0.0, 0
    for start in range(0, len(texts), 8):
        enc = tokenizer(texts[start : start + 8], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            expected = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             use_cache=False).logits.float().numpy()  # fmt: skip
        (got,) = session.run(["logits"], {k: enc[k].numpy().astype(np.int64) for k in INPUTS})
        worst = max(worst, float(np.abs(got - expected).max()))
        same += int((got.argmax(-1) == expected.argmax(-1)).sum())
    return Parity(
        texts=len(texts), max_abs_diff=worst, agreement=same / len(texts), quantize=quantize,
        tolerance=None if quantize else FP32_TOLERANCE,
        min_agreement=INT8_MIN_AGREEMENT if quantize else None,
    )  # fmt: skip


def _refuse_if_apart(parity: Parity, point: SavePoint) -> None:
    if parity.tolerance is not None and not parity.max_abs_diff <= parity.tolerance:
        raise OnnxExportError(
            f"The ONNX export of step {point.step} does not match PyTorch: logits differ by "
            f"up to {parity.max_abs_diff:.3g} over {parity.texts} texts (the limit is "
            f"{parity.tolerance:g}); nothing was written.",
            "Export with --format hf, or report the model type: the exporter mistranslated it.",
        )
    if parity.min_agreement is not None and parity.agreement < parity.min_agreement:
        raise OnnxExportError(
            f"The int8 export of step {point.step} picks PyTorch's label on only "
            f"{parity.agreement:.0%} of {parity.texts} texts (at least "
            f"{parity.min_agreement:.0%} is required); nothing was written.",
            "Export without --quantize (fp32), or check with more texts (--check-texts).",
        )


def onnx_card(point: SavePoint, parity: Parity, quantize: str | None) -> str:
    """The model card of an ONNX bundle: the export's card, with ONNX usage and parity."""
    card = model_card(point, None)
    card = card.replace("library_name: transformers", "library_name: onnx", 1)
    head, _, _ = card.partition("## Use")
    precision = "int8 (dynamic quantization)" if quantize else "fp32"
    check = (f"max |Δ logit| {parity.max_abs_diff:.2g} (limit {parity.tolerance:g})"
             if parity.tolerance is not None else
             f"labels agree on {parity.agreement:.0%} (at least {parity.min_agreement:.0%}); "
             f"max |Δ logit| {parity.max_abs_diff:.2g}")  # fmt: skip
    return head + "\n".join([
        "## ONNX", "",
        f"`{MODEL_FILE}` ({precision}), inputs `input_ids` and `attention_mask` (int64, "
        "dynamic batch and sequence), output `logits`. Parity with PyTorch on "
        f"{parity.texts} texts at export: {check}.", "",
        "## Use", "", "```python", "import numpy as np, onnxruntime as ort",
        "from tokenizers import Tokenizer", "",
        'session = ort.InferenceSession("PATH/TO/THIS/FOLDER/model.onnx")',
        'tok = Tokenizer.from_file("PATH/TO/THIS/FOLDER/tokenizer.json")',
        "tok.enable_padding(pad_id=PAD_ID)  # pad_token_id in savepoints-onnx.json",
        'enc = tok.encode_batch(["I love this!"])',
        "ids = np.array([e.ids for e in enc]); mask = np.array([e.attention_mask for e in enc])",
        'logits, = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})',
        "```", "",
    ])  # fmt: skip
