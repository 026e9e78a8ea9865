"""Lineage: where a save point came from, recorded in its manifest (``lineage``; the
shape is checked in manifest.py).

- **code**: the git commit of the training code's repository, and whether tracked files
  differed from it ("dirty"). git runs in the folder of the script being run
  (``sys.argv[0]``), or in the working directory when the program is an installed tool
  (``savepoints train``, pytest, torchrun's ``-m``) or ``python -c``. Absent outside a
  repository, in one without commits, or without git.
- **data**: the size and BLAKE3 hash of each file the training declared it reads
  (``SavePoints(path, data_files=[...])``; ``savepoints train`` declares DATA and
  ``--eval``), and one fingerprint over them.
- **command**, **host** and **session**: the command line (the program without its
  folder), the host name, and the id of the ``SavePoints`` session that wrote it: the run
  journal's, so that a manifest and the journal's lines about its process match.
- **chain**: the save points it descends from, newest first, one link per session. A
  new link is a resume: another process (or another opening of the run) continued from
  a save point, possibly one of another run, whose folder is then recorded.

Library versions are the manifest's own ``versions``.

Gathering never fails a save and never slows one down: git runs and the data files are
hashed once per process, in a thread started when the run is opened (so the dirty flag
describes the code as training started, not as it was edited since); a fact that cannot
be gathered is left out, with a warning once per process. Under ``torch.distributed``
only rank 0, which writes the manifests, gathers anything.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3

from savepoints.errors import InvalidArgumentError
from savepoints.journal import session_fields, url_without_secrets
from savepoints.manifest import (
    ChainFrom,
    ChainLink,
    CodeInfo,
    DataFile,
    DataInfo,
    Lineage,
    Manifest,
)

__all__ = [
    "Ancestry",
    "ChainLink",
    "CodeInfo",
    "DataFile",
    "DataInfo",
    "Lineage",
    "LineageSource",
    "check_data_files",
    "code_folder",
    "code_state",
    "data_state",
    "describe_chain",
    "lineage_rows",
    "probe_code",
]

log = logging.getLogger("savepoints")

#: Seconds one git command may take (a huge repository's ``git status``).
GIT_TIMEOUT = 20.0
#: The chain lists at most this many steps and links; older ones are left out (counted
#: in a link's ``more``), so a manifest stays small however long the run.
MAX_CHAIN_STEPS = 64
MAX_CHAIN_LINKS = 32
#: Seconds the first save waits for git and the data hashes; a save after them records
#: what came later.
GATHER_WAIT = 120.0

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(what: str, why: object) -> None:
    with _warned_lock:
        if what in _warned:
            return
        _warned.add(what)
    log.warning(
        "savepoints: could not record %s in the save points' lineage (%s); it is left out.",
        what, why,
    )  # fmt: skip


# ------------------------------------------------------------------------------- code


def code_folder() -> Path:
    """The folder git is asked about: the running script's, unless the program is an
    installed tool or there is no script file (``python -c``, the REPL): then the
    working directory, where a project's own tools are run from."""
    script = sys.argv[0] if sys.argv else ""
    if script and os.path.isfile(script):
        folder = Path(os.path.realpath(script)).parent
        # `python -m savepoints train ...` runs our own __main__.py: the training code
        # is the user's project, where the command is run from, not savepoints' checkout.
        ours = Path(os.path.realpath(__file__)).parent
        if not _installed(folder) and not folder.is_relative_to(ours):
            return folder
    return Path.cwd()


def _installed(folder: Path) -> bool:
    """Whether ``folder`` is where Python installs packages or scripts (a console script
    such as ``savepoints`` or ``pytest``, a module run with ``-m``)."""
    places = [sysconfig.get_path(k) for k in ("purelib", "platlib", "scripts", "stdlib")]
    try:
        places += [*site.getsitepackages(), site.getusersitepackages()]
        places.append(os.path.join(site.getuserbase(), "bin"))
    except Exception:  # a stripped-down interpreter without site's paths
        pass
    for place in places:
        if not place:
            continue
        if folder.is_relative_to(os.path.realpath(place)):
            return True
    return False


