"""Typed errors.

Every error a user can cause is one of these. Each also inherits the matching built-in
(``FileNotFoundError``, ``ValueError``...) so code that catches built-ins keeps working,
carries the objects it is about as attributes (``.path``, ``.step``...), and its message
says what went wrong, with which object, why, and ends with how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class SavePointsError(Exception):
    """Base class of every error raised by savepoints.

    ``message`` says what went wrong, with which object and why; ``hint`` says how to fix
    it. They are kept apart so that the CLI prints them on their own lines; ``str(err)``
    joins them, so a traceback in a script still ends with the remedy.
    """

    #: What went wrong, with which object, and why.
    message: str = ""
    #: A short remedy, shown by the CLI on its own line; also the end of ``str(err)``.
    hint: str = ""

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip() if self.hint else self.message


class RunNotFoundError(SavePointsError, FileNotFoundError):
    """A run folder that should exist does not."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"Run folder {path} does not exist.",
            "Check the path, or open it for writing (readonly=False) to create it.",
        )


class NotARunError(SavePointsError, NotADirectoryError):
    """The run path exists but is not a folder (a file, say)."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        super().__init__(
            f"{path} cannot be a savepoints run: {why}.",
            "Pass a folder path (it is created if missing), or move the file away.",
        )


class RunNotWritableError(SavePointsError, PermissionError):
    """The run folder cannot be written (permissions, read-only file system)."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        super().__init__(
            f"Cannot write save points into {path}: {why}.",
            "Fix the folder's permissions, pick a writable path, or open the run with "
            "readonly=True to only read it. Nothing already saved was touched.",
        )


class DiskFullError(SavePointsError, OSError):
    """The file system ran out of space while a save point was written."""

    def __init__(self, path: Path, step: int) -> None:
        self.path = path
        self.step = step
        super().__init__(
            f"No space left on the device of {path} while saving step {step}; the partial "
            "save point was removed and every earlier one is intact.",
            "Free space (savepoints gc RUN, savepoints rm RUN STEP..., or a Keep(last=...)) "
            "and save again; training can go on meanwhile.",
        )
        self.errno = 28  # ENOSPC


class RunLockedError(SavePointsError, BlockingIOError):
    """Another process has the run open for writing."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(
            f"Run {path} is open for writing by another process ({holder}); two writers "
            "would overwrite each other's save points.",
            "Stop the other process, write to another run folder, or open this one with "
            "SavePoints(path, readonly=True) to read it while the other process trains.",
        )


class ReadOnlyRunError(SavePointsError, PermissionError):
    """A write was asked of a run opened with ``readonly=True``."""

    def __init__(self, path: Path, action: str) -> None:
        self.path = path
        super().__init__(
            f"Cannot {action}: run {path} was opened with readonly=True.",
            "Open it with SavePoints(path) (readonly=False) to write.",
        )


class SavePointNotFoundError(SavePointsError, LookupError):
    """No committed save point matches a step (or other selector)."""

    def __init__(self, run: Path | str, selector: object, available: Sequence[int]) -> None:
        self.run = run
        self.selector = selector
        self.available = list(available)
        if self.available:
            shown = ", ".join(str(s) for s in self.available[-10:])
            more = f" (last 10 of {len(self.available)})" if len(self.available) > 10 else ""
            have = f"it has steps {shown}{more}"
        else:
            have = "it has no committed save points yet"
        super().__init__(
            f"Run {run} has no save point {selector!r}: {have}.",
            "Pick one of those steps (`savepoints list RUN` shows them).",
        )


class SavePointGoneError(SavePointsError, FileNotFoundError):
    """A save point was deleted (by retention or ``rm`` of another process) while it was
    being read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"Save point {path} was deleted while it was being read (retention or `rm` of "
            "the process writing this run); nothing was changed.",
            "Read another save point: `savepoints list RUN` shows what is there now.",
        )


