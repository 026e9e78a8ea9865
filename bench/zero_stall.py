"""Training stall of a save point (issue 13, "zero-stall save points"), against the real
Hugging Face ``Trainer._save_checkpoint`` and torch DCP ``async_save`` in the same run.

Model: GPT2ForSequenceClassification (GPT-2 124M with --layers 12, built from its config,
``torch.manual_seed(0)``, 3 labels), AdamW lr 1e-4 on the trainable parameters, a linear
schedule with warmup, one fixed batch of 4 x 32 tokens, ``model.train()`` (dropout runs).
One training step is forward + backward + ``optimizer.step()`` + ``scheduler.step()`` +
``zero_grad()``. Scenarios (--scenarios):

  full   full fine-tune: every parameter trainable
  head   head + last block: ``score``, the last ``transformer.h.N`` and
         ``transformer.ln_f`` trainable, everything else frozen
  lora   PEFT LoRA (r=8, alpha 16, on c_attn) with ``score`` in ``modules_to_save``

Variants, each a small config dict (VARIANTS below):

  hf-trainer       ``Trainer._save_checkpoint(model, trial=None)`` of a Trainer holding the
                   same model, optimizer and scheduler (``state.global_step`` distinct per
                   save): model (the adapter only for LoRA, as Trainer saves it),
                   optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json
  sync             SavePoints(async_save=False, snapshot="eager")
  async-eager      SavePoints(async_save=True, snapshot="eager")
  async-deferred   SavePoints(async_save=True, snapshot="deferred")
  defaults         SavePoints(path) with no options
  torch-dcp-async  ``torch.distributed.checkpoint.async_save`` of
                   ``get_state_dict(model, optimizer)``, single process, no process group

Every SavePoints run uses keep=Keep(last=2). A variant whose options this savepoints does
not accept (``inspect.signature(SavePoints)``) is printed as skipped.

What is measured. A *window* is two consecutive training steps. A *save window* saves
between them, where Trainer saves (after the optimizer and scheduler steps): step, save,
step. A *plain window* is the same two steps without a save. Every window starts after
``gc.collect()`` and ``os.sync()`` (no variant pays for another's dirty pages). Per repeat
and variant (the variant order rotates each repeat) one plain window then one save window
run; after the save window, ``wait()`` (``.result()`` for DCP) is called outside the timed
part, so saves never pile up. For each variant:

  stall          save window - median of all plain windows of the scenario: the extra
                 wall time of saving, including what lands in the next step (the
                 optimizer pre-hook waiting for deferred copies, a background thread
                 contending for the CPU); "vs HF" divides its median by the median time
                 of ``_save_checkpoint`` itself (the issue's definition of the stall)
  save()         how long the save call blocks (``_save_checkpoint`` for hf-trainer,
                 ``get_state_dict`` + ``async_save`` for DCP)
  opt.step +     ``optimizer.step()`` of the step after the save, minus the median
                 ``optimizer.step()`` of the second step of the plain windows
  in flight      background wall time: from the save call's return to the commit (the
                 save's future completing, retention included), measured with a done
                 callback; it overlaps the next step, so it runs contended
  wait()         what is left of it after the window: the time ``wait()`` blocks
  extra mem      host snapshot buffers the run keeps (``_writer._snapshots.buffers``)
                 divided by the state: model tensors (each storage once) + optimizer
                 state tensors. DCP's staging copy is freed after each save: not counted.

Before timing, each variant saves once in a save window ("first save": host buffers are
allocated then, and imports and caches warmed); that stall is reported apart. The plain
window median before any save point exists is printed too: the difference from the plain
windows measured later is what hooks left installed cost every step.

Then the issue's targets, each with PASS/MISS: async-deferred stall <= 0.05x HF (full),
<= 0.02x (head), <= 0.01x (lora); background of a head save point <= 0.1x that of a full
one (async-deferred "in flight" medians); extra memory <= 1.1x the state (async-deferred);
defaults <= 1.0x HF in each scenario.

    python bench/zero_stall.py                                  # 124M, 5 repeats
    python bench/zero_stall.py --layers 2 --repeats 2           # quick
    python bench/zero_stall.py --scenarios full --dir /mnt/nvme
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import os
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from savepoints import Keep, SavePoints

SCENARIOS = {
    "full": "full fine-tune",
    "head": "head + last block",
    "lora": "LoRA r=8 + head",
}

VARIANTS: dict[str, dict[str, Any]] = {
    "hf-trainer": {"kind": "hf-trainer"},
    "sync": {"kind": "savepoints", "options": {"async_save": False, "snapshot": "eager"}},
    "async-eager": {"kind": "savepoints", "options": {"async_save": True, "snapshot": "eager"}},
    "async-deferred": {
        "kind": "savepoints",
        "options": {"async_save": True, "snapshot": "deferred"},
    },
    "defaults": {"kind": "savepoints", "options": {}},
    "torch-dcp-async": {"kind": "dcp"},
}

#: Issue 13: the most a median stall may be, as a multiple of Trainer's _save_checkpoint.
STALL_TARGETS = {"full": 0.05, "head": 0.02, "lora": 0.01}
BACKGROUND_TARGET = 0.1  # head save point's background / a full one's
MEMORY_TARGET = 1.1  # host buffers / state
DEFAULTS_TARGET = 1.0

BATCH, SEQ, LABELS = 4, 32, 3


# ------------------------------------------------------------------ training


class Training:
    """One scenario's model, optimizer, scheduler and fixed batch."""

    def __init__(self, scenario: str, layers: int) -> None:
        from transformers import (
            GPT2Config,
            GPT2ForSequenceClassification,
            get_linear_schedule_with_warmup,
        )

        torch.manual_seed(0)
        config = GPT2Config(n_layer=layers, num_labels=LABELS, pad_token_id=50256)
        model: torch.nn.Module = GPT2ForSequenceClassification(config)
        if scenario == "head":
            trained = ("score.", f"transformer.h.{layers - 1}.", "transformer.ln_f.")
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith(trained))
        elif scenario == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True,
                           modules_to_save=["score"], task_type="SEQ_CLS"),
            )  # fmt: skip
        model.train()
        self.model = model
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-4
        )
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, 10, 100_000)
        g = torch.Generator().manual_seed(0)
        self.batch = {
            "input_ids": torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=g),
            "labels": torch.randint(0, LABELS, (BATCH,), generator=g),
        }
        self.global_step = 0
        for _ in range(2):  # the optimizer state exists, and first-call costs are paid
            self.step()

    def step(self) -> float:
        """One training step; returns the seconds ``optimizer.step()`` took."""
        self.model(**self.batch).loss.backward()
        t0 = time.perf_counter()
        self.optimizer.step()
        took = time.perf_counter() - t0
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return took

    def state_bytes(self) -> int:
        # each storage once: GPT-2's score/lm_head ties and PEFT wrappers share tensors
        unique = {t.data_ptr(): t for t in self.model.state_dict().values()}
        n = sum(t.numel() * t.element_size() for t in unique.values())
        return n + sum(
            v.numel() * v.element_size()
            for s in self.optimizer.state.values() for v in s.values()
            if isinstance(v, torch.Tensor)
        )  # fmt: skip


