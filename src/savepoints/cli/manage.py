"""``savepoints tag``, ``untag``, ``rm``, ``du``, ``gc``, ``compact`` and ``expand``: the
commands that look after a run's versions and its disk."""

from __future__ import annotations

from pathlib import Path

import click

from savepoints import InvalidArgumentError, SavePoint, SavePoints
from savepoints.cli.output import console, done, echo_json, human_bytes, json_option, table
from savepoints.cli.resolve import open_run, pick

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


@click.command("untag")
@run_argument
@click.argument("step")
@click.argument("name")
def untag_cmd(run: Path, step: str, name: str) -> None:
    """Remove tag NAME from save point STEP of RUN (retention may then delete it)."""
    with open_run(run, write=True) as points:
        point = points.untag(pick(points, step).step, name)
    done(f"removed tag {name!r} from step {point.step}")


def _pick_all(points: SavePoints, steps: tuple[str, ...]) -> list[SavePoint]:
    """Every save point STEPS name, each once, in the order given; all found before any
    command changes one, so a typo in the last STEP changes nothing."""
    found: dict[int, SavePoint] = {}
    for s in steps:
        point = pick(points, s)
        found.setdefault(point.step, point)
    return list(found.values())


@click.command("rm")
@run_argument
@steps_argument
@click.option("--force", is_flag=True, help="Also remove tagged save points.")
def rm_cmd(run: Path, steps: tuple[str, ...], force: bool) -> None:
    """Delete save points STEPS (numbers, tags, 'latest' or 'best') of RUN. Each
    disappears atomically; no other save point is affected."""
    with open_run(run, write=True) as points:
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


@click.command("du")
@run_argument
@json_option()
def du_cmd(run: Path, as_json: bool) -> None:
    """Disk usage of RUN: logical bytes (every save point as a full copy), physical bytes
    (what is really on disk), each save point's unique bytes, and the dedup ratio."""
    points = open_run(run)
    u = points.usage()
    if as_json:
        echo_json({"logical": u.logical, "physical": u.physical, "ratio": u.ratio,
                   "garbage": u.garbage, "unique": u.unique})  # fmt: skip
        return
    t = table(f"{run}", ("step", "right"), ("size", "right"), ("unique", "right"))
    sizes = {p.step: p.size for p in points.list()}
    for step, unique in sorted(u.unique.items()):
        t.add_row(str(step), human_bytes(sizes[step]), human_bytes(unique))
    console.print(t)
    console.print(
        f"logical {human_bytes(u.logical)}  physical {human_bytes(u.physical)}  "
        f"dedup ratio {u.ratio:.2f}x"
        + (f"  garbage {human_bytes(u.garbage)} (savepoints gc frees it)" if u.garbage else "")
    )


@click.command("gc")
@run_argument
def gc_cmd(run: Path) -> None:
    """Free stored file contents that no save point of RUN references any more.
    Safe to interrupt: it only ever removes unreferenced data."""
    with open_run(run, write=True) as points:
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