class SavePointExistsError(SavePointsError, FileExistsError):
    """Saving a step that is already committed, without ``overwrite=True``."""

    def __init__(self, path: Path, step: int, committed: bool = True) -> None:
        self.path = path
        self.step = step
        what = (
            "a save point"
            if committed
            else "a folder that is not a committed save point (no valid savepoint.json)"
        )
        super().__init__(
            f"Cannot save step {step}: {path} already holds {what}; it was left untouched.",
            "Pass overwrite=True to replace it, or save under another step.",
        )


class InvalidArgumentError(SavePointsError, ValueError):
    """An argument has a value savepoints cannot use."""


class RunClosedError(InvalidArgumentError):
    """A write was asked of a ``SavePoints`` that was closed."""

    def __init__(self, path: Path, action: str) -> None:
        self.path = path
        super().__init__(
            f"Cannot {action}: this SavePoints for {path} was closed.",
            "Open the run again with SavePoints(path).",
        )


class TagInUseError(InvalidArgumentError):
    """A tag names one save point per run, and this one is already on another step."""

    def __init__(self, run: Path, tag: str, step: int) -> None:
        self.run = run
        self.tag = tag
        self.step = step
        super().__init__(
            f"Tag {tag!r} is already on step {step} of {run}.",
            f"Untag it first (savepoints untag RUN {step} {tag}), or pick another name.",
        )


class NothingToRestoreError(InvalidArgumentError, LookupError):
    """A save point holds no state for an object that was passed to ``restore()``."""

    def __init__(self, path: Path, absent: Sequence[str], holds: Sequence[str]) -> None:
        self.path = path
        self.absent = list(absent)
        args = ", ".join(f"{a}=..." for a in self.absent)
        super().__init__(
            f"Save point {path} holds no {' or '.join(self.absent)} state "
            f"(it holds: {', '.join(sorted(holds)) or 'nothing'}).",
            f"Restore without {args}, or save with save(..., {args}).",
        )


class MissingDependencyError(SavePointsError, ImportError):
    """An optional dependency that this feature needs is not installed."""

    def __init__(self, feature: str, package: str, extra: str) -> None:
        self.feature = feature
        self.package = package
        self.extra = extra
        super().__init__(
            f"{feature} needs the package {package!r}, which is not installed.",
            f"pip install 'savepoints[{extra}]' (or pip install {package}).",
        )
        self.name = package


class DataFileError(InvalidArgumentError):
    """A training or evaluation data file cannot be read: it names the file, the line
    (when there is one) and what is wrong."""

    def __init__(self, path: Path, why: str, hint: str, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"Cannot read {where}: {why}.", hint)


class MetricNotFoundError(SavePointsError, LookupError):
    """``best()`` was asked for a metric no save point recorded."""

    def __init__(self, run: Path, metric: str, recorded: Sequence[str]) -> None:
        self.run = run
        self.metric = metric
        self.recorded = sorted(set(recorded))
        have = ", ".join(self.recorded) if self.recorded else "none"
        super().__init__(
            f"No save point in {run} recorded the metric {metric!r} (metrics recorded: {have}).",
            "Pass one of the recorded metrics, e.g. best(metric=..., mode='min'), or save "
            "with metrics={...} that include it.",
        )


class UnsupportedFormatError(SavePointsError, ValueError):
    """A manifest was written by a newer savepoints, in a format this one cannot read."""

    def __init__(self, path: Path | str, found: int, supported: int, writer: str) -> None:
        self.path = path
        self.found = found
        self.supported = supported
        super().__init__(
            f"{path} uses save point format {found} (written by savepoints {writer}); this "
            f"savepoints reads formats up to {supported}.",
            "Upgrade: pip install -U savepoints. The save point itself is fine.",
        )


class ManifestError(SavePointsError, ValueError):
    """A manifest (``savepoint.json``) is missing, unreadable or malformed."""

    def __init__(self, path: Path | str, why: str) -> None:
        self.path = path
        super().__init__(
            f"{path} is not a valid save point manifest: {why}.",
            "This folder is not a committed save point; `savepoints verify` on its run "
            "lists what is wrong. Restore from another save point.",
        )