def probe_code(folder: Path) -> CodeInfo | None:
    """The git state of the repository holding ``folder``, asked now (uncached); None
    outside a repository, in one without commits, or when git is not installed.
    Raises when git itself fails otherwise (a timeout...)."""
    git = shutil.which("git")
    if git is None:
        return None
    # No optional locks: ``git status`` must not rewrite the index of a repository the
    # user may be committing in at this very moment. Never prompt for anything.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            # fsmonitor: a repository's config must not make us run its hook program.
            [git, "-c", "core.fsmonitor=false", "-C", str(folder), *args],
            capture_output=True, text=True,
            encoding="utf-8", errors="replace", timeout=GIT_TIMEOUT, env=env,
            stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip

    head = run("rev-parse", "--show-toplevel", "HEAD", "--abbrev-ref", "HEAD")
    lines = head.stdout.splitlines()
    if head.returncode != 0 or len(lines) != 3:
        # Not a repository, no commit yet, or one git refuses (another owner's).
        log.debug("savepoints: no git commit for %s: %s", folder, head.stderr.strip()[:300])
        return None
    root, commit, branch = lines
    status = run("status", "--porcelain", "--untracked-files=no")
    if status.returncode != 0:
        raise RuntimeError(f"git status failed: {status.stderr.strip()[:300]}")
    info: CodeInfo = {"commit": commit, "dirty": bool(status.stdout.strip())}
    if branch != "HEAD":  # "HEAD": detached
        info["branch"] = branch
    info["root"] = root
    remote = _without_credentials(run("config", "--get", "remote.origin.url").stdout.strip())
    if remote:
        info["remote"] = remote
    return info


def _without_credentials(url: str) -> str | None:
    """A remote URL without the user name and password an https URL may carry, or a
    query (a token there would otherwise end up in every manifest); None for none."""
    if not url:
        return None
    if "://" not in url:
        return url  # scp-like (git@host:path) or a path: no secret in it
    return url_without_secrets(url)


_CODE: dict[Path, CodeInfo | None] = {}
_CODE_LOCK = threading.Lock()


def code_state(folder: Path | None = None) -> CodeInfo | None:
    """:func:`probe_code` of ``folder`` (default :func:`code_folder`), once per process:
    the code a process runs was loaded when it started."""
    folder = code_folder() if folder is None else folder
    with _CODE_LOCK:
        if folder not in _CODE:
            _CODE[folder] = probe_code(folder)
        return _CODE[folder]


# ------------------------------------------------------------------------------- data


def check_data_files(
    files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None,
) -> tuple[Path, ...]:
    """The ``data_files`` argument, checked: existing files or folders, made absolute."""
    if files is None:
        return ()
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    checked: list[Path] = []
    for name in files:
        if not isinstance(name, (str, os.PathLike)):
            raise InvalidArgumentError(
                f"data_files holds {name!r}, which is not a path.",
                "Pass the paths of the files the training reads, e.g. "
                "data_files=['data/train.jsonl', 'data/dev.jsonl'].",
            )
        path = Path(os.path.abspath(name))
        try:
            mode = path.stat().st_mode
        except OSError as e:
            raise InvalidArgumentError(
                f"data_files names {path}, which cannot be read ({e.strerror}).",
                "Pass the files the training reads, as they are on this machine.",
            ) from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise InvalidArgumentError(
                f"data_files names {path}, which is neither a file nor a folder.",
                "Pass the files the training reads.",
            )
        if path not in checked:
            checked.append(path)
    return tuple(checked)


_HASHES: dict[tuple[str, int, int], str] = {}
#: Files changed less than this long ago (ns) are hashed again next time.
RACY_NS = 2_000_000_000
_HASHES_LOCK = threading.Lock()


