"""What each rank of a ``torch.distributed`` job writes into a save point, and reads.

Weights and optimizer state go through ``torch.distributed.checkpoint.state_dict``
(``get_state_dict`` / ``set_state_dict``), so DDP (replicated tensors) and FSDP2
(``fully_shard``: DTensor parameters) look alike: a state keyed by parameter name. They
are stored as **whole tensors** in safetensors files, never DCP's pickled ``.metadata``:

* the weights in the standard layout (``model.safetensors``, or shards plus
  ``model.safetensors.index.json``), so the folder loads with ``from_pretrained``;
* the optimizer as ``training_state/optimizer.json`` (its structure, by parameter
  name) plus ``training_state/optimizer-NNNNN-of-NNNNN.safetensors``.

Each file has one owner rank (files are dealt out by size). A sharded tensor is gathered
one tensor at a time, written by the owner straight into its file and dropped, so no
rank ever holds the whole model. Replicated tensors need no gathering: the owner writes
its copy, and DDP's weights and optimizer state are written once. Per-rank state (RNG,
``extra`` objects such as a sampler) goes under ``training_state/rank-N/``.

Reading needs no process group: a rank reads, from the safetensors headers, only the
slice of each tensor it holds; a plain process reads whole tensors. So a save point
written by 2 ranks restores at 2, at 1, or outside ``torch.distributed``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch

from savepoints.distributed import Ranks
from savepoints.errors import InvalidArgumentError, StateMismatchError, UnserializableStateError
from savepoints.layout import TRAINING_STATE_DIR
from savepoints.manifest import ComponentInfo, Contents, ModelInfo
from savepoints.serialize import (
    DTYPE_FROM_NAME,
    component_path,
    decode_tree,
    encode_tree,
    tensor_ref,
)
from savepoints.staging import FileRecorder
from savepoints.training_state import (
    MAX_STATE_JSON_BYTES,
    capture_rng,
    write_rng,
    write_state,
)
from savepoints.weights import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_METADATA,
    _plan_shards,
    _tied_names,
    dedupe_aliases,
    is_dtensor,
    is_peft_model,
    is_transformers_model,
    local_slice,
    model_class,
    plan_weight_files,
    unwrap_model,
    write_tokenizer,
    write_transformers_config,
)

#: Optimizer state files are cut at this size at most, so a rank holds at most this much
#: of gathered state while it writes one (and the work spreads over the ranks).
OPTIMIZER_FILE_BYTES = 256 * 1024 * 1024


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer``."""
    inner = getattr(optimizer, "optimizer", None)
    if type(optimizer).__name__ == "AcceleratedOptimizer" and inner is not None:
        return inner
    return optimizer