class CorruptSavePointError(SavePointsError, ValueError):
    """A save point failed verification: files missing, extra, truncated or altered."""

    def __init__(
        self, path: Path | str, problems: Sequence[str], *, failed: str = "failed verification"
    ) -> None:
        self.path = path
        self.problems = list(problems)
        listed = "; ".join(self.problems[:8])
        more = f"; and {len(self.problems) - 8} more" if len(self.problems) > 8 else ""
        super().__init__(
            f"Save point {path} {failed}: {listed}{more}.",
            "Restore another save point (points.list() shows them), or pass verify=False "
            "to load it anyway at your own risk.",
        )


class UnserializableStateError(SavePointsError, TypeError):
    """A value cannot be stored without pickle."""

    def __init__(self, where: str, key: str, value: object, why: str = "") -> None:
        self.where = where
        self.key = key
        self.value_type = type(value).__name__
        reason = why or (
            f"a {self.value_type} is neither a tensor nor a JSON value "
            "(dict, list, tuple, str, int, float, bool, None)"
        )
        super().__init__(
            f"Cannot save {where} {key!r}: {reason}; savepoints never uses pickle.",
            "Convert it to tensors or plain JSON values (e.g. str(), float(), .tolist()) "
            "before saving.",
        )


class SnapshotChangedError(SavePointsError, RuntimeError):
    """A tensor of a deferred snapshot was changed before savepoints had copied it, by
    something other than the optimizer step it waits for (or, for a tensor reused
    unchanged from the previous snapshot, without autograd's version counter seeing it)."""

    def __init__(
        self, step: int, tensor: str, why: str, *, committed: bool = False, hint: str | None = None
    ) -> None:
        self.step = step
        self.tensor = tensor
        if committed:
            what = (
                f"The save point of step {step} was committed, but {tensor!r} {why}: its "
                "copy may mix old and new values."
            )
            fix = f"Delete it (savepoints rm RUN {step}) and save again. "
        else:
            what = f"The save of step {step} failed: {tensor!r} {why}. Nothing was committed."
            fix = ""
        super().__init__(
            what,
            fix
            + (
                hint
                or "Change parameters and optimizer state in place only through the "
                "optimizer's step() after a save (savepoints waits for its copy there), or "
                "pass snapshot='eager', which copies everything before save() returns."
            ),
        )