# ------------------------------------------------------------------ savers


class Saver:
    """One variant: ``save`` is the part training waits for (timed in the window),
    ``finish`` waits for the background part (timed apart), ``cleanup`` is untimed."""

    def __init__(self, base: Path, train: Training) -> None:
        self.base = base
        self.train = train
        self.done_at: float | None = None  # when the save in flight completed

    def _track(self, future: Any) -> None:
        self.done_at = None
        if future is None:
            return

        def done(_: Any) -> None:
            self.done_at = time.perf_counter()

        future.add_done_callback(done)

    def save(self, step: int) -> Any:
        raise NotImplementedError

    def finish(self, handle: Any) -> None:
        pass

    def cleanup(self, step: int) -> None:
        pass

    def extra_bytes(self) -> int | None:
        return None

    def close(self) -> None:
        pass


class TrainerSaver(Saver):
    def __init__(self, base: Path, train: Training) -> None:
        super().__init__(base, train)
        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(output_dir=str(base), save_strategy="no", report_to=[],
                                 use_cpu=True)  # fmt: skip
        self.trainer = Trainer(model=train.model, args=args)
        self.trainer.optimizer = train.optimizer
        self.trainer.lr_scheduler = train.scheduler

    def save(self, step: int) -> Any:
        self.trainer.state.global_step = step
        self.trainer._save_checkpoint(self.trainer.model, trial=None)
        self.done_at = time.perf_counter()

    def cleanup(self, step: int) -> None:
        shutil.rmtree(self.base / f"checkpoint-{step}", ignore_errors=True)


