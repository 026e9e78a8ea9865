"""One rank of a multi-process test: ``python tests/ranks_worker.py SCENARIO RUN OUT``.

Started by tests/test_ranks.py (several at once, with RANK, WORLD_SIZE, MASTER_ADDR=
127.0.0.1 and MASTER_PORT set, as torchrun would), or by ``torchrun`` itself. Each
rank writes what it saw to ``OUT.rank-N.json`` for the test to compare.

The model is a tiny GPT-2 language model (tied input and output embeddings, dropout
on) sharded with FSDP2 (``fully_shard``) or wrapped in DDP; each rank draws its own
batches from its own seeded generators, so only a per-rank RNG restore resumes exactly.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from savepoints import SavePoints
from savepoints.staging import FileRecorder

STEPS = 5
SAVE_AT = 3
TIMEOUT = float(os.environ.get("RANKS_TEST_TIMEOUT", "20"))


def build(kind: str) -> tuple[torch.nn.Module, Any, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    wrapped: torch.nn.Module = model
    if kind == "fsdp" and dist.is_initialized():
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    elif kind == "ddp" and dist.is_initialized():
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return wrapped, optimizer, scheduler


def seed(rank: int) -> None:
    random.seed(100 + rank)
    np.random.seed(100 + rank)
    torch.manual_seed(100 + rank)


def train_step(model: torch.nn.Module, optimizer: Any, scheduler: Any) -> float:
    ids = torch.randint(0, 96, (2, 8))
    noise = random.random() + float(np.random.rand())  # Python's and NumPy's RNG matter too
    loss = model(ids, labels=ids).loss * (1 + noise * 1e-3)
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return float(loss.item())


def full_state(model: torch.nn.Module, optimizer: Any) -> dict[str, str]:
    """A digest of every whole tensor of the model and optimizer (gathered if sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    out = {}
    for name, t in msd.items():
        out[f"model.{name}"] = _digest(t)
    for name, per in osd["state"].items():
        for key, t in per.items():
            out[f"optim.{name}.{key}"] = _digest(t) if isinstance(t, torch.Tensor) else repr(t)
    out["groups"] = json.dumps(
        [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]],
        sort_keys=True,
        default=str,
    )
    return out


def _digest(t: torch.Tensor) -> str:
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def forbid_pickle() -> None:
    """Make every unpickling path raise: a restore must never need one."""
    import pickle

    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("pickle was used during a restore")

    real_load = torch.load

    def torch_load(*a: Any, **k: Any) -> Any:
        if k.get("weights_only") is False:
            raise AssertionError("torch.load(weights_only=False) during a restore")
        return real_load(*a, **k)

    pickle.load = refuse  # type: ignore[assignment]
    pickle.loads = refuse  # type: ignore[assignment]
    torch.load = torch_load  # type: ignore[assignment]