class StateMismatchError(SavePointsError, ValueError):
    """A save point's state does not fit the object it is restored into."""

    def __init__(
        self,
        what: str,
        path: Path,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[str] = (),
        why: str = "",
    ) -> None:
        self.what = what
        self.path = path
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        parts = []
        for label, keys in (
            ("missing from the save point", self.missing),
            ("in the save point but not in the " + what, self.unexpected),
            ("with another shape or dtype", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                parts.append(f"{len(keys)} key(s) {label}: {shown}")
        if why:
            parts.append(why)
        super().__init__(
            f"Cannot restore the {what} from {path}: " + "; ".join(parts) + ".",
            f"Build the {what} exactly as it was when saved (same class, config and "
            "parameters); nothing was changed in it.",
        )


class IncompatibleTransformersError(SavePointsError, RuntimeError):
    """The installed transformers' ``Trainer`` lacks a private method that the Trainer
    integration replaces, or has it with other parameters: a release it does not support."""

    def __init__(self, method: str, problem: str, version: str, minimum: str) -> None:
        self.method = method
        self.version = version
        self.minimum = minimum

        def release(v: str) -> tuple[int, ...]:
            return tuple(int(part) for part in v.split("+")[0].split(".")[:2] if part.isdigit())

        # Older than the minimum: upgrade. Newer: a release that changed the Trainer after
        # this savepoints was made; stay below it until savepoints catches up.
        too_new = release(version) >= release(minimum)
        wanted = f">={minimum},<{version}" if too_new else f">={minimum}"
        super().__init__(
            f"Trainer.{method} {problem} in transformers {version}; SavePointsCallback replaces "
            "it to save and resume through savepoints, so it cannot run this Trainer.",
            f"savepoints supports transformers >= {minimum}: pip install 'transformers{wanted}'"
            + (", or a newer savepoints." if too_new else "."),
        )


class RanksError(SavePointsError, RuntimeError):
    """The ranks of a ``torch.distributed`` job could not complete a collective save or
    restore together. Raised on every rank that could still learn of it; nothing
    already committed was changed, and no partial save point became visible."""


class RanksTimeoutError(RanksError, TimeoutError):
    """A rank waited longer than the timeout for the others (a call made on some ranks
    only, a rank that died or is stuck, or a write slower than the timeout)."""

    def __init__(self, rank: int, world: int, during: str, timeout: float, detail: str) -> None:
        self.rank, self.world, self.during, self.timeout = rank, world, during, timeout
        super().__init__(
            f"Rank {rank} of {world} waited {timeout:g} s for the other ranks during {during} "
            f"and gave up ({detail}). Every rank must call save() and restore() together, "
            "with the same step; a rank that did not, or died, leaves the others waiting. "
            "Nothing committed was changed.",
            "Call them on every rank (not under `if rank == 0`). If a rank is merely slow "
            "(a large save on a slow disk), raise the limit: SavePoints(..., timeout=1800) "
            "or SAVEPOINTS_TIMEOUT=1800. The process group may be unusable after this: "
            "restart the job to resume from the last committed save point.",
        )


class RanksDisagreeError(RanksError, ValueError):
    """The ranks called a collective with different values (steps, say)."""

    def __init__(self, what: str, during: str, values: Sequence[object]) -> None:
        self.what, self.during, self.values = what, during, list(values)
        shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(self.values[:8]))
        super().__init__(
            f"The ranks disagree on {what} during {during} ({shown}); nothing was saved or "
            "changed.",
            "Call it on every rank with the same values (the step of the same optimizer "
            "step, the same model and optimizer on each rank).",
        )


class RankFailedError(RanksError):
    """Another rank failed its part of a collective save or restore."""

    def __init__(self, during: str, failures: Sequence[tuple[int, str]]) -> None:
        self.during = during
        self.failures = list(failures)
        shown = "; ".join(f"rank {r}: {why}" for r, why in self.failures[:4])
        super().__init__(
            f"{during} failed on {len(self.failures)} rank(s): {shown}. No rank committed "
            "anything; earlier save points are intact and training can go on.",
            "Fix what the failing rank reports (its own traceback has the details), then "
            "call it again on every rank.",
        )


class RemoteError(SavePointsError, OSError):
    """An object store (the ``remote=`` of a run, or a URL given to the CLI) failed."""

    def __init__(self, url: str, message: str, hint: str = "") -> None:
        self.url = url
        super().__init__(
            message,
            hint
            or "Check the URL, the network and the credentials; nothing saved locally "
            "was changed, and a push that failed is tried again.",
        )


class RemoteAccessError(RemoteError, PermissionError):
    """The object store refused us: no credentials, wrong ones, no such bucket, no right
    to write. Raised when a run opens, not after the first epoch."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(
            url,
            f"Cannot use the remote {url}: {why}.",
            "Set the credentials the usual way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_ENDPOINT_URL for an S3-compatible endpoint and AWS_ALLOW_HTTP=true for a "
            "plain-http one; GOOGLE_APPLICATION_CREDENTIALS; AZURE_STORAGE_*), or pass "
            "storage_options={...}; check that the bucket exists.",
        )


class RemoteConflictError(RemoteError, FileExistsError):
    """The remote already holds a different save point for this step."""

    def __init__(self, url: str, step: int) -> None:
        self.step = step
        super().__init__(
            url,
            f"The remote {url} already holds a different save point for step {step} "
            "(other files or bytes): it was left untouched, and so was the local one.",
            f"Push to another URL, or delete step {step} there first "
            f"(`savepoints rm {url} {step}`) if the remote one is not wanted.",
        )


class RemotePushError(RemoteError):
    """Save points committed locally could not be pushed to the remote."""

    def __init__(
        self, url: str, steps: Sequence[int], why: str, *, run: Path | None = None
    ) -> None:
        self.steps = list(steps)
        listed = ", ".join(str(s) for s in self.steps)
        super().__init__(
            url,
            f"Step(s) {listed} are committed locally but not on the remote {url}: "
            f"{why.rstrip('.')}.",
            "They are safe on the local disk. Fix the cause, then push them with "
            f"`savepoints push {run or 'RUN'} {url}` (or open the run again: it pushes "
            "what is newer than the remote's newest).",
        )


class ToolNotFoundError(SavePointsError, FileNotFoundError):
    """A program that a feature runs (``git``, ``git-lfs``) is not installed, or not on
    ``PATH``."""

    def __init__(self, tool: str, feature: str, install: str) -> None:
        self.tool = tool
        self.feature = feature
        super().__init__(
            f"{feature} needs the program {tool!r}, which is not installed (or not on PATH).",
            install,
        )


class PublishError(SavePointsError, OSError):
    """Publishing save points to a git repository or the Hugging Face Hub failed; what
    the destination held before is unchanged unless the message says otherwise."""

    def __init__(self, dest: str, message: str, hint: str = "") -> None:
        self.dest = dest
        super().__init__(
            message,
            hint
            or "Check the destination (its URL or path, your rights to write there, the "
            "network); nothing in the run was changed.",
        )


class NotAGitRepositoryError(PublishError, NotADirectoryError):
    """A publishing destination that is neither a git repository, a new or empty folder,
    nor a reachable repository URL."""

    def __init__(self, dest: str, why: str) -> None:
        super().__init__(
            dest,
            f"Cannot publish to {dest}: {why}.",
            "Pass a new or empty folder (a repository is created there), the top folder "
            "of a git repository, or the URL of an existing repository (file:///srv/m.git, "
            "https://..., git@host:m.git; create a bare one with `git init --bare PATH`).",
        )


class DirtyWorkingTreeError(PublishError):
    """The local repository to publish into has uncommitted changes, which checking out
    the published files would mix with or overwrite."""

    def __init__(self, dest: str, changes: Sequence[str]) -> None:
        self.changes = list(changes)
        shown = ", ".join(self.changes[:5]) + (
            f" and {len(self.changes) - 5} more" if len(self.changes) > 5 else ""
        )
        super().__init__(
            dest,
            f"The git repository {dest} has uncommitted changes ({shown}); publishing "
            "checks out new files there, so nothing was published.",
            f"Commit or stash them first (git -C {dest} stash --include-untracked), or "
            "publish into another folder.",
        )


class PublishedTagConflictError(PublishError, FileExistsError):
    """A tag at the destination already names other content than the save point that
    would be published under it."""

    def __init__(self, dest: str, tag: str, step: int, differing: Sequence[str]) -> None:
        self.tag = tag
        self.step = step
        self.differing = list(differing)
        shown = ", ".join(self.differing[:5]) + (
            f" and {len(self.differing) - 5} more" if len(self.differing) > 5 else ""
        )
        super().__init__(
            dest,
            f"Tag {tag!r} in {dest} already names other content than step {step} (files "
            f"that differ: {shown}); nothing was published for step {step}.",
            "Publish to another destination, without the save point's own tags "
            "(--no-own-tags), or delete that tag there first if it is wrong "
            f"(git push DEST :refs/tags/{tag}; on the Hub: hf repos tag delete REPO {tag}).",
        )


class DestinationMovedError(PublishError):
    """Another publisher changed the destination between our read of it and our write."""

    def __init__(self, dest: str, what: str) -> None:
        self.what = what
        super().__init__(
            dest,
            f"{dest} changed while publishing ({what}: another publisher?); nothing of "
            "this publication was kept there.",
            "Run the same command again: it starts from the new head, and save points "
            "already published are skipped.",
        )


class NothingToPublishError(InvalidArgumentError):
    """No save point was given to publish."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"Nothing to publish: {what}.",
            "Name save points (steps, tags, latest, best), or --all; `savepoints list RUN` "
            "shows them.",
        )