class SavePointsSaver(Saver):
    def __init__(self, base: Path, train: Training, options: dict[str, Any]) -> None:
        super().__init__(base, train)
        self.points = SavePoints(base, keep=Keep(last=2), **options)

    def save(self, step: int) -> Any:
        t = self.train
        handle = self.points.save(step, model=t.model, optimizer=t.optimizer,
                                  scheduler=t.scheduler)  # fmt: skip
        # A PendingSave completes in the background; a synchronous save is done here.
        future = getattr(handle, "_future", None)
        if future is None:
            self.done_at = time.perf_counter()
        else:
            self._track(future)
        return handle

    def finish(self, handle: Any) -> None:
        self.points.wait()

    def extra_bytes(self) -> int | None:
        writer = self.points._writer
        for path in (("_snapshots", "buffers", "nbytes"), ("_buffers", "nbytes")):
            obj: Any = writer
            for attr in path:
                obj = getattr(obj, attr, None)
                if obj is None:
                    break
            if obj is not None:
                return int(obj() if callable(obj) else obj)
        return None

    def close(self) -> None:
        self.points.close()


class DCPSaver(Saver):
    def save(self, step: int) -> Any:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.train.model, self.train.optimizer)
        resp = dcp.async_save({"model": msd, "optim": osd},
                              checkpoint_id=str(self.base / f"dcp-{step}"))  # fmt: skip
        # A Future, or (with an asynchronous stager) an AsyncSaveResponse
        future = getattr(resp, "upload_completion", resp)
        self._track(future)
        return future

    def finish(self, handle: Any) -> None:
        handle.result()

    def cleanup(self, step: int) -> None:
        shutil.rmtree(self.base / f"dcp-{step}", ignore_errors=True)


def make_saver(spec: dict[str, Any], base: Path, train: Training) -> Saver:
    kind = spec["kind"]
    if kind == "hf-trainer":
        return TrainerSaver(base, train)
    if kind == "dcp":
        return DCPSaver(base, train)
    return SavePointsSaver(base, train, spec.get("options", {}))


def unsupported(spec: dict[str, Any]) -> list[str]:
    """Options of ``spec`` this installed SavePoints does not accept."""
    accepted = inspect.signature(SavePoints).parameters
    return [k for k in spec.get("options", {}) if k not in accepted]


# ------------------------------------------------------------------ windows


@dataclass
class Window:
    total: float  # two steps (and the save between them, if any)
    second_opt: float  # optimizer.step() of the second step
    blocking: float = 0.0  # the save call
    returned: float = 0.0  # perf_counter() when the save call returned


def window(train: Training, saver: Saver | None = None) -> tuple[Window, Any]:
    gc.collect()
    os.sync()
    t0 = time.perf_counter()
    train.step()
    handle, blocking, returned = None, 0.0, 0.0
    if saver is not None:
        ts = time.perf_counter()
        handle = saver.save(train.global_step)
        returned = time.perf_counter()
        blocking = returned - ts
    second = train.step()
    return Window(time.perf_counter() - t0, second, blocking, returned), handle


@dataclass
class Record:
    windows: list[Window] = field(default_factory=list)
    in_flight: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    first: Window | None = None
    extra: int | None = None
    skipped: str | None = None
    error: str | None = None


def save_window(train: Training, saver: Saver) -> tuple[Window, float, float]:
    """A save window, then (untimed for the stall) the wait and the cleanup."""
    w, handle = window(train, saver)
    t0 = time.perf_counter()
    saver.finish(handle)
    waited = time.perf_counter() - t0
    done = saver.done_at if saver.done_at is not None else time.perf_counter()
    saver.cleanup(train.global_step - 1)
    return w, waited, max(0.0, done - w.returned) if w.returned else 0.0


