"""``savepoints sign``: an OpenSSF Model Signing signature for a save point or a folder
(an export, an ONNX bundle), made with an elliptic-curve private key. ``verify --key`` and
``predict --key`` check it; so does the reference tool (``model_signing verify key``)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from savepoints.cli.output import console, done, esc, spinner
from savepoints.errors import InvalidArgumentError
from savepoints.layout import MANIFEST_NAME

KEY_HELP = "Public key file (PEM) of a signer you trust; repeat for several."


def key_password(env: str | None) -> str | None:
    """The private key's password, from the environment variable ``env`` (never an
    argument: arguments show in ``ps`` and in shell history)."""
    if env is None:
        return None
    value = os.environ.get(env)
    if value is None:
        raise InvalidArgumentError(
            f"--password-env names {env}, which is not set.",
            f"export {env}=... first (or drop --password-env for a key without password).",
        )
    return value


def sign_target(target: Path, ref: str | None) -> tuple[Path, str]:
    """The folder to sign and how to name it: a run's save point (``RUN [REF]``: by
    default the best, or the latest when the run records no metric, as ``predict`` and
    ``export`` pick), a save point folder, or any other folder (an export, an ONNX bundle:
    these need no torch)."""
    if "://" in str(target):
        raise InvalidArgumentError(
            f"Cannot sign {target}: signatures are made on local folders.",
            f"Pull it first (savepoints pull {target} RUN), then sign RUN.",
        )
    is_run = (target / ".savepoints").is_dir() or ref is not None
    if is_run or (target / MANIFEST_NAME).is_file():
        from savepoints.cli.resolve import resolve_best_or_latest

        point = resolve_best_or_latest(target, ref, False)
        return point.path, f"save point step {point.step}"
    if not target.is_dir():
        raise InvalidArgumentError(
            f"Cannot sign {target}: it is not a folder.",
            "Pass a run (with a step or tag), a save point folder, or an exported folder.",
        )
    return target, "folder"


@click.command("sign")
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("ref", required=False)
@click.option("--key", "key", type=click.Path(path_type=Path), required=True,
              help="Elliptic-curve private key (PEM) to sign with.")  # fmt: skip
@click.option("--signature", type=click.Path(path_type=Path),
              help="Write the signature here instead of FOLDER/model.sig.")  # fmt: skip
@click.option("--password-env", metavar="VAR",
              help="Read the private key's password from this environment variable.")  # fmt: skip
def sign_cmd(
    target: Path, ref: str | None, key: Path, signature: Path | None, password_env: str | None
) -> None:
    """Sign a save point of TARGET (a run: REF is a step, a tag, 'latest' or 'best'; by
    default the best, as predict and export pick), a save point FOLDER, or an exported
    folder or ONNX bundle, in the OpenSSF Model Signing format (model.sig in the folder).
    A save point is verified first: a damaged one is never signed.

    Check it with `savepoints verify PATH --key public.pem`, or with the reference tool:
    `model_signing verify key FOLDER --signature FOLDER/model.sig --public_key public.pem`.
    """
    from savepoints.interop.signing import sign_folder

    folder, what = sign_target(target, ref)
    password = key_password(password_env)
    with spinner(f"hashing and signing {folder} ..."):
        sig = sign_folder(folder, key, signature=signature, password=password)
    done(f"signed {what} ({folder}) with {key}")
    console.print(f"  signature: {esc(str(sig))}")
    if signature is None:
        console.print(f"  check it:  savepoints verify {esc(str(folder))} --key PUBLIC_KEY.pem")
    else:  # elsewhere: the reference tool takes its path
        console.print(f"  check it:  model_signing verify key {esc(str(folder))} --signature "
                      f"{esc(str(sig))} --public_key PUBLIC_KEY.pem")  # fmt: skip