class HubError(PublishError):
    """The Hugging Face Hub refused a request, or could not be reached."""

    def __init__(self, repo_id: str, why: str) -> None:
        self.repo_id = repo_id
        super().__init__(
            repo_id,
            f"Publishing to {repo_id} on the Hugging Face Hub failed: {why}.",
            "Log in with a token that may write there (`hf auth login`, formerly "
            "`huggingface-cli login`; or set HF_TOKEN), "
            "check the repository id (USER/NAME or ORG/NAME) and the network; nothing in "
            "the run was changed.",
        )


class SigningError(SavePointsError, ValueError):
    """Signing a folder, or checking its signature (OpenSSF Model Signing), failed; the
    subclasses say how. ``.path`` is the folder (for :class:`KeyFileError`, the key)."""

    def __init__(self, path: Path, message: str, hint: str) -> None:
        self.path = path
        super().__init__(message, hint)


#: How to make a key pair that savepoints and ``model_signing`` both use.
MAKE_KEYS_HINT = (
    "Make an elliptic-curve key pair with: openssl ecparam -name prime256v1 -genkey "
    "-noout -out private.pem && openssl ec -in private.pem -pubout -out public.pem"
)


class KeyFileError(SigningError):
    """A key file cannot be used: missing, not a PEM key, the other half of the key pair
    than the one needed, encrypted without a password, or not an elliptic-curve key."""

    def __init__(self, key: Path, why: str, hint: str = MAKE_KEYS_HINT) -> None:
        self.key = key
        super().__init__(key, f"Cannot use the key file {key}: {why}.", hint)


