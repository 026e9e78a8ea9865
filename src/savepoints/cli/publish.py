"""``savepoints publish``: save points as versions of a model in git (LFS) or on the Hub."""

from __future__ import annotations

from pathlib import Path

import click

from savepoints.cli.output import (
    console,
    echo_json,
    err_console,
    esc,
    human_bytes,
    json_option,
    table,
    transfer_bar,
)
from savepoints.cli.resolve import is_point_folder, open_run, pick
from savepoints.errors import InvalidArgumentError
from savepoints.export import deployable_files
from savepoints.interop.lfs import is_lfs
from savepoints.savepoint import SavePoint

__all__ = ["publish_cmd"]


@click.command("publish")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("refs", nargs=-1)
@click.option(
    "--git",
    "git_dest",
    metavar="DEST",
    help="A folder (a working repository, created if needed), the path of a bare "
    "repository, or a repository URL (file://, https://, git@host:...).",
)
@click.option(
    "--hub",
    "repo_id",
    metavar="REPO_ID",
    help="A Hugging Face Hub model repository (USER/NAME), created if needed.",
)
@click.option("--all", "every", is_flag=True, help="Publish every save point of RUN.")
@click.option(
    "--with-state",
    is_flag=True,
    help="Publish the whole save point: training state and manifest too.",
)
@click.option(
    "--no-own-tags",
    is_flag=True,
    help="Tag each version step-N only, not with the save point's own tags.",
)
@click.option("--branch", help="Branch to publish onto (default: the checked-out or default one).")
@click.option("--private", is_flag=True, help="Create the Hub repository private (--hub).")
@click.option("--no-verify", is_flag=True, help="Do not check the bytes read against the manifest.")
@json_option()
def publish_cmd(run: Path, refs: tuple[str, ...], git_dest: str | None, repo_id: str | None,
                every: bool, with_state: bool, no_own_tags: bool, branch: str | None,
                private: bool, no_verify: bool, as_json: bool) -> None:  # fmt: skip
    """Publish save points of RUN (the latest; or REFS: steps, tags, latest, best; or
    --all) as versions of a model: one commit and one tag (step-N, and the save point's
    own tags) each, weights as Git LFS objects that unchanged versions share. By default
    what `export` ships (weights, config, tokenizer, a model card); --with-state adds
    the training state. Publishing a save point again changes nothing.

    \b
      savepoints publish runs/sentiment --all --git file:///srv/models/sentiment.git
      savepoints publish runs/sentiment best --hub alice/tweet-sentiment --private
    """
    if git_dest is not None and repo_id is not None:
        raise InvalidArgumentError(
            "--git and --hub name two destinations; publish to one at a time.",
            "Run the command once per destination.",
        )
    if private and repo_id is None:
        raise InvalidArgumentError("--private applies to --hub only.", "Leave it out with --git.")
    points = _chosen(run, refs, every)
    total = sum(
        p.manifest.files[rel].size
        for p in points
        for rel in (p.manifest.files if with_state else deployable_files(p))
        if is_lfs(rel)
    )
    say = _say if not as_json else (lambda _msg: None)
    what = f"hashing and placing weights of {len(points)} save point(s)"
    with transfer_bar(what, total) as advance:
        if repo_id is not None:
            from savepoints.interop.publish import publish_hub

            results = publish_hub(points, repo_id, with_state=with_state,
                                  own_tags=not no_own_tags, private=private,
                                  branch=branch or "main", verify=not no_verify,
                                  on_event=say, progress=advance)  # fmt: skip
            where = repo_id
        elif git_dest is not None:
            from savepoints.interop.publish import publish_git

            results = publish_git(points, git_dest, with_state=with_state,
                                  own_tags=not no_own_tags, branch=branch, verify=not no_verify,
                                  on_event=say, progress=advance)  # fmt: skip
            where = git_dest
        else:
            raise InvalidArgumentError(
                "Say where to publish: --git DEST or --hub REPO_ID.",
                "e.g. --git ./published-model, or --hub USER/NAME.",
            )
    if as_json:
        echo_json([{**r.__dict__, "tags": list(r.tags)} for r in results])
        return
    t = table(f"{run} -> {where}", ("step", "right"), "tags", "commit", ("changed", "right"),
              ("bytes", "right"), "status")  # fmt: skip
    for r in results:
        status = "already published" if r.already else "published"
        t.add_row(str(r.step), esc(", ".join(r.tags)), r.commit[:12], str(r.changed_files),
                  human_bytes(r.changed_bytes), status)  # fmt: skip
    console.print(t)
    last = results[-1].tags[0]
    if repo_id is not None:
        console.print(f"  load it: AutoModel.from_pretrained({repo_id!r}, revision={last!r})")
        console.print(f"  see it:  https://huggingface.co/{esc(repo_id)}")
    elif (Path(str(git_dest)) / ".git").is_dir():
        dest = esc(str(git_dest))
        console.print(f'  load it: AutoModel.from_pretrained("{dest}")  (the last version; '
                      f"git -C {dest} checkout TAG for another)")  # fmt: skip
    else:
        console.print(f"  get it:  git clone {esc(str(git_dest))} model && cd model && "
                      f"git checkout {last} && git lfs pull")  # fmt: skip


def _chosen(run: Path, refs: tuple[str, ...], every: bool) -> list[SavePoint]:
    if every and refs:
        raise InvalidArgumentError("--all and save points named one by one exclude each other.",
                                   "Pass either --all or the steps/tags.")  # fmt: skip
    if is_point_folder(run):
        if refs or every:
            raise InvalidArgumentError(
                f"{run} is a save point folder: it is the one save point published.",
                "Pass its run folder to name steps or --all.",
            )
        return [SavePoint.open(run)]
    points = open_run(run)
    if every:
        return points.list()
    return [pick(points, ref) for ref in refs or ("latest",)]


def _say(message: str) -> None:
    err_console.print(f"[cyan]savepoints[/] {esc(message)}")
