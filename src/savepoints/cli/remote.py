"""``savepoints push`` and ``pull``, and the remote side of ``list``, ``show``, ``verify``
and ``du`` (which take a URL where they take a run)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from savepoints import keep as keep_mod
from savepoints.cli.output import (
    console,
    done,
    echo_json,
    human_bytes,
    json_option,
    table,
    transfer_bar,
)
from savepoints.cli.resolve import open_run, pick
from savepoints.errors import InvalidArgumentError, SavePointNotFoundError
from savepoints.layout import folder_name
from savepoints.manifest import Manifest
from savepoints.savepoint import SavePoint
from savepoints.storage.remote import RemoteRun, as_url, is_url
from savepoints.storage.tier import pull_run, push_run

__all__ = ["is_url", "pull_cmd", "push_cmd"]


@click.command("push")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("url")
@click.argument("steps", nargs=-1)
@json_option()
def push_cmd(run: Path, url: str, steps: tuple[str, ...], as_json: bool) -> None:
    """Copy the save points of RUN (all, or STEPS: numbers, tags, latest, best) to URL
    (s3://bucket/prefix, gs://, az://, file:// or a folder). Files the remote has are not
    sent again; each manifest is written last, so a push stopped at any moment leaves
    nothing half there, and running it again completes it."""
    points = open_run(run)
    chosen = sorted({pick(points, ref).step for ref in steps})
    listed = [p for p in points.list() if not chosen or p.step in chosen]
    total = sum(p.size for p in listed)
    with transfer_bar(f"pushing to {url}", total) as advance:
        reports = push_run(run, url, chosen or None, progress=advance)
    if as_json:
        echo_json([r.__dict__ for r in reports])
        return
    t = table(f"{run} -> {as_url(url)}", ("step", "right"), ("sent", "right"),
              ("already there", "right"), ("seconds", "right"))  # fmt: skip
    for r in reports:
        sent = "already pushed" if r.already else human_bytes(r.uploaded_bytes)
        t.add_row(str(r.step), sent, human_bytes(r.skipped_bytes), f"{r.seconds:.2f}")
    console.print(t)
    done(f"{len(reports)} save point(s) on {as_url(url)}")


@click.command("pull")
@click.argument("url")
@click.argument("run", type=click.Path(path_type=Path, file_okay=False))
@click.argument("step", required=False)
def pull_cmd(url: str, run: Path, step: str | None) -> None:
    """Fetch save points from URL into the local run RUN (created if needed): those it
    lacks, or STEP (a number, a tag, latest or best). Every file is verified as it
    arrives; files RUN already holds are linked, not downloaded."""
    remote = RemoteRun.open(url)
    known = remote.points()
    steps = [remote_pick(remote.url, known, step)] if step is not None else None
    total = sum(m.total_size for s, m in known.items() if steps is None or s in steps)
    with transfer_bar(f"pulling from {remote.url}", total) as advance:
        pulled = pull_run(remote, run, steps, progress=advance, known=known)
    for folder, manifest in pulled:
        done(f"step {manifest.step} -> {folder} ({human_bytes(manifest.total_size)}, verified)")
    if not pulled:
        done(f"{run} already holds {'it' if step else 'every save point of ' + remote.url}")


# ---------------------------------------------------------------------- remote reading


def remote_points(url: str) -> tuple[RemoteRun, list[SavePoint]]:
    remote = RemoteRun.open(url)
    return remote, [
        SavePoint(Path(folder_name(s)), m, remote=remote.url)
        for s, m in sorted(remote.points().items())
    ]


def remote_best(listed: Sequence[SavePoint], metric: str | None = None) -> int | None:
    """The best step by ``metric`` (default: the rule the newest save point recorded)."""
    if not listed:
        return None
    rule = listed[-1].manifest.keep or {}
    metric = metric or rule.get("metric")
    if not metric:
        return None
    mode = rule.get("mode") if metric == rule.get("metric") else None
    infos = [keep_mod.PointInfo(p.step, p.metrics, p.tags) for p in listed]
    ranked = keep_mod.rank_best(infos, metric, mode or keep_mod.default_mode(metric))
    return ranked[0].step if ranked else None


def remote_pick(url: str, known: dict[int, Manifest], ref: str | None) -> int:
    """The step that ``ref`` names among a remote's save points (None: the latest)."""
    listed = [SavePoint(Path(folder_name(s)), m) for s, m in sorted(known.items())]
    ref = ref or "latest"
    found: int | None = None
    if ref == "latest":
        found = listed[-1].step if listed else None
    elif ref == "best":
        found = remote_best(listed)
        if found is None and listed:
            raise InvalidArgumentError(
                f"{url} records no metric that defines its best save point.",
                "Name a step or a tag instead.",
            )
    elif ref.isdigit():
        found = int(ref) if int(ref) in known else None
    else:
        found = next((p.step for p in listed if ref in p.tags), None)
    if found is None:
        raise SavePointNotFoundError(url, ref, sorted(known))
    return found


def remote_point(url: str, ref: str | None) -> SavePoint:
    remote, listed = remote_points(url)
    step = remote_pick(remote.url, {p.step: p.manifest for p in listed}, ref)
    return next(p for p in listed if p.step == step)


def remote_verify(url: str, ref: str | None) -> list[Any]:
    remote, listed = remote_points(url)
    if ref is not None:
        steps = [remote_pick(remote.url, {p.step: p.manifest for p in listed}, ref)]
    else:
        steps = [p.step for p in listed]
    return [remote.verify(step) for step in steps]


def remote_usage(url: str) -> tuple[Any, dict[int, int]]:
    remote, listed = remote_points(url)
    return remote.usage({p.step: p.manifest for p in listed}), {p.step: p.size for p in listed}


def is_remote(target: object) -> bool:
    return isinstance(target, str) and is_url(target)
