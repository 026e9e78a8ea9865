"""Training stall per save point on a GPU, against torch DCP's ``async_save``.

A ~1.1B-parameter model built from its config (Llama shape: 22 layers, hidden 2048, as
TinyLlama), bf16 weights and AdamW state on the GPU: 6.6 GB of state. A training step is
forward + backward + optimizer step on a fixed batch, ended by a device synchronize.

The stall of a save is the extra wall time of a window "step, save, step" over the
median window "step, step" without a save (the save's cost can land in the next step:
its optimizer step waits for the copy it would overwrite, and the copy shares the
GPU's memory bandwidth). Variants, each --repeats times, interleaved with plain windows:

  async-eager     SavePoints(async_save=True, snapshot="eager"): save() copies every
                  tensor into pinned host buffers and waits for the copies
  async-deferred  SavePoints(async_save=True, snapshot="deferred"): save() returns at
                  once; the copies run on their own CUDA stream during the next step's
                  forward and backward; the optimizer step waits on the GPU for them
  dcp-async       torch.distributed.checkpoint.async_save of {"model", "optim"} state
                  dicts (its default stager), one process group of one rank
  torch-save      model.save_pretrained + torch.save(optimizer.state_dict()), what
                  Trainer._save_checkpoint does (the baseline of the ratios)

Also: how long save() itself blocks, and the device-to-host bandwidth the deferred copy
achieved (bytes over the time from its start to its last copy's completion).

    python bench/gpu_stall.py                 # on a machine with a CUDA GPU
    python bench/gpu_stall.py --tiny          # a quick check of the script (CPU works)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from savepoints import Keep, SavePoints


def build(tiny: bool, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2,
                             vocab_size=512)  # fmt: skip
    else:
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                             num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                             max_position_embeddings=2048)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return model, optimizer, config


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("model*.safetensors")):
        found.update(load_file(f))
    return found


def check_deferred(model, optimizer, step, run: Path, ids: torch.Tensor) -> None:
    """Before timing anything: a deferred save followed at once by a step holds the
    weights of the moment of save(), bit for bit; an in-place edit fails loudly."""
    from savepoints import SnapshotChangedError

    with SavePoints(run, snapshot="deferred") as points:
        before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        points.save(1, model=model, optimizer=optimizer)
        step()
        point = points.wait()
        saved = saved_weights(point.path)
        same = all(torch.equal(saved[k], before[k]) for k in saved)
        changed = any(not torch.equal(saved[k], v.cpu()) for k, v in model.state_dict().items()
                      if k in saved)  # fmt: skip
        print(f"check: deferred save + immediate step holds the save()-time weights: {same} "
              f"({len(saved)} tensors; the step changed them: {changed})")  # fmt: skip
        points.save(2, model=model, optimizer=optimizer)
        with torch.no_grad():
            next(model.parameters()).mul_(1.0)  # an in-place edit outside the optimizer
        step()
        try:
            points.wait()
            print("check: in-place edit NOT detected")
        except SnapshotChangedError as e:
            print(f"check: in-place edit detected: {e.tensor}")
    shutil.rmtree(run)
    # Incremental: a frozen embedding is reused (not copied) by the second save.
    embed = model.get_input_embeddings().weight
    embed.requires_grad_(False)
    head_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def head_step() -> None:
        model(ids, labels=ids).loss.backward()
        head_opt.step()
        head_opt.zero_grad(set_to_none=True)

    with SavePoints(run, snapshot="deferred") as points:
        points.save(1, model=model, optimizer=head_opt)
        head_step()
        points.wait()
        points.save(2, model=model, optimizer=head_opt)
        head_step()
        point = points.wait()
        snap = points._writer._snapshots._current
        reused = 0 if snap is None else snap.reused_bytes
        saved = saved_weights(point.path)
        exact = torch.equal(saved["model.embed_tokens.weight"], embed.detach().cpu())
        print(f"check: frozen embedding reused ({reused / 1e6:.1f} MB not copied), "
              f"saved exactly: {exact}; verify: {point.verify().ok}")  # fmt: skip
    embed.requires_grad_(True)
    shutil.rmtree(run)
    if not same or not changed or not exact:
        raise SystemExit("deferred snapshot check failed")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, optimizer, config = build(args.tiny, device)
    model.train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    step()  # AdamW's state exists from here on
    params = sum(p.numel() for p in model.parameters())
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes += sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )  # fmt: skip
    base = Path(tempfile.mkdtemp(prefix="sp-gpu-", dir=args.dir))
    check_deferred(model, optimizer, step, base / "check", ids)

    def window(save=None) -> tuple[float, float]:
        """Seconds of step + (save) + step, and of the save() call alone."""
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        if save is not None:
            save()
        t2 = time.perf_counter()
        step()
        return time.perf_counter() - t0, t2 - t1

    for _ in range(2):
        window()  # warm-up
    plain: list[float] = []
    stall: dict[str, list[float]] = {}
    blocking: dict[str, list[float]] = {}
    background: dict[str, list[float]] = {}
    bandwidth: list[float] = []
    first: dict[str, float] = {}

    def measure(name: str, save, finish) -> None:
        stall.setdefault(name, [])
        blocking.setdefault(name, [])
        background.setdefault(name, [])
        for i in range(args.repeats + 1):
            plain.append(window()[0])
            total, blocked = window(lambda: save(i))  # noqa: B023
            t = time.perf_counter()
            finish(i)
            done = time.perf_counter() - t
            if i == 0:
                first[name] = total - statistics.median(plain)
                continue
            stall[name].append(total)
            blocking[name].append(blocked)
            background[name].append(done)
            gc.collect()
            os.sync()

    try:
        for mode in ("eager", "deferred"):
            name = f"async-{mode}"
            points = SavePoints(base / name, async_save=True, snapshot=mode, keep=Keep(last=1))

            def finish(i, points=points, mode=mode) -> None:
                points.wait()
                snap = points._writer._snapshots._current
                if mode == "deferred" and i > 0 and snap is not None and snap.deferred_seconds:
                    bandwidth.append(snap.deferred_bytes / snap.deferred_seconds)

            measure(name, lambda i, points=points: points.save(
                100 + i, model=model, optimizer=optimizer), finish)  # fmt: skip
            points.close()
            shutil.rmtree(base / name)
            gc.collect()

        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        if not dist.is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}",
                                    rank=0, world_size=1)  # fmt: skip
        futures: dict[int, object] = {}

        def dcp_save(i: int) -> None:
            state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
            futures[i] = dcp.async_save(state, checkpoint_id=str(base / f"dcp-{i}"))

        def dcp_finish(i: int) -> None:
            futures.pop(i).result()  # type: ignore[attr-defined]
            shutil.rmtree(base / f"dcp-{i}", ignore_errors=True)

        measure("dcp-async", dcp_save, dcp_finish)

        def torch_save(i: int) -> None:
            folder = base / f"hf-{i}"
            model.save_pretrained(folder)
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")

        def torch_finish(i: int) -> None:
            shutil.rmtree(base / f"hf-{i}", ignore_errors=True)

        measure("torch-save", torch_save, torch_finish)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    plain_window = statistics.median(plain)
    baseline = statistics.median(stall["torch-save"]) - plain_window
    name_gpu = torch.cuda.get_device_name() if cuda else "CPU"
    print(
        f"{name_gpu}: {params / 1e9:.2f}B parameters, bf16 + AdamW = {state_bytes / 1e9:.2f} GB "
        f"of state; step+step window median {plain_window:.3f} s; {args.repeats} saves each\n"
    )
    print(f"  {'variant':15} {'stall min':>9} {'median':>8} {'max':>8} {'vs torch-save':>13} "
          f"{'save() blocks':>13} {'background':>10} {'first save':>10}")  # fmt: skip
    figures: dict[str, object] = {"state_bytes": state_bytes, "plain_window": plain_window}
    for name in stall:
        extra = [t - plain_window for t in stall[name]]
        med = statistics.median(extra)
        print(
            f"  {name:15} {min(extra):9.3f} {med:8.3f} {max(extra):8.3f} "
            f"{med / baseline:12.4f}x {statistics.median(blocking[name]):13.4f} "
            f"{statistics.median(background[name]):10.2f} {first[name]:10.2f}"
        )
        figures[name] = {"stall": extra, "blocking": blocking[name],
                         "background": background[name], "first": first[name]}  # fmt: skip
    if bandwidth:
        print(
            f"\ndeferred device-to-host copy: {statistics.median(bandwidth) / 1e9:.1f} GB/s "
            f"median ({min(bandwidth) / 1e9:.1f}-{max(bandwidth) / 1e9:.1f})"
        )
        figures["d2h_bandwidth"] = bandwidth
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
