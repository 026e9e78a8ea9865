"""Bytes on disk for 10 save points of a partial fine-tune, against plain HF checkpoints.

GPT-2 (124M parameters, fp32, built from its config: no download) as a sequence
classifier. Two fine-tunes, each 10 optimizer steps with a checkpoint after every step:

  head+last-block  only the classification head and the last transformer block train
  head-only        only the classification head trains
  lora             a peft LoRA adapter (r=8 on attention) and the head train; HF Trainer
                   then saves the adapter only (no base), so its baseline is small too

For each it reports the physical bytes of the savepoints run (one shard per layer,
files hard-linked to content-addressed blobs) and of the same 10 checkpoints written as
Hugging Face Trainer writes them (save_pretrained + torch.save of optimizer, scheduler and
RNG), both as a multiple of one save point.

    python bench/dedup_bytes.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from save_overhead import du, hf_style

from savepoints import SavePoints


def physical(folder: Path) -> int:
    seen, total = set(), 0
    for f in folder.rglob("*"):
        if f.is_file():
            st = f.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def run(scenario: str, base: Path, steps: int, layers: int) -> dict[str, float]:
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        get_linear_schedule_with_warmup,
    )

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=layers, num_labels=3, pad_token_id=0))
    if scenario == "lora":
        import peft

        config = peft.LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                 task_type="SEQ_CLS")  # fmt: skip
        model = peft.get_peft_model(model, config)
    else:
        trainable = ["score."]
        if scenario == "head+last-block":
            trainable.append(f"transformer.h.{layers - 1}.")
        for name, p in model.named_parameters():
            p.requires_grad = any(name.startswith(t) for t in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, 100)
    run_dir, hf_dir = base / f"{scenario}-savepoints", base / f"{scenario}-hf"
    points = SavePoints(run_dir)
    for step in range(1, steps + 1):
        ids = torch.randint(0, 50257, (2, 32))
        model(ids, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        points.save(step, model=model, optimizer=optimizer, scheduler=scheduler)
        hf_style(hf_dir / f"checkpoint-{step}", model, optimizer, scheduler)
    one = points.latest().size
    result = {
        "trainable_params": sum(p.numel() for p in params),
        "one_save_point": one,
        # every file of the run, each inode once: blobs, links and manifests
        "savepoints_physical": physical(run_dir),
        "hf_physical": du(hf_dir),
    }
    points.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base = Path(tempfile.mkdtemp(prefix="sp-dedup-", dir=args.dir))
    try:
        print(
            f"GPT-2 ({args.layers} layers) sequence classifier, fp32, AdamW, "
            f"{args.steps} checkpoints each\n"
        )
        print(
            f"{'scenario':18} {'trainable':>10} {'one save point':>15} {'savepoints':>11} "
            f"{'x one':>6} {'HF Trainer':>11} {'x one':>6}"
        )
        for scenario in ("head+last-block", "head-only", "lora"):
            r = run(scenario, base, args.steps, args.layers)
            one = r["one_save_point"]
            print(
                f"{scenario:18} {r['trainable_params'] / 1e6:9.2f}M {one / 1e6:14.0f}M "
                f"{r['savepoints_physical'] / 1e6:10.0f}M {r['savepoints_physical'] / one:6.2f} "
                f"{r['hf_physical'] / 1e6:10.0f}M {r['hf_physical'] / one:6.2f}"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
        os.sync()


if __name__ == "__main__":
    main()