@dataclass
class Result:
    scenario: str
    params: int
    trainable: int
    state: int
    plain_before: list[float]
    plain: list[float]
    plain_opt: list[float]
    hf_save: list[float]
    records: dict[str, Record]


def run_scenario(scenario: str, args: argparse.Namespace, root: Path) -> Result:
    train = Training(scenario, args.layers)
    params = sum(p.numel() for p in train.model.parameters())
    trainable = sum(p.numel() for p in train.model.parameters() if p.requires_grad)
    state = train.state_bytes()
    base = root / scenario
    records: dict[str, Record] = {name: Record() for name in VARIANTS}
    savers: dict[str, Saver] = {}
    plain_before = [window(train)[0].total for _ in range(max(3, args.repeats))]
    plain: list[Window] = []
    try:
        for name, spec in VARIANTS.items():
            missing = unsupported(spec)
            if missing:
                records[name].skipped = f"this savepoints has no {', '.join(missing)}="
                continue
            try:
                savers[name] = make_saver(spec, base / name, train)
                records[name].first = save_window(train, savers[name])[0]
            except Exception as e:  # reported in its row; the other variants go on
                records[name].error = f"{type(e).__name__}: {e}"
        names = list(savers)
        for r in range(args.repeats if names else 0):
            for name in names[r % len(names):] + names[: r % len(names)]:  # fmt: skip
                rec = records[name]
                if rec.error:
                    continue
                plain.append(window(train)[0])
                try:
                    w, waited, flight = save_window(train, savers[name])
                except Exception as e:  # reported in its row; the other variants go on
                    rec.error = f"{type(e).__name__}: {e}"
                    continue
                rec.windows.append(w)
                rec.waits.append(waited)
                rec.in_flight.append(flight)
            print(f"  [{scenario}] repeat {r + 1}/{args.repeats} done", flush=True)
        for name, saver in savers.items():
            records[name].extra = saver.extra_bytes()
    finally:
        for saver in savers.values():
            with contextlib.suppress(Exception):
                saver.close()
        shutil.rmtree(base, ignore_errors=True)
    hf = records["hf-trainer"]
    return Result(
        scenario=scenario, params=params, trainable=trainable, state=state,
        plain_before=plain_before, plain=[w.total for w in plain],
        plain_opt=[w.second_opt for w in plain],
        hf_save=[w.blocking for w in hf.windows],
        records=records,
    )  # fmt: skip


# ------------------------------------------------------------------ report


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def stalls(res: Result, rec: Record) -> list[float]:
    base = med(res.plain)
    return [w.total - base for w in rec.windows]


def hf_median(res: Result) -> float | None:
    return med(res.hf_save) if res.hf_save else None


