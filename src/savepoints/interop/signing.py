"""Signing save points and exported folders in the OpenSSF Model Signing format.

The signature is the reference tool's own (``model_signing``, ``pip install
'savepoints[sign]'``): a Sigstore bundle holding a DSSE envelope over an in-toto statement
that lists the SHA-256 of every file of the folder, signed with an elliptic-curve private
key (P-256, P-384 or P-521; PEM). Keyless Sigstore signing needs the network, so only key
signing is offered. ``import savepoints`` never imports ``model_signing``: the first
function here that needs it does, or raises ``MissingDependencyError``.

**Where.** ``model.sig`` inside the folder (``model_signing``'s default name); ``signature=``
puts it elsewhere. The signature file is left out of what is signed: its path (relative to
the folder) is recorded among the signature's ignored paths, next to ``model_signing``'s
git files (``.git``, ``.gitattributes``, ``.github``, ``.gitignore``). Everything else in
the folder is signed, ``savepoint.json`` and ``training_state/`` included, so tagging,
untagging or compacting a signed save point (each rewrites files) needs a new signature.
Replacing a save point (``save(..., overwrite=True)``, ``compact``) drops its signature;
deleting one deletes its signature with it.

**Interoperation.** A folder signed here verifies with the reference CLI, and a folder
signed by it verifies here::

    model_signing verify key FOLDER --signature FOLDER/model.sig --public_key public.pem
    model_signing sign key FOLDER --signature FOLDER/model.sig --private_key private.pem

No ``--ignore-paths`` is needed either way: the CLI ignores the ``--signature`` file when it
lies inside the folder, and the ignored paths recorded in a signature are ignored when it
is verified. Three things about that CLI (``model_signing`` 1.1.1) shape what is written
here: ``--signature`` (default ``model.sig``) and ``--ignore-paths`` are relative to the
current directory, not to the folder, so name them ``FOLDER/model.sig``; ``verify key``
always hashes each file with SHA-256, whatever the signature says, so savepoints signs
with SHA-256 per file (it reads signatures made by the library with another hash or per
shard too); and it imports ``OpenSSL`` without declaring it, so the ``sign`` extra adds
``pyopenssl``.

**What a verification checks** (:func:`verify_signature`): that the signature is made by
one of the given public keys, that the files are exactly the signed ones (none altered,
added or removed), and, for a save point, that every file its manifest lists and the
manifest itself are covered (a signer who left ``training_state/`` out of the signature
does not vouch for the state ``restore()`` loads). The hash check (:func:`savepoints.verify`)
is separate: it tolerates ``model.sig`` and never trusts it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from savepoints.atomic import fsync_dir
from savepoints.errors import (
    MAKE_KEYS_HINT,
    InvalidArgumentError,
    KeyFileError,
    MissingDependencyError,
    SignatureInvalidError,
    SignatureMismatchError,
    SigningError,
    SignRefusedError,
    UnsignedError,
    UntrustedSignatureError,
)
from savepoints.integrity import SIGNATURE_NAME, verify_point
from savepoints.layout import MANIFEST_NAME
from savepoints.manifest import read_manifest
from savepoints.savepoint import SavePoint

if TYPE_CHECKING:
    from model_signing import hashing

    from savepoints.distributed import Ranks

__all__ = [
    "SIGNATURE_NAME",
    "SignatureReport",
    "TrustedKeys",
    "check_trusted",
    "is_signed",
    "load_trusted_keys",
    "require_trusted",
    "sign_folder",
    "signature_path",
    "verify_signature",
]

PathLike = str | os.PathLike[str]

_PAYLOAD_TYPE = b"application/vnd.in-toto+json"
_STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
_PREDICATE_TYPE = "https://model_signing/signature/v1.0"
_CURVE_HASHES = {"secp256r1": "SHA256", "secp384r1": "SHA384", "secp521r1": "SHA512"}
#: The hash names a signature records -> the names ``hashing.Config`` takes (its BLAKE2
#: records itself as "blake2b", which it does not accept back).
_HASH_TYPES = {"sha256": "sha256", "blake2b": "blake2", "blake2": "blake2", "blake3": "blake3"}
#: A signature lists one line per file: far below this even for huge models.
_MAX_SIGNATURE_BYTES = 64 * 1024 * 1024
#: Import names of what signing needs -> the package that provides it.
_PACKAGES = {"model_signing": "model-signing", "OpenSSL": "pyopenssl"}


@dataclass(frozen=True)
class SignatureReport:
    """What :func:`verify_signature` found: the folder is signed by ``key`` and its files
    are exactly the signed ones."""

    folder: Path
    #: The signature file that was checked.
    signature: Path
    #: The trusted public key file whose private half made the signature.
    key: Path
    #: That key's fingerprint: SHA-256 of its PEM form (the bundle's key hint).
    key_id: str
    #: The files the signature covers (relative, POSIX), sorted.
    files: tuple[str, ...]
    #: The paths the signer left out of the signature, as recorded in it.
    ignored: tuple[str, ...]
    #: The hash the signature uses for each file (``sha256`` for the reference CLI).
    hash_type: str

    @property
    def files_covered(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class _PublicKey:
    path: Path
    key: Any  # cryptography's EllipticCurvePublicKey (an optional dependency)
    key_id: str


@dataclass(frozen=True)
class TrustedKeys:
    """Public keys read and checked once (:func:`load_trusted_keys`), so a bad key file
    fails before anything is hashed."""

    keys: tuple[_PublicKey, ...]

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(k.path for k in self.keys)


#: One public key file, several, or keys already loaded by :func:`load_trusted_keys`.
KeysLike = PathLike | Sequence[PathLike] | TrustedKeys


# ------------------------------------------------------------------------- public API


def signature_path(folder: PathLike, signature: PathLike | None = None) -> Path:
    """Where the signature of ``folder`` is: ``signature`` when given, else
    ``folder/model.sig``."""
    return Path(signature) if signature is not None else Path(folder) / SIGNATURE_NAME


def is_signed(folder: PathLike, signature: PathLike | None = None) -> bool:
    """Whether ``folder`` has a signature file (not whether it verifies)."""
    return signature_path(folder, signature).is_file()


def sign_folder(
    folder: PathLike | SavePoint,
    private_key: PathLike,
    *,
    signature: PathLike | None = None,
    password: str | bytes | None = None,
) -> Path:
    """Sign ``folder`` (a save point, an export, any model folder) with an elliptic-curve
    private key (PEM); returns the signature's path (``folder/model.sig`` by default).

    A save point is verified first and refused if it fails (:class:`SignRefusedError`).
    The signature is written atomically (a temporary file beside the folder, fsynced,
    then renamed over any previous one): a failure leaves the old signature, or none.
    ``password``: the key's, when it is encrypted.
    """
    _require("Signing a folder")
    root = _folder(folder, "sign")
    sig = _signature_target(root, signature)
    secret = password.encode() if isinstance(password, str) else password
    _check_private_key(Path(private_key), secret)
    if (root / MANIFEST_NAME).is_file():
        _check_point_signable(root, sig)
    _write_signature(root, sig, Path(private_key), secret)
    return sig


def load_trusted_keys(public_keys: KeysLike) -> TrustedKeys:
    """Read and check public key files (PEM, elliptic curve): a clear error for a missing
    file, one that is not a PEM key, or a private key given instead of a public one."""
    if isinstance(public_keys, TrustedKeys):
        return public_keys
    _require("Checking signatures")
    paths = [public_keys] if isinstance(public_keys, (str, os.PathLike)) else list(public_keys)
    if not paths:
        raise InvalidArgumentError(
            "No public key was given to check the signature with, so nothing could be trusted.",
            "Pass the public key file(s) of the signers you trust (public.pem), or none at "
            "all (None) to skip the signature check.",
        )
    return TrustedKeys(tuple(_load_public_key(Path(p)) for p in paths))


def verify_signature(
    folder: PathLike | SavePoint, public_keys: KeysLike, *, signature: PathLike | None = None
) -> SignatureReport:
    """Check that ``folder`` is signed by one of ``public_keys`` and holds exactly the
    files signed; returns which key signed it and what is covered.

    Raises :class:`UnsignedError` (no signature file), :class:`SignatureInvalidError`
    (not a model signature, or altered), :class:`UntrustedSignatureError` (signed by
    another key), :class:`SignatureMismatchError` (files altered, added, removed, or a
    save point file the signature leaves out), :class:`KeyFileError` (a bad key file).
    """
    keys = load_trusted_keys(public_keys)
    root = _folder(folder, "verify the signature of")
    sig = signature_path(root, signature)
    raw = _read_signature(root, sig)
    envelope = _Envelope.parse(root, sig, raw)
    key = _signing_key(root, sig, envelope, keys)
    signed = _Signed.parse(root, sig, envelope.payload)
    ignore = [*signed.ignored, *_inside(root, sig)]
    config = _hashing_config(root, sig, signed, ignore)
    failure = _library_verify(root, raw, key.path, config)
    if failure is not None:
        problems = _content_problems(root, config, signed)
        if not problems:
            raise SignatureInvalidError(root, sig, failure)
        raise SignatureMismatchError(root, sig, problems, _mismatch_hint(problems))
    if (root / MANIFEST_NAME).is_file():
        _check_point_covered(root, sig, signed)
    return SignatureReport(
        folder=root,
        signature=sig,
        key=key.path,
        key_id=key.key_id,
        files=tuple(sorted(signed.files)),
        ignored=tuple(sorted(signed.ignored)),
        hash_type=signed.hash_type,
    )


def check_trusted(point: SavePoint | PathLike, trusted_keys: KeysLike) -> SignatureReport:
    """:func:`verify_signature` for a save point or folder about to be loaded
    (``restore(trusted_keys=...)``, ``predict --key``): returns the report, or raises."""
    return verify_signature(point, trusted_keys)


def require_trusted(
    point: SavePoint, trusted_keys: KeysLike, *, ranks: Ranks | None = None
) -> None:
    """``restore()``'s gate: raise unless ``point`` is signed by one of the keys. With
    ``ranks`` (every rank calls it together) rank 0 checks and every rank learns the
    verdict, so they all refuse or all go on."""
    if ranks is None:
        check_trusted(point, trusted_keys)
        return
    failure: BaseException | None = None
    if ranks.is_main:
        try:
            check_trusted(point, trusted_keys)
        except BaseException as e:
            failure = e
    ranks.vote(failure, f"restore(), checking the signature of {point.path}")


# ------------------------------------------------------------------------ the steps


def _require(feature: str) -> None:
    """Import what signing needs, or say which package to install."""
    try:
        import cryptography  # noqa: F401
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying  # noqa: F401
    except ImportError as e:
        missing = (e.name or "model_signing").split(".")[0]
        raise MissingDependencyError(feature, _PACKAGES.get(missing, missing), "sign") from None


def _folder(folder: PathLike | SavePoint, action: str) -> Path:
    path = folder.path if isinstance(folder, SavePoint) else Path(folder)
    if not path.is_dir():
        why = "it does not exist" if not path.exists() else "it is not a folder"
        raise InvalidArgumentError(
            f"Cannot {action} {path}: {why}.",
            "Pass a save point folder (`savepoints list RUN` shows them) or an exported "
            "model folder.",
        )
    # Resolved: model_signing refuses a folder reached through a symbolic link, and the
    # signature's ignored paths are relative to the real folder.
    return path.resolve()


def _inside(root: Path, sig: Path) -> list[str]:
    """The signature's path relative to ``root`` when it lies inside (to be ignored)."""
    try:
        return [sig.resolve().relative_to(root).as_posix()]
    except ValueError:
        return []