def _file_hash(path: Path) -> tuple[int, str]:
    """Size and BLAKE3 of a file, remembered by (path, size, mtime): opening a run again
    in the same process does not read unchanged data again."""
    from savepoints.integrity import hash_file  # integrity imports the manifest module

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _HASHES_LOCK:
        known = _HASHES.get(key)
    if known is not None:
        return st.st_size, known
    size, digest = hash_file(path)
    # Not a file written moments ago: a write in the same clock tick after the hash
    # would leave its size and mtime as they were (git calls such entries "racy").
    if time.time_ns() - st.st_mtime_ns > RACY_NS:
        with _HASHES_LOCK:
            _HASHES[key] = digest
    return size, digest


def _data_entry(path: Path) -> DataFile:
    if not path.is_dir():
        size, digest = _file_hash(path)
        return {"path": str(path), "size": size, "blake3": digest}
    # A folder (a dataset saved to disk): one entry, hashing its files' names, sizes and
    # hashes in name order, so that it is one line in the manifest whatever it holds.
    listing = blake3.blake3()
    total = count = 0
    for top, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            file = Path(top) / name
            if not file.is_file():
                continue
            size, digest = _file_hash(file)
            rel = file.relative_to(path).as_posix()
            listing.update(f"{rel}\0{size}\0{digest}\n".encode("utf-8", "surrogateescape"))
            total += size
            count += 1
    return {"path": str(path), "size": total, "blake3": listing.hexdigest(), "files": count}


def data_state(files: Sequence[Path]) -> DataInfo | None:
    """Each of ``files`` with its size and hash, and their fingerprint: BLAKE3 of their
    sizes and hashes in the given order (not their paths: the same data moved elsewhere
    has the same fingerprint)."""
    if not files:
        return None
    entries = [_data_entry(path) for path in files]
    summary = "".join(f"{e['size']} {e['blake3']}\n" for e in entries)
    return {"fingerprint": blake3.blake3(summary.encode()).hexdigest(), "files": entries}


# ------------------------------------------------------------------------------ chain


@dataclass(frozen=True)
class Ancestry:
    """What the next save point of a session descends from: its parent's step and
    chain, and the parent's folder when it is not one of this run's."""

    parent: int | None = None
    chain: tuple[ChainLink, ...] = ()
    elsewhere: str | None = None

    @classmethod
    def restored(cls, manifest: Manifest, elsewhere: str | None = None) -> Ancestry:
        """After restoring the save point of ``manifest``: continue from it and its
        chain (``elsewhere``: its folder, when it is not one of this run's)."""
        chain = () if manifest.lineage is None else manifest.lineage.chain
        return cls(manifest.step, chain, elsewhere)

    def then(self, step: int, session: str | None) -> tuple[Ancestry, tuple[ChainLink, ...]]:
        """The chain of a save point of ``step`` written now by ``session``, and the
        ancestry of the save point after it."""
        chain = grow_chain(self.chain, step=step, parent=self.parent, session=session,
                           elsewhere=self.elsewhere)  # fmt: skip
        return Ancestry(step, chain), chain


def grow_chain(
    chain: Sequence[ChainLink], *, step: int, parent: int | None, session: str | None,
    elsewhere: str | None = None,
) -> tuple[ChainLink, ...]:  # fmt: skip
    """The chain of a new save point of ``step``, given its parent's step and chain."""
    link: ChainLink = {} if session is None else {"session": session}
    if parent is None:  # a fresh start: no ancestry
        return ({**link, "steps": [step], "from": None},)
    head = chain[0] if chain else None
    # The parent's chain is inherited only when it ends in the parent: a manifest from
    # before lineage has none, and a parent set by hand (``writer.parent = 7``) none.
    inherited = head is not None and head.get("steps", [])[:1] == [parent]
    if inherited and head is not None and elsewhere is None and session is not None \
            and head.get("session") == session:  # fmt: skip
        steps = head.get("steps", [])
        grown: ChainLink = {**head, "steps": steps if steps[:1] == [step] else [step, *steps]}
        return _capped([grown, *chain[1:]])
    came: ChainFrom = {"step": parent}
    if elsewhere is not None:
        came["path"] = elsewhere
    return _capped([{**link, "steps": [step], "from": came}, *(chain if inherited else ())])