def main() -> None:
    scenario, run, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    os.environ["RANKS_OUT"] = str(out)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, Any] = {"rank": rank, "world": world}
    try:
        SCENARIOS[scenario](run, rank, world, result)
    except SystemExit as e:
        result["exit"] = e.code
        raise
    except BaseException as e:
        result["error"] = type(e).__name__
        result["message"] = str(e)
        raise
    finally:
        Path(f"{out}.rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def train_and_save(run: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    kind = os.environ.get("MODEL_KIND", "fsdp")
    model, optimizer, scheduler = build(kind)
    seed(rank)
    losses = []
    with SavePoints(run, timeout=TIMEOUT, remote=os.environ.get("REMOTE")) as points:
        for step in range(1, STEPS + 1):
            losses.append(train_step(model, optimizer, scheduler))
            if step == SAVE_AT:
                points.save(step, model=model, optimizer=optimizer, scheduler=scheduler,
                            metrics={"loss": losses[-1]}, state={"step": step})  # fmt: skip
                result["at_save"] = full_state(model, optimizer)
    result["losses"] = losses[SAVE_AT:]
    result["final"] = full_state(model, optimizer)


def resume(run: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    kind = os.environ.get("MODEL_KIND", "fsdp")
    model, optimizer, scheduler = build(kind)
    seed(1000 + rank)  # whatever the fresh process drew: the restore must replace it
    with SavePoints(run, timeout=TIMEOUT, remote=os.environ.get("REMOTE")) as points:
        if os.environ.get("FORBID_PICKLE"):
            forbid_pickle()
        state = points.restore(model=model, optimizer=optimizer, scheduler=scheduler)
        result["restored"] = full_state(model, optimizer)
        result["scheduler"] = scheduler.state_dict()
        losses = [train_step(model, optimizer, scheduler) for _ in range(state["step"], STEPS)]
    result["losses"] = losses
    result["final"] = full_state(model, optimizer)


def fail_mid_write(run: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    """Rank 1 runs out of disk space while writing its optimizer file (or is killed,
    with HOW=kill); then, with HOW=enospc, every rank saves the next step normally."""
    how = os.environ.get("HOW", "enospc")
    model, optimizer, scheduler = build("fsdp")
    seed(rank)
    train_step(model, optimizer, scheduler)
    real = FileRecorder.write_tensor_stream

    def failing(self: FileRecorder, rel: str, *a: Any, **k: Any) -> None:
        if rank == 1 and "optimizer" in rel:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, rel, *a, **k)

    with SavePoints(run, timeout=TIMEOUT) as points:
        FileRecorder.write_tensor_stream = failing  # type: ignore[method-assign]
        started = time.monotonic()
        try:
            points.save(1, model=model, optimizer=optimizer)
        except Exception as e:
            result["save_error"] = type(e).__name__
            result["save_message"] = str(e)
        result["seconds"] = time.monotonic() - started
        result["listed"] = [p.step for p in points.list()]
        FileRecorder.write_tensor_stream = real  # type: ignore[method-assign]
        train_step(model, optimizer, scheduler)
        points.save(2, model=model, optimizer=optimizer)
        result["after"] = [p.step for p in points.list()]


def one_rank_saves(run: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    """Only rank 0 calls save(): it must get a clear error within the timeout."""
    model, optimizer, _ = build("ddp")
    points = SavePoints(run, timeout=TIMEOUT)
    started = time.monotonic()
    if rank == 0:
        try:
            points.save(1, model=model, optimizer=optimizer)
        except Exception as e:
            result["save_error"] = type(e).__name__
            result["save_message"] = str(e)
    else:
        time.sleep(TIMEOUT * 2)  # busy elsewhere, never calling save()
    result["seconds"] = time.monotonic() - started
    result["listed"] = [p.step for p in points.list()]
    # The process group is unusable after a timeout: leave without its teardown.
    Path(f"{os.environ['RANKS_OUT']}.rank-{rank}.json").write_text(json.dumps(result))
    os._exit(0)


def disagree(run: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    model, optimizer, _ = build("ddp")
    with SavePoints(run, timeout=TIMEOUT) as points:
        try:
            points.save(10 + rank, model=model, optimizer=optimizer)
        except Exception as e:
            result["save_error"] = type(e).__name__
            result["save_message"] = str(e)
        result["listed"] = [p.step for p in points.list()]


def restore_flipped(run: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    model, optimizer, scheduler = build("fsdp")
    with SavePoints(run, timeout=TIMEOUT) as points:
        try:
            points.restore(SAVE_AT, model=model, optimizer=optimizer, scheduler=scheduler)
        except Exception as e:
            result["restore_error"] = type(e).__name__
            result["restore_message"] = str(e)


def trainer(run: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    """Trainer under DDP (gloo, CPU) with SavePointsCallback; STOP_AT stops after that
    step's save point; RESUME=1 resumes from the latest save point."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from savepoints.transformers import SavePointsCallback, resume_path

    stop_at = int(os.environ.get("STOP_AT", "0"))

    class PerRankSeed(TrainerCallback):
        # Trainer seeds every rank alike; give each rank its own generators, as data
        # augmentation or dropout with per-rank seeds would.
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            seed(rank)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == stop_at:
                control.should_save = True
                control.should_training_stop = True

    args = TrainingArguments(
        output_dir=str(run.parent / "hf-out"), per_device_train_batch_size=2, max_steps=6,
        save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True,
        learning_rate=1e-2, seed=7, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    model, _, _ = build("plain")
    gen = torch.Generator().manual_seed(3)
    data = [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (48, 8), generator=gen)
    ]
    points = SavePoints(run, timeout=TIMEOUT)
    callbacks = [SavePointsCallback(points, preemption=False), PerRankSeed()]
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    if os.environ.get("FORBID_PICKLE"):
        forbid_pickle()
    resume = resume_path(points) if os.environ.get("RESUME") else None
    trainer.train(resume_from_checkpoint=resume)
    result["steps"] = [p.step for p in points.list()]
    result["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result["final"] = {n: _digest(t) for n, t in model.state_dict().items()}
    result["rng"] = [random.random(), float(np.random.rand()), float(torch.rand(1))]
    points.close()


def preempt(run: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    """A slow training loop that only saves when preempted (a signal from outside)."""
    from savepoints import Preemption

    model, optimizer, scheduler = build("fsdp")
    seed(rank)
    with SavePoints(run, timeout=TIMEOUT) as points, Preemption(deadline=25) as preemption:
        for step in range(1, 300):
            train_step(model, optimizer, scheduler)
            if step == 2:
                Path(f"{os.environ['RANKS_OUT']}.started-{rank}").touch()
            time.sleep(0.1)
            if preemption.should_stop(points):  # every rank, once per step
                result["stopped_at"] = step
                result["signal"] = preemption.received.name if preemption.received else None
                points.save(step, model=model, optimizer=optimizer, scheduler=scheduler,
                            state={"step": step})  # fmt: skip
                preemption.exit(points)
    result["finished"] = True


def rank0_reads(run: Path, rank: int, world: int, result: dict[str, Any]) -> None:
    """Rank 0 alone opens the run read-only and restores from it (evaluating the best
    model on one rank, say): no other rank is involved, nothing waits for one."""
    model, optimizer, scheduler = build("plain")
    if rank == 0:
        points = SavePoints(run, readonly=True)
        points.restore(model=model, optimizer=optimizer, scheduler=scheduler)
        result["model"] = {f"model.{n}": _digest(t) for n, t in model.state_dict().items()}
    dist.barrier()


SCENARIOS = {
    "rank0_reads": rank0_reads,
    "preempt": preempt,
    "trainer": trainer,
    "train_and_save": train_and_save,
    "resume": resume,
    "fail_mid_write": fail_mid_write,
    "one_rank_saves": one_rank_saves,
    "disagree": disagree,
    "restore_flipped": restore_flipped,
}

if __name__ == "__main__":
    main()