def _signature_target(root: Path, signature: PathLike | None) -> Path:
    sig = signature_path(root, signature)
    if sig.is_dir():
        raise InvalidArgumentError(
            f"Cannot write the signature to {sig}: it is a folder.",
            f"Pass a file path, or leave signature= out for {root / SIGNATURE_NAME}.",
        )
    inside = _inside(root, sig)
    if inside and inside != [SIGNATURE_NAME] and (root / MANIFEST_NAME).is_file():
        # Any other file in a save point is an extra file to the hash check.
        raise InvalidArgumentError(
            f"Cannot write the signature of save point {root} to {sig}: inside a save "
            f"point it must be {SIGNATURE_NAME}, the one name its hash check allows.",
            f"Leave signature= out ({root / SIGNATURE_NAME}), or put it outside the folder.",
        )
    return sig


def _check_point_signable(root: Path, sig: Path) -> None:
    report = verify_point(root)
    if not report.ok:
        raise SignRefusedError(root, [str(p) for p in report.all_problems()])
    if SIGNATURE_NAME in read_manifest(root / MANIFEST_NAME).files:
        raise InvalidArgumentError(
            f"Cannot sign save point {root}: it holds a file of its own named "
            f"{SIGNATURE_NAME}, which the signature would replace.",
            "Write the signature elsewhere (signature=... outside the folder).",
        )