def _capped(chain: list[ChainLink]) -> tuple[ChainLink, ...]:
    """At most :data:`MAX_CHAIN_STEPS` steps and :data:`MAX_CHAIN_LINKS` links, leaving
    the oldest out (a link that loses steps counts them in ``more``)."""
    chain = chain[:MAX_CHAIN_LINKS]
    excess = sum(len(link.get("steps", [])) for link in chain) - MAX_CHAIN_STEPS
    i = len(chain) - 1
    while excess > 0 and i > 0:
        steps = chain[i].get("steps", [])
        cut = min(excess, len(steps))
        if cut == len(steps):
            chain.pop(i)  # the whole link: the one after it still says where it came from
        else:
            more = chain[i].get("more", 0) + cut
            chain[i] = {**chain[i], "steps": steps[: len(steps) - cut], "more": more}
        excess -= cut
        i -= 1
    if excess > 0:  # one link alone: its oldest steps go
        steps = chain[0].get("steps", [])
        keep = max(1, len(steps) - excess)
        more = chain[0].get("more", 0) + len(steps) - keep
        chain[0] = {**chain[0], "steps": steps[:keep], "more": more}
    return tuple(chain)


def describe_chain(
    chain: Sequence[ChainLink], *, names_only: bool = False, sessions: bool = True
) -> list[str]:
    """The chain as lines, newest first, one per session, with what came before each:
    ``step 96 ← 72  (session e5f6a7b8)`` / ``↑ resumed from step 48``. With
    ``names_only``, the folder of a save point of another run is named by its last two
    parts (run and step folder); ``sessions=False`` leaves the session ids out."""
    lines: list[str] = []
    for i, link in enumerate(chain):
        steps = " ← ".join(str(s) for s in link.get("steps", []))
        more = link.get("more", 0)
        if more:
            steps += f" ← … ({more} more)"
        session = link.get("session") if sessions else None
        lines.append(f"step {steps}" + (f"  (session {session})" if session else ""))
        came = link.get("from")
        if came is None:
            lines.append("started afresh")
            continue
        where = came.get("path")
        if where is not None:
            shown = "/".join(Path(where).parts[-2:]) if names_only else where
            lines.append(f"↑ continued from step {came.get('step')} of another run ({shown})")
        else:
            lines.append(f"↑ resumed from step {came.get('step')}")
        following = chain[i + 1] if i + 1 < len(chain) else None
        if following is None or following.get("steps", [])[:1] != [came.get("step")]:
            lines.append("(nothing recorded before it)")
    return lines


# ----------------------------------------------------------------------------- source


class LineageSource:
    """The facts one ``SavePoints`` session records in each manifest it writes. The
    slow ones (git, data hashes) are gathered in a background thread started here; the
    first manifest waits for it (up to :data:`GATHER_WAIT` seconds). Nothing here
    raises: what cannot be gathered is left out, with a warning."""

    def __init__(self, session: str, data_files: Sequence[Path] = ()) -> None:
        self.session = session
        self.data_files = tuple(data_files)
        self.command: tuple[str, ...] | None = None
        self.host: str | None = None
        self._folder: Path | None = None
        self._code: CodeInfo | None = None
        self._data: DataInfo | None = None
        self._waited = False
        try:
            about = session_fields()  # what the journal's "open" line says of the process
            self.command, self.host = _command(about["argv"]), str(about["host"])
        except Exception as e:
            _warn_once("the command and host", e)
        try:
            # Now, in the caller's thread: a script may change its working directory later.
            self._folder = code_folder()
        except Exception as e:  # the working directory was removed, say
            _warn_once("the code's git commit", e)
        self._thread: threading.Thread | None = threading.Thread(
            target=self._gather, name="savepoints-lineage", daemon=True
        )
        try:
            self._thread.start()
        except RuntimeError as e:  # no thread to be had
            self._thread = None
            _warn_once("the code's git commit and the data's fingerprint", e)

    def _gather(self) -> None:
        if self._folder is not None:
            try:
                self._code = code_state(self._folder)
            except Exception as e:
                _warn_once("the code's git commit", e)
        try:
            self._data = data_state(self.data_files)
        except Exception as e:
            _warn_once("the training data's fingerprint", e)

    def lineage(self, chain: Sequence[ChainLink]) -> Lineage:
        """The lineage of a save point whose chain is ``chain``."""
        if self._thread is not None and not self._waited:
            # Only the first save point waits: later ones take what has arrived.
            self._waited = True
            self._thread.join(GATHER_WAIT)
            if self._thread.is_alive():  # a huge repository, or data: the next saves get it
                late = f"not ready after {GATHER_WAIT:g} s; later save points get them"
                _warn_once("git's answer or the data's hashes in time", late)
        return Lineage(session=self.session, code=self._code, data=self._data,
                       command=self.command, host=self.host, chain=tuple(chain))  # fmt: skip