class UnsignedError(SigningError, FileNotFoundError):
    """A signature was required, and the folder has none."""

    def __init__(self, path: Path, signature: Path) -> None:
        self.signature = signature
        super().__init__(
            path,
            f"{path} is not signed: there is no signature file {signature}.",
            "Sign it with the private key (savepoints sign PATH --key private.pem), or "
            "point to the signature if it is kept elsewhere (signature=...).",
        )


class SignatureInvalidError(SigningError):
    """The signature file is damaged or was altered: it is no OpenSSF model signature,
    or its cryptographic signature does not verify with the key it names."""

    def __init__(self, path: Path, signature: Path, why: str) -> None:
        self.signature = signature
        super().__init__(
            path,
            f"The signature {signature} of {path} is not valid: {why}.",
            "Do not trust this folder. If its files are known to be good, sign it again "
            "(savepoints sign PATH --key private.pem); otherwise get a fresh copy and its "
            "signature from whoever signed it.",
        )


class UntrustedSignatureError(SigningError):
    """The folder is signed, but by a key that is none of the trusted ones."""

    def __init__(self, path: Path, signature: Path, key_id: str, tried: Sequence[Path]) -> None:
        self.signature = signature
        self.key_id = key_id
        self.tried = list(tried)
        names = ", ".join(str(k) for k in self.tried[:4]) + (
            f" and {len(self.tried) - 4} more" if len(self.tried) > 4 else ""
        )
        signer = f"a key with fingerprint {key_id[:16]}" if key_id else "an unnamed key"
        super().__init__(
            path,
            f"{path} is signed ({signature}) by {signer}, which is none of the trusted "
            f"keys ({names}).",
            "Pass the public key that pairs with the private key that signed it; if you "
            "do not trust that signer, do not use this folder.",
        )


class SignatureMismatchError(SigningError):
    """The signature is genuine, but the folder's files are not the ones it signed
    (altered, added, removed, or left out of the signature)."""

    def __init__(
        self, path: Path, signature: Path, problems: Sequence[str], hint: str = ""
    ) -> None:
        self.signature = signature
        self.problems = list(problems)
        listed = "; ".join(self.problems[:8])
        more = f"; and {len(self.problems) - 8} more" if len(self.problems) > 8 else ""
        super().__init__(
            path,
            f"{path} does not match its signature {signature}: {listed}{more}.",
            hint
            or "Files changed after signing: do not trust this folder. Use another save "
            "point or a fresh copy; if the change was yours, sign again "
            "(savepoints sign PATH --key private.pem).",
        )


class SignRefusedError(CorruptSavePointError):
    """A save point that fails verification is never signed: the signature would vouch
    for damaged files."""

    def __init__(self, path: Path | str, problems: Sequence[str]) -> None:
        super().__init__(path, problems, failed="failed verification, so it was not signed")
        self.hint = (
            "Sign a save point that verifies (`savepoints verify RUN` names them); signing "
            "cannot repair a damaged one."
        )