def print_scenario(res: Result, layers: int, repeats: int) -> None:
    hf = hf_median(res)
    print(
        f"\n== {SCENARIOS[res.scenario]}: GPT-2 {layers} layers, {res.params / 1e6:.1f}M "
        f"parameters ({res.trainable / 1e6:.2f}M trainable), state {res.state / 1e9:.3f} GB; "
        f"{repeats} repeats"
    )
    print(
        f"plain window (2 steps): median {med(res.plain):.3f} s "
        f"(min {min(res.plain):.3f}, max {max(res.plain):.3f}); "
        f"before any save point {med(res.plain_before):.3f} s"
    )
    if hf is not None:
        print(
            f"Trainer._save_checkpoint: median {hf:.3f} s "
            f"(min {min(res.hf_save):.3f}, max {max(res.hf_save):.3f})  <- the 1.0x"
        )
    print(
        f"  {'variant':16} {'stall min':>9} {'median':>8} {'max':>8} {'vs HF':>8} "
        f"{'1st save':>8} {'save()':>8} {'opt.step+':>9} {'in flight':>9} {'wait()':>8} "
        f"{'extra mem':>9}"
    )
    plain_opt = med(res.plain_opt)
    for name, rec in res.records.items():
        if rec.skipped:
            print(f"  {name:16} skipped ({rec.skipped})")
            continue
        if rec.error or not rec.windows:
            print(f"  {name:16} failed: {rec.error or 'no windows'}")
            continue
        st = stalls(res, rec)
        ratio = f"{med(st) / hf:7.3f}x" if hf else "     n/a"
        first = rec.first.total - med(res.plain) if rec.first else float("nan")
        mem = f"{rec.extra / res.state:8.3f}x" if rec.extra is not None else f"{'-':>9}"
        print(
            f"  {name:16} {min(st):9.3f} {med(st):8.3f} {max(st):8.3f} {ratio:>8} "
            f"{first:8.3f} {med([w.blocking for w in rec.windows]):8.3f} "
            f"{med([w.second_opt for w in rec.windows]) - plain_opt:9.3f} "
            f"{med(rec.in_flight):9.3f} {med(rec.waits):8.3f} {mem}"
        )


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def print_targets(results: dict[str, Result]) -> None:
    print("\n== issue 13 targets")

    def stall_ratio(scenario: str, variant: str) -> float | None:
        res = results.get(scenario)
        if res is None:
            return None
        rec, hf = res.records[variant], hf_median(res)
        if not rec.windows or not hf:
            return None
        return med(stalls(res, rec)) / hf

    for scenario, target in STALL_TARGETS.items():
        r = stall_ratio(scenario, "async-deferred")
        shown = f"{r:.3f}x" if r is not None else "not measured"
        ok = None if r is None else r <= target
        label = f"{SCENARIOS[scenario]}: async-deferred stall <= {target}x HF"
        print(f"  {verdict(ok):4}  {label:58} {shown}")

    full, head = results.get("full"), results.get("head")
    shown, ok = "not measured", None
    if full and head:
        f, h = full.records["async-deferred"], head.records["async-deferred"]
        if f.in_flight and h.in_flight and med(f.in_flight) > 0:
            r = med(h.in_flight) / med(f.in_flight)
            shown, ok = f"{r:.3f}x", r <= BACKGROUND_TARGET
            waits = (f"(wait() only: {med(h.waits) / med(f.waits):.3f}x)"
                     if med(f.waits) > 0 else "")  # fmt: skip
            shown = f"{shown} {waits}".strip()
    label = f"head background (in flight) <= {BACKGROUND_TARGET}x full's"
    print(f"  {verdict(ok):4}  {label:58} {shown}")

    for scenario, res in results.items():
        rec = res.records["async-deferred"]
        r = rec.extra / res.state if rec.extra is not None and rec.windows else None
        shown = f"{r:.3f}x" if r is not None else "not measured"
        ok = None if r is None else r <= MEMORY_TARGET
        label = f"{SCENARIOS[scenario]}: deferred extra memory <= {MEMORY_TARGET}x state"
        print(f"  {verdict(ok):4}  {label:58} {shown}")

    for scenario in results:
        r = stall_ratio(scenario, "defaults")
        shown = f"{r:.3f}x" if r is not None else "not measured"
        ok = None if r is None else r <= DEFAULTS_TARGET
        label = f"{SCENARIOS[scenario]}: defaults stall <= {DEFAULTS_TARGET}x HF"
        print(f"  {verdict(ok):4}  {label:58} {shown}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma list of {', '.join(SCENARIOS)}")  # fmt: skip
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir on /tmp)")
    args = ap.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in chosen:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    if args.repeats < 1 or args.layers < 1:
        ap.error("--repeats and --layers must be at least 1")

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # DCP without a process group saves single-process, and says so on every save.
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPU cores, {threading.active_count()} Python threads at start"
    )
    root = Path(tempfile.mkdtemp(prefix="sp-zero-stall-", dir=args.dir))
    results: dict[str, Result] = {}
    try:
        for scenario in chosen:
            results[scenario] = run_scenario(scenario, args, root)
            print_scenario(results[scenario], args.layers, args.repeats)
            gc.collect()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        "\nstall = save window (step, save, step) - median plain window (step, step); "
        "vs HF = median stall / median Trainer._save_checkpoint; 1st save = stall of the "
        "warm-up save; opt.step+ = extra time of the next optimizer.step(); in flight = "
        "save() return -> commit; wait() = what remained after the window (untimed for "
        "the stall); extra mem = host buffers / state. All seconds."
    )
    print_targets(results)


if __name__ == "__main__":
    main()