def _write_signature(root: Path, sig: Path, private_key: Path, password: bytes | None) -> None:
    """Sign into a temporary file beside the folder (never inside it: a save point's
    hash check would see an extra file, and a crash would leave one), then rename."""
    from model_signing import signing

    final = sig if sig.is_absolute() else Path.cwd() / sig
    scratch = root.parent if _inside(root, final) else final.parent
    tmp = scratch / f".{final.name}.{secrets.token_hex(6)}.tmp"
    config = (
        signing.Config()
        # model_signing 1.1.1 hands the password to cryptography, which wants bytes.
        .use_elliptic_key_signer(private_key=private_key, password=cast(Any, password))
        .set_hashing_config(_signing_hashing_config(root, final))
    )
    try:
        config.sign(root, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except ValueError as e:
        # model_signing refuses folders holding symbolic links or special files.
        raise InvalidArgumentError(f"Cannot sign {root}: {e}.", "Sign a plain folder.") from None
    except OSError as e:
        raise SigningError(
            root,
            f"Cannot sign {root}: {e.strerror or e} ({e.filename or tmp}); no signature was "
            "written, and a previous one is unchanged.",
            f"Make the folder's files readable and {scratch} writable (the signature is "
            f"written there first, then renamed to {final}), or pass signature= a path in "
            "a writable folder.",
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(final.parent)


def _signing_hashing_config(root: Path, sig: Path) -> hashing.Config:
    """The reference CLI's defaults (``sign key``): SHA-256 per file, git files and the
    signature itself ignored. Its ``verify key`` always hashes with SHA-256, whatever
    the signature says, so nothing else would verify there."""
    from model_signing import hashing

    return (
        hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256")
        .set_ignored_paths(paths=_inside(root, sig), ignore_git_paths=True)
    )


# ------------------------------------------------------------------- keys


def _read_key_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(path, "it does not exist", f"Check the path. {MAKE_KEYS_HINT}") from None
    except OSError as e:
        raise KeyFileError(path, f"it cannot be read ({e.strerror or e})") from None
    if b"-----BEGIN " not in data:
        raise KeyFileError(path, "it is not a PEM file (it has no -----BEGIN ...----- line)")
    return data


def _check_private_key(path: Path, password: bytes | None) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read_key_file(path)
    if b"PRIVATE KEY-----" not in data:
        raise KeyFileError(
            path,
            "it holds no private key (a public key or a certificate?), and signing needs "
            "the private key",
            "Sign with the private key (private.pem); the public key is for checking "
            "(verify --key public.pem, restore(trusted_keys=[...])).",
        )
    try:
        key = load_pem_private_key(data, password=password)
    except TypeError:
        encrypted = password is None
        raise KeyFileError(
            path,
            "it is encrypted and no password was given"
            if encrypted
            else "a password was given but the key is not encrypted",
            "Pass the key's password." if encrypted else "Leave the password out.",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(
            path,
            "it is not a valid PEM private key, or the password is wrong",
        ) from None
    _check_curve(path, key.public_key())


def _load_public_key(path: Path) -> _PublicKey:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = _read_key_file(path)
    if b"PRIVATE KEY-----" in data:
        raise KeyFileError(
            path,
            "it is a private key, and checking a signature needs the public key",
            "Pass the public key (make it with: openssl ec -in private.pem -pubout -out "
            "public.pem); keep the private key with the signer only.",
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(path, "it is not a valid PEM public key") from None
    _check_curve(path, key)
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _PublicKey(path, key, hashlib.sha256(pem).hexdigest())


def _check_curve(path: Path, key: object) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = type(key).__name__.strip("_").replace("PublicKey", "") or "another"
        raise KeyFileError(
            path,
            f"it is an {kind} key, and OpenSSF model signing with a key uses "
            "elliptic-curve keys (P-256, P-384 or P-521)",
        )
    if key.curve.name not in _CURVE_HASHES:
        raise KeyFileError(
            path, f"its curve {key.curve.name} is not one model signing supports (P-256, "
            "P-384, P-521)",
        )  # fmt: skip


# ------------------------------------------------------------------- the signature


def _read_signature(root: Path, sig: Path) -> bytes:
    try:
        with open(sig, "rb") as f:
            raw = f.read(_MAX_SIGNATURE_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        raise UnsignedError(root, sig) from None
    except IsADirectoryError:
        raise SignatureInvalidError(root, sig, "it is a folder, not a file") from None
    if len(raw) > _MAX_SIGNATURE_BYTES:
        raise SignatureInvalidError(root, sig, "it is far larger than any model signature")
    return raw


@dataclass(frozen=True)
class _Envelope:
    """The DSSE envelope of a signature file (not yet trusted)."""

    payload: bytes
    signature: bytes
    key_hint: str

    @classmethod
    def parse(cls, root: Path, sig: Path, raw: bytes) -> _Envelope:
        try:
            bundle = json.loads(raw)
            dsse = bundle["dsseEnvelope"]
            hint = (bundle.get("verificationMaterial") or {}).get("publicKey") or {}
            return cls(
                payload=base64.b64decode(dsse["payload"], validate=True),
                signature=base64.b64decode(dsse["signatures"][0]["sig"], validate=True),
                key_hint=str(hint.get("hint") or ""),
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise SignatureInvalidError(
                root, sig, "it is not an OpenSSF model signature (a Sigstore bundle "
                "holding a DSSE envelope)",
            ) from None  # fmt: skip

    def signed_by(self, key: _PublicKey) -> bool:
        """Whether the envelope's signature verifies with ``key`` (DSSE v1 PAE)."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        pae = b"DSSEv1 %d %s %d %s" % (
            len(_PAYLOAD_TYPE), _PAYLOAD_TYPE, len(self.payload), self.payload,
        )  # fmt: skip
        algorithm = getattr(hashes, _CURVE_HASHES[key.key.curve.name])()
        try:
            key.key.verify(self.signature, pae, ec.ECDSA(algorithm))
        except InvalidSignature:
            return False
        return True


def _signing_key(root: Path, sig: Path, envelope: _Envelope, keys: TrustedKeys) -> _PublicKey:
    """The trusted key whose private half signed the envelope, or the reason why none."""
    for key in keys.keys:
        if envelope.signed_by(key):
            return key
    if any(k.key_id == envelope.key_hint for k in keys.keys):
        raise SignatureInvalidError(
            root, sig, "its cryptographic signature does not verify with the key it names, "
            "so it was altered after signing",
        )  # fmt: skip
    raise UntrustedSignatureError(root, sig, envelope.key_hint, keys.paths)


@dataclass(frozen=True)
class _Signed:
    """The authenticated statement: how the folder was hashed, and each file's digest."""

    method: str
    hash_type: str
    shard_size: int
    ignored: tuple[str, ...]
    #: Resource name (a path; ``path:start:end`` for shards) -> hex digest.
    digests: dict[str, str]

    @property
    def files(self) -> frozenset[str]:
        if self.method == "shards":
            return frozenset(name.rsplit(":", 2)[0] for name in self.digests)
        return frozenset(self.digests)

    @classmethod
    def parse(cls, root: Path, sig: Path, payload: bytes) -> _Signed:
        try:
            statement = json.loads(payload)
            kind = statement.get("predicateType")
        except (ValueError, AttributeError):
            statement, kind = {}, None
        if statement.get("_type") != _STATEMENT_TYPE or kind != _PREDICATE_TYPE:
            raise SignatureInvalidError(
                root, sig, f"it signs a {kind!r} statement; savepoints reads the "
                f"{_PREDICATE_TYPE!r} ones of model_signing 1.0 and later",
            )  # fmt: skip
        try:
            serialization = statement["predicate"]["serialization"]
            signed = cls(
                method=str(serialization["method"]),
                hash_type=str(serialization["hash_type"]),
                shard_size=int(serialization.get("shard_size") or 0),
                ignored=tuple(str(p) for p in serialization.get("ignore_paths") or ()),
                digests={
                    str(r["name"]): str(r["digest"]) for r in statement["predicate"]["resources"]
                },
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SignatureInvalidError(
                root, sig, "its signed statement is not a model_signing file list"
            ) from None
        if signed.method not in ("files", "shards") or signed.hash_type not in _HASH_TYPES:
            raise SignatureInvalidError(
                root, sig, f"it hashes with {signed.method}/{signed.hash_type}, which "
                "model_signing does not define",
            )  # fmt: skip
        return signed


def _hashing_config(root: Path, sig: Path, signed: _Signed, ignore: list[str]) -> hashing.Config:
    """Hash the folder the way the signer did (per file or per shard, the same hash),
    leaving out what the signer left out and the signature file. Symbolic links are
    always refused: they could point outside the folder."""
    from model_signing import hashing

    algorithm = cast(Any, _HASH_TYPES[signed.hash_type])
    config = hashing.Config()
    if signed.method == "shards":
        config.use_shard_serialization(hashing_algorithm=algorithm, shard_size=signed.shard_size)
    else:
        config.use_file_serialization(hashing_algorithm=algorithm)
    # Git files only when the signer ignored them (they are then among ``ignore``).
    return config.set_ignored_paths(paths=ignore, ignore_git_paths=False)


def _library_verify(root: Path, raw: bytes, key: Path, config: hashing.Config) -> str | None:
    """The reference verification, on the very bytes already checked (a copy, so the
    file cannot change between the two). Returns why it failed, or None."""
    from model_signing import verifying

    with tempfile.TemporaryDirectory(prefix="savepoints-sig-") as tmp:
        copy = Path(tmp) / SIGNATURE_NAME
        copy.write_bytes(raw)
        try:
            # It prints a warning to stdout for old bundles: keep the CLI's --json clean.
            with contextlib.redirect_stdout(io.StringIO()):
                verifying.Config().use_elliptic_key_verifier(public_key=key).set_hashing_config(
                    config
                ).verify(root, copy)
        except (ValueError, KeyError, TypeError, OSError) as e:
            return str(e) or type(e).__name__
    return None


def _content_problems(root: Path, config: hashing.Config, signed: _Signed) -> list[str]:
    """Each file that differs from the signed list, by name."""
    try:
        actual = {
            rd.identifier: rd.digest.digest_hex for rd in config.hash(root).resource_descriptors()
        }
    except (ValueError, OSError) as e:
        return [str(e)]
    problems = []
    for name in sorted(signed.digests.keys() | actual.keys()):
        if name not in actual:
            problems.append(f"{name}: missing (it was signed)")
        elif name not in signed.digests:
            problems.append(f"{name}: extra (added after signing)")
        elif actual[name] != signed.digests[name]:
            problems.append(f"{name}: altered (its hash differs from the signed one)")
    return problems


def _mismatch_hint(problems: list[str]) -> str:
    if len(problems) == 1 and problems[0].startswith(f"{MANIFEST_NAME}: altered"):
        return (
            f"Only {MANIFEST_NAME} changed since signing: a tag, untag or compact rewrites "
            "it. If that was yours, sign again (savepoints sign PATH --key private.pem)."
        )
    return ""


def _check_point_covered(root: Path, sig: Path, signed: _Signed) -> None:
    """A save point's signature must cover all it is: the manifest and every file listed."""
    listed = {MANIFEST_NAME, *read_manifest(root / MANIFEST_NAME).files}
    left_out = sorted(listed - signed.files)
    if left_out:
        raise SignatureMismatchError(
            root,
            sig,
            [f"{rel}: not covered by the signature (the signer left it out)" for rel in left_out],
            "Sign the whole save point (savepoints sign PATH --key private.pem, or "
            "model_signing without --ignore-paths).",
        )