def state_dicts(model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, Any], Any]:
    """``(model state, optimizer state)`` by parameter name, DTensors where sharded."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    options = StateDictOptions(full_state_dict=False)
    if optimizer is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, unwrap_optimizer(optimizer), options=options)


# ------------------------------------------------------------------------------ writing


def write_ranked(
    rec: FileRecorder,
    *,
    ranks: Ranks,
    model: torch.nn.Module | None,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    rng: bool,
    extra: Mapping[str, Any],
    files: Mapping[str, bytes],
    max_shard_size: int,
    layer_shards_above: int | None,
) -> Contents:
    """This rank's part of a save point; returns its ``contents`` (rank 0's holds the
    components written once). Collective: every rank calls it with the same objects."""
    during = "save(), writing"
    if optimizer is not None and model is None:
        raise InvalidArgumentError(
            "save(optimizer=...) in a multi-rank run needs model= as well: the optimizer "
            "state is stored by parameter name, which the model gives.",
            "Pass model=model too.",
        )
    if model is not None and any(
        type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()
    ):
        raise InvalidArgumentError(
            "The model is wrapped in FullyShardedDataParallel (FSDP1), whose sharded state "
            "savepoints does not read.",
            "Shard it with torch.distributed.fsdp.fully_shard (FSDP2) instead; with "
            "accelerate or the Trainer, set fsdp_version: 2.",
        )
    base = unwrap_model(model) if model is not None else None
    if base is not None and is_peft_model(base):
        raise InvalidArgumentError(
            "Saving a PEFT model from several ranks is not supported yet.",
            "Save it from a single process, or merge the adapter first.",
        )
    contents: Contents = {}
    failure: BaseException | None = None
    # Phase 1, rank 0 alone: the files third-party code writes into the folder (config,
    # tokenizer), which are recorded by looking at what appeared, so before any other
    # rank writes there.
    if ranks.is_main:
        try:
            if base is not None and is_transformers_model(base):
                write_transformers_config(rec, base)
            if tokenizer is not None:
                contents["tokenizer"] = write_tokenizer(rec, tokenizer)
            if scheduler is not None:
                contents["scheduler"] = write_state(rec, "scheduler", scheduler)
            for rel, raw in files.items():
                if (
                    rel in rec.files
                    or rel.split("/")[0] == TRAINING_STATE_DIR
                    or (rel.startswith("model") and rel.endswith((".safetensors", ".json")))
                ):
                    raise InvalidArgumentError(
                        f"files={{{rel!r}: ...}} would replace a file savepoints itself writes.",
                        "Pick another file name.",
                    )
                rec.write_bytes(rel, raw)
            if files:
                contents["files"] = sorted(files)
        except BaseException as e:
            failure = e
    ranks.vote(failure, during)
    # Phase 2, every rank: whole tensors for the files it owns, its own state.
    if base is not None:
        model_state, optim_state = state_dicts(base, optimizer)
        contents["model"] = _write_model(rec, ranks, base, model_state, max_shard_size,
                                         layer_shards_above)  # fmt: skip
        if optimizer is not None:
            contents["optimizer"] = _write_optimizer(rec, ranks, optimizer, optim_state,
                                                     max_shard_size)  # fmt: skip
    if rng:
        contents["rng"] = write_rng(rec, capture_rng(), name=f"rank-{ranks.rank}/rng")
    if extra:
        contents["extra"] = {name: write_state(rec, f"rank-{ranks.rank}/{name}", obj)
                             for name, obj in extra.items()}  # fmt: skip
    return contents


def _write_model(
    rec: FileRecorder,
    ranks: Ranks,
    model: torch.nn.Module,
    state: Mapping[str, Any],
    max_shard_size: int,
    layer_shards_above: int | None,
) -> ModelInfo:
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UnserializableStateError("model state", name, value, "not a tensor")
    tensors, tied = dedupe_aliases(state, _tied_names(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    plan, index = plan_weight_files(tensors, max_shard_size, layer_shards_above, trainable)
    _agree_on_plan(ranks, "the model's tensors", plan)
    if index is not None and ranks.is_main:
        rec.write_json(WEIGHTS_INDEX_NAME, index)
    _write_owned(rec, ranks, plan, WEIGHTS_METADATA)
    cls = model_class(model)
    info: ModelInfo = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "kind": "transformers" if is_transformers_model(model) else "torch",
        "files": ([WEIGHTS_INDEX_NAME] if index is not None else []) + [r for r, _ in plan],
        "tensors": len(tensors),
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
    if tied:
        info["tied"] = dict(sorted(tied.items()))
    return info


def _write_optimizer(
    rec: FileRecorder, ranks: Ranks, optimizer: Any, state: Any, max_shard_size: int
) -> ComponentInfo:
    skeleton, tensors = encode_tree(state, "optimizer state")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    cut = max(1, min(max_shard_size, OPTIMIZER_FILE_BYTES, -(-total // ranks.world)))
    shards = _plan_shards(tensors, cut) if tensors else []
    plan = [
        (f"{TRAINING_STATE_DIR}/optimizer-{i:05d}-of-{len(shards):05d}.safetensors", shard)
        for i, shard in enumerate(shards, 1)
    ]
    _agree_on_plan(ranks, "the optimizer's state", plan)
    skeleton_file = f"{TRAINING_STATE_DIR}/optimizer.json"
    if ranks.is_main:
        rec.write_json(skeleton_file, skeleton)
    _write_owned(rec, ranks, plan, {"format": "pt"})
    cls = type(unwrap_optimizer(optimizer))
    return {
        "files": [skeleton_file, *(rel for rel, _ in plan)],
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "keys": "names",
    }


def owners(sizes: list[int], world: int) -> list[int]:
    """The rank that writes each file: the largest first, each to the least loaded rank."""
    load = [0] * world
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        out[i] = rank
        load[rank] += sizes[i]
    return out


def _agree_on_plan(
    ranks: Ranks, what: str, plan: list[tuple[str, dict[str, torch.Tensor]]]
) -> None:
    """Every rank must gather the same tensors in the same order: compare plans."""
    h = hashlib.sha256()
    for rel, shard in plan:
        h.update(rel.encode())
        for name in sorted(shard):
            t = shard[name]
            h.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}:{is_dtensor(t)}".encode())
    ranks.agree(what, h.hexdigest()[:16], "save(), planning the files")


def _write_owned(
    rec: FileRecorder,
    ranks: Ranks,
    plan: list[tuple[str, dict[str, torch.Tensor]]],
    metadata: Mapping[str, str],
) -> None:
    """Each file of ``plan`` written by its owner. Sharded tensors are gathered (every
    rank takes part, in the same order) one at a time to their owner, which hands them
    to a writer thread, so that gathering the next tensor overlaps with writing and
    hashing this one, as long as the gathered tensors waiting stay within the size of
    the largest one (so a rank never holds much more than one whole tensor). A rank
    whose write fails keeps taking part in the gathers, so that no other rank waits
    forever, and raises at the end."""
    sizes = [sum(t.numel() * t.element_size() for t in shard.values()) for _, shard in plan]
    largest = max((t.numel() * t.element_size() for _, sh in plan for t in sh.values()), default=0)
    writer = _FileWriter(rec, metadata, budget=max(largest, MIN_IN_FLIGHT_BYTES))
    try:
        for (rel, shard), owner in zip(plan, owners(sizes, ranks.world)):
            names = sorted(shard)
            mine = owner == ranks.rank
            if mine:
                writer.open(rel, {n: (shard[n].dtype, tuple(shard[n].shape)) for n in names})
            for name in names:
                t = shard[name]
                if mine:
                    writer.reserve(t.numel() * t.element_size())
                whole = _gather(t, owner, ranks.rank)
                if whole is not None:
                    writer.put(whole.detach().cpu(), t.numel() * t.element_size())
    finally:
        writer.close()


#: Small tensors may always wait for the writer up to this many bytes in all.
MIN_IN_FLIGHT_BYTES = 64 * 1024 * 1024


class _FileWriter:
    """One thread writing tensor files from tensors handed over in order, with the bytes
    of the tensors handed over but not yet written kept within ``budget``."""

    _END = object()

    def __init__(self, rec: FileRecorder, metadata: Mapping[str, str], budget: int) -> None:
        import queue
        import threading

        self.rec = rec
        self.metadata = metadata
        self.failure: BaseException | None = None
        self.budget = budget
        self._in_flight = 0
        self._room = threading.Condition()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="savepoints-rank-writer")
        self._thread.start()

    def open(self, rel: str, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        self._queue.put((rel, specs))

    def reserve(self, nbytes: int) -> None:
        """Wait until a tensor of ``nbytes`` may be gathered (the writer caught up)."""
        with self._room:
            self._room.wait_for(
                lambda: self._in_flight == 0 or self._in_flight + nbytes <= self.budget
            )
            self._in_flight += nbytes

    def _release(self, nbytes: int) -> None:
        with self._room:
            self._in_flight -= nbytes
            self._room.notify_all()

    def put(self, tensor: torch.Tensor, nbytes: int) -> None:
        self._queue.put((tensor, nbytes))

    def close(self) -> None:
        """Wait until every file is written; raise the first failure."""
        self._queue.put(self._END)
        self._thread.join()
        if self.failure is not None:
            raise self.failure

    def _take(self) -> tuple[torch.Tensor, int]:
        return cast(tuple[torch.Tensor, int], self._queue.get())

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            rel, specs = item
            if self.failure is not None:
                for _ in specs:  # keep taking what the gathering thread hands over
                    self._release(self._take()[1])
                continue
            taken = 0
            held = 0

            def fetch(name: str) -> torch.Tensor:
                nonlocal taken, held
                self._release(held)  # the previous tensor is written
                tensor, held = self._take()
                taken += 1
                return tensor

            try:
                self.rec.write_tensor_stream(rel, specs, fetch, self.metadata)
            except BaseException as e:
                self.failure = e
                for _ in range(len(specs) - taken):
                    self._release(self._take()[1])
            finally:
                self._release(held)


def _gather(t: torch.Tensor, owner: int, rank: int) -> torch.Tensor | None:
    """``t`` whole on rank ``owner`` (None elsewhere). A DTensor sharded on its first
    dimension over all ranks (FSDP2's layout) is gathered to the owner alone, into one
    buffer; other layouts through ``full_tensor`` (every rank takes part). Collective
    for DTensors; a plain (replicated) tensor needs nobody else."""
    if not is_dtensor(t):
        return t if rank == owner else None
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    dt: Any = t
    mesh = dt.device_mesh
    if mesh.size() == 1:  # one rank holds it all: nothing to gather
        return dt.to_local() if rank == owner else None
    if (
        mesh.ndim != 1
        or tuple(dt.placements) != (Shard(0),)
        or mesh.size() != dist.get_world_size()
        or dt.dim() == 0
    ):
        whole = _whole(t)
        return whole if rank == owner else None
    group = mesh.get_group()
    world = mesh.size()
    rows = dt.shape[0]
    chunk = -(-rows // world)
    local = dt.to_local()
    padded = local
    if local.shape[0] != chunk:
        padded = local.new_zeros((chunk, *dt.shape[1:]))
        padded[: local.shape[0]] = local
    padded = padded.contiguous()
    if rank == owner:
        buffer = local.new_empty((chunk * world, *dt.shape[1:]))
        dist.gather(padded, list(buffer.split(chunk)), dst=owner, group=group)
        return buffer[:rows]
    dist.gather(padded, None, dst=owner, group=group)
    return None


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a DTensor (collective)."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ reading


def prepare_named_optimizer(
    model: torch.nn.Module, optimizer: Any, folder: Path, info: Mapping[str, Any]
) -> Callable[[], None]:
    """Read an optimizer state stored by parameter name, check it against ``optimizer``
    (parameter groups, names, shapes) without changing anything, and return the function
    that loads it (through ``set_optimizer_state_dict``). Each rank reads only the
    slices of the tensors it holds."""
    from safetensors import safe_open

    base = unwrap_model(model)
    optim = unwrap_optimizer(optimizer)
    files = list(info.get("files", []))
    skeleton_file = component_path(folder, next(f for f in files if f.endswith(".json")))
    if skeleton_file.stat().st_size > MAX_STATE_JSON_BYTES:
        from savepoints.errors import CorruptSavePointError

        raise CorruptSavePointError(
            folder, [f"{skeleton_file.name}: too large"], failed="cannot be read"
        )
    skeleton = json.loads(skeleton_file.read_text(encoding="utf-8"))
    saved_cls = info.get("class")
    live_cls = f"{type(optim).__module__}.{type(optim).__qualname__}"
    if saved_cls and saved_cls != live_cls:
        raise StateMismatchError(
            "optimizer", folder, why=f"it is a {live_cls}, but the save point holds a {saved_cls}"
        )
    params = dict(base.named_parameters())
    groups = skeleton.get("param_groups", []) if isinstance(skeleton, dict) else []
    if len(groups) != len(optim.param_groups):
        raise StateMismatchError(
            "optimizer", folder, why=f"it has {len(optim.param_groups)} parameter group(s), "
            f"the save point {len(groups)}",
        )  # fmt: skip
    for i, (g, live) in enumerate(zip(groups, optim.param_groups)):
        if not isinstance(g, dict) or len(g.get("params", [])) != len(live["params"]):
            raise StateMismatchError(
                "optimizer", folder, why=f"parameter group {i} has {len(live['params'])} "
                "parameters, the save point another number",
            )  # fmt: skip
    unexpected = sorted(n for g in groups for n in g.get("params", []) if n not in params)
    state = skeleton.get("state", {}) if isinstance(skeleton, dict) else {}
    unexpected += sorted(n for n in state if n not in params and n not in unexpected)
    if unexpected:
        raise StateMismatchError("optimizer", folder, unexpected=unexpected)
    where: dict[str, tuple[str, tuple[int, ...], torch.dtype | None]] = {}
    for rel in files:
        if rel.endswith(".safetensors"):
            with safe_open(str(component_path(folder, rel)), "pt") as f:
                for key in f.keys():  # noqa: SIM118
                    sl = f.get_slice(key)
                    where[key] = (rel, tuple(sl.get_shape()), DTYPE_FROM_NAME.get(sl.get_dtype()))
    # Which parameter each stored tensor belongs to: its placement is the parameter's.
    owner_of: dict[str, torch.Tensor] = {}
    mismatched = []
    for name, entries in state.items():
        if not isinstance(entries, dict):
            continue
        for value in entries.values():
            key = tensor_ref(value)
            if key is not None:
                if key not in where:
                    raise StateMismatchError("optimizer", folder, missing=[str(key)])
                shape = where[key][1]
                param = params[name]
                if shape and shape != tuple(param.shape):
                    mismatched.append(f"{key} (saved {shape}, parameter {tuple(param.shape)})")
                owner_of[key] = param
    if mismatched:
        raise StateMismatchError("optimizer", folder, mismatched=mismatched)

    def apply() -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        tensors: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for key, (rel, _, _) in where.items():
            by_file.setdefault(rel, []).append(key)
        for rel, keys in by_file.items():
            with safe_open(str(component_path(folder, rel)), "pt") as f:
                for key in keys:
                    tensors[key] = _read_for(f, key, owner_of.get(key))
        osd = decode_tree(skeleton, tensors)
        set_optimizer_state_dict(base, optim, osd, options=StateDictOptions(full_state_dict=False))

    return apply


def _read_for(f: Any, key: str, param: torch.Tensor | None) -> torch.Tensor:
    """A stored tensor as the live parameter's state needs it: the local slice of a
    sharded parameter, placed like it; else whole."""
    shape = tuple(f.get_slice(key).get_shape())
    if param is None or not is_dtensor(param) or shape != tuple(param.shape):
        t: torch.Tensor = f.get_tensor(key)
        return t.to(param.device) if param is not None and not is_dtensor(param) else t
    from torch.distributed.tensor import DTensor

    dt: Any = param
    part = local_slice(param)
    local = f.get_slice(key)[part].to(dt.to_local().device)
    return DTensor.from_local(
        local, dt.device_mesh, dt.placements, run_check=False, shape=dt.shape, stride=dt.stride()
    )
