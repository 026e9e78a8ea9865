"""``savepoints tag``, ``untag``, ``rm``, ``du``, ``gc``, ``compact`` and ``expand``: the
commands that look after a run's versions and its disk."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click

from savepoints import InvalidArgumentError, RunNotFoundError, SavePoint, SavePoints
from savepoints.cli.output import (
    console,
    done,
    echo_json,
    esc,
    human_bytes,
    json_option,
    table,
)
from savepoints.cli.remote import is_remote, remote_pick, remote_points, remote_usage
from savepoints.cli.resolve import open_run, pick
from savepoints.integrity import SIGNATURE_NAME
from savepoints.storage.remote import DEFAULT_GC_GRACE, RemoteRun

run_argument = click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
steps_argument = click.argument("steps", nargs=-1, required=True)


@click.command("tag")
@run_argument
@click.argument("step")
@click.argument("name")
def tag_cmd(run: Path, step: str, name: str) -> None:
    """Tag save point STEP of RUN (a number, a tag, 'latest' or 'best') as NAME. Tagged
    save points are never deleted by retention, and NAME can be used wherever a step is
    expected."""
    with open_run(run, write=True) as points:
        point = points.tag(pick(points, step).step, name)
    done(f"step {point.step} tagged {name!r}: {', '.join(point.tags)}")
    _warn_if_signed(point)


def _warn_if_signed(point: SavePoint) -> None:
    """Tags live in the manifest, which the signature covers."""
    if (point.path / SIGNATURE_NAME).is_file():
        console.print(
            f"[yellow]note[/]: step {point.step} was signed; its manifest changed, so the "
            f"signature no longer matches. Sign it again: savepoints sign "
            f"{esc(str(point.path))} --key private.pem"
        )


@click.command("untag")
@run_argument
@click.argument("step")
@click.argument("name")
def untag_cmd(run: Path, step: str, name: str) -> None:
    """Remove tag NAME from save point STEP of RUN (retention may then delete it)."""
    with open_run(run, write=True) as points:
        point = points.untag(pick(points, step).step, name)
    done(f"removed tag {name!r} from step {point.step}")
    _warn_if_signed(point)


def _pick_all(points: SavePoints, steps: tuple[str, ...]) -> list[SavePoint]:
    """Every save point STEPS name, each once, in the order given; all found before any
    command changes one, so a typo in the last STEP changes nothing."""
    found: dict[int, SavePoint] = {}
    for s in steps:
        point = pick(points, s)
        found.setdefault(point.step, point)
    return list(found.values())


@click.command("rm")
@click.argument("run", type=click.Path(path_type=str))
@steps_argument
@click.option("--force", is_flag=True, help="Also remove tagged save points.")
def rm_cmd(run: str, steps: tuple[str, ...], force: bool) -> None:
    """Delete save points STEPS (numbers, tags, 'latest' or 'best') of RUN (a folder or
    a remote URL). Each disappears atomically; no other save point is affected."""
    if is_remote(run):
        _rm_remote(run, steps, force)
        return
    with open_run(_existing_run(run), write=True) as points:
        targets = _pick_all(points, steps)
        tagged = [p for p in targets if p.tags]
        if tagged and not force:
            raise InvalidArgumentError(
                "Step(s) "
                + ", ".join(f"{p.step} ({', '.join(p.tags)})" for p in tagged)
                + " are tagged; nothing was deleted.",
                "Untag them first, or pass --force.",
            )
        for p in targets:
            points.delete(p.step)
            done(f"deleted step {p.step}")


def _rm_remote(url: str, steps: tuple[str, ...], force: bool) -> None:
    remote, listed = remote_points(url)
    known = {p.step: p.manifest for p in listed}
    targets = sorted({remote_pick(remote.url, known, ref) for ref in steps})
    tagged = [s for s in targets if known[s].tags]
    if tagged and not force:
        raise InvalidArgumentError(
            "Step(s) " + ", ".join(f"{s} ({', '.join(known[s].tags)})" for s in tagged)
            + " are tagged; nothing was deleted.",
            "Untag them first, or pass --force.",
        )  # fmt: skip
    for step in targets:
        remote.delete(step)
        done(f"deleted step {step} of {remote.url} (its files go with `savepoints gc`)")


@click.command("du")
@click.argument("run", type=click.Path(path_type=str))
@json_option()
def du_cmd(run: str, as_json: bool) -> None:
    """Disk usage of RUN (a folder or a remote URL): logical bytes (every save point as a
    full copy), physical bytes (what is really stored), each save point's unique bytes,
    and the dedup ratio."""
    if is_remote(run):
        u, sizes = remote_usage(run)
    else:
        points = open_run(_existing_run(run))
        u = points.usage()
        sizes = {p.step: p.size for p in points.list()}
    if as_json:
        echo_json({"logical": u.logical, "physical": u.physical, "ratio": u.ratio,
                   "garbage": u.garbage, "unique": u.unique})  # fmt: skip
        return
    t = table(f"{run}", ("step", "right"), ("size", "right"), ("unique", "right"))
    for step, unique in sorted(u.unique.items()):
        t.add_row(str(step), human_bytes(sizes[step]), human_bytes(unique))
    console.print(t)
    console.print(
        f"logical {human_bytes(u.logical)}  physical {human_bytes(u.physical)}  "
        f"dedup ratio {u.ratio:.2f}x"
        + (f"  garbage {human_bytes(u.garbage)} (savepoints gc frees it)" if u.garbage else "")
    )


def _existing_run(run: str) -> Path:
    path = Path(run)
    if not path.is_dir():
        raise RunNotFoundError(path)
    return path


@click.command("gc")
@click.argument("run", type=click.Path(path_type=str))
@click.option(
    "--grace", type=float, default=DEFAULT_GC_GRACE.total_seconds(), show_default=True,
    help="Remote only: keep unreferenced files younger than this many seconds (a push "
    "in flight uploads its files before its manifest).",
)  # fmt: skip
def gc_cmd(run: str, grace: float) -> None:
    """Free stored file contents that no save point of RUN (a folder or a remote URL)
    references any more. Safe to interrupt: it only ever removes unreferenced data."""
    if is_remote(run):
        blobs, freed = RemoteRun.open(run, writable=True).collect(timedelta(seconds=grace))
    else:
        with open_run(_existing_run(run), write=True) as points:
            blobs, freed = points.gc()
    done(f"freed {human_bytes(freed)} in {blobs} unreferenced blob(s)")


def _compact(run: Path, steps: tuple[str, ...], expand: bool) -> None:
    with open_run(run, write=True) as points:
        for point in _pick_all(points, steps):
            after = points.compact(point.step, expand=expand)
            verb = "expanded" if expand else "compacted"
            done(
                f"{verb} step {after.step}: {human_bytes(point.size)} → "
                f"{human_bytes(after.size)} ({point.size / max(after.size, 1):.2f}x)"
            )


@click.command("compact")
@run_argument
@steps_argument
def compact_cmd(run: Path, steps: tuple[str, ...]) -> None:
    """Compress save points STEPS of RUN losslessly (byte grouping + zstd) for keeping.
    `restore()` reads them as they are; `expand` makes them loadable by from_pretrained."""
    _compact(run, steps, expand=False)


@click.command("expand")
@run_argument
@steps_argument
def expand_cmd(run: Path, steps: tuple[str, ...]) -> None:
    """Rebuild compacted save points STEPS of RUN into plain, byte-identical files."""
    _compact(run, steps, expand=True)