def _command(argv: Sequence[str]) -> tuple[str, ...]:
    """The command line; a module run with ``python -m`` as such (its ``__main__.py``
    would say nothing)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    if argv and isinstance(name, str) and name:
        return ("python", "-m", name.removesuffix(".__main__"), *argv[1:])
    return tuple(argv)


def lineage_for(source: LineageSource | None, chain: Sequence[ChainLink]) -> Lineage | None:
    """:meth:`LineageSource.lineage`, or None (with a warning, once) when anything about
    it fails: a save never fails for its lineage."""
    if source is None:
        return None
    try:
        return source.lineage(chain)
    except Exception as e:
        _warn_once("the lineage", e)
        return None


def card_command(command: Sequence[str]) -> list[str]:
    """A command line for a published card: absolute paths (and ``--opt=/path``) become
    their last name, so that the card does not show the writer's folders."""
    out = []
    for arg in command:
        key, eq, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
        if os.path.isabs(value) or value.startswith("~"):
            value = Path(value).name or value
        out.append(f"{key}{eq}{value}")
    return out


# ---------------------------------------------------------------------------- reading


def lineage_rows(
    lineage: Lineage | None, *, size: Callable[[int], str] = lambda n: f"{n} bytes"
) -> list[tuple[str, str]]:
    """``lineage`` as (label, text) rows for ``savepoints show`` (a blank label
    continues the row above)."""
    if lineage is None:
        return [("lineage", "not recorded (a save point from before savepoints recorded it)")]
    rows: list[tuple[str, str]] = []
    code = lineage.code
    if code is not None:
        where = [code.get("branch"), "uncommitted changes" if code.get("dirty") else None]
        said = ", ".join(w for w in where if w)
        rows.append(("code", f"git {code.get('commit', '?')}" + (f" ({said})" if said else "")))
        if code.get("root"):
            rows.append(("", f"in {code['root']}"))
        if code.get("remote"):
            rows.append(("", f"remote {code['remote']}"))
    else:
        rows.append(("code", "no git commit recorded (not run from a git repository)"))
    data = lineage.data
    if data is not None:
        rows.append(("data", f"fingerprint {data.get('fingerprint', '?')}"))
        for entry in data.get("files", []):
            count = f", {entry['files']} files" if "files" in entry else ""
            rows.append(("", f"{entry['path']}  ({size(entry['size'])}{count}, "
                             f"blake3 {entry['blake3'][:16]})"))  # fmt: skip
    if lineage.command is not None:
        rows.append(("command", shlex.join(lineage.command)))
    if lineage.host is not None:
        rows.append(("host", lineage.host))
    if lineage.session is not None:
        rows.append(("session", lineage.session))
    for i, line in enumerate(describe_chain(lineage.chain)):
        rows.append(("history" if i == 0 else "", line))
    return rows
