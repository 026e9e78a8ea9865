"""Signing in the OpenSSF Model Signing format: real keys, real save points, and the
reference ``model_signing`` CLI run in a subprocess for both directions."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import savepoints
from conftest import same_weights, train_steps
from savepoints import Keep, SavePoints
from savepoints.errors import (
    KeyFileError,
    SignatureInvalidError,
    SignatureMismatchError,
    SignRefusedError,
    UnsignedError,
    UntrustedSignatureError,
)
from savepoints.export import export
from savepoints.interop.signing import (
    SIGNATURE_NAME,
    check_trusted,
    is_signed,
    sign_folder,
    verify_signature,
)

pytest.importorskip("model_signing")  # the [sign] extra; part of [test]

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

CLI = [sys.executable, "-m", "model_signing"]


def _write_pair(folder: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}-private.pem", folder / f"{name}-public.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    a_private, a_public = _write_pair(folder, "alice")
    b_private, b_public = _write_pair(folder, "bob")
    rsa_key = folder / "rsa-private.pem"
    rsa_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    encrypted = folder / "alice-encrypted.pem"
    encrypted.write_bytes(
        serialization.load_pem_private_key(a_private.read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    not_pem = folder / "notes.txt"
    not_pem.write_text("this is no key\n")
    return {
        "private": a_private,
        "public": a_public,
        "other_private": b_private,
        "other_public": b_public,
        "rsa": rsa_key,
        "encrypted": encrypted,
        "not_pem": not_pem,
    }


def _run(tmp_path: Path, model: torch.nn.Module, steps: int = 1, **kw) -> SavePoints:
    points = SavePoints(tmp_path / "run", async_save=False, **kw)
    opt = torch.optim.AdamW(model.parameters())
    for step in range(1, steps + 1):
        train_steps(model, opt, steps=1)
        points.save(step, model=model, optimizer=opt, metrics={"loss": 1.0 / step})
    return points


def _flip_byte(path: Path, offset: int = -5) -> None:
    # Save point files are read-only hard links into the blob store.
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


# ---------------------------------------------------------------- signing, verifying


def test_signed_save_point_verifies_with_its_key_and_still_passes_the_hash_check(
    tmp_path, gpt2_cls, keys
):
    points = _run(tmp_path, gpt2_cls)
    point = points.latest()
    sig = sign_folder(point, keys["private"])

    assert sig == point.path.resolve() / SIGNATURE_NAME and is_signed(point.path)
    assert sig.stat().st_nlink == 1  # written beside the blob store, never deduplicated
    assert not [p for p in point.path.parent.iterdir() if p.name.endswith(".tmp")]
    report = verify_signature(point.path, [keys["other_public"], keys["public"]])
    assert report.key == keys["public"] and report.hash_type == "sha256"
    assert {"savepoint.json", "model.safetensors"} <= set(report.files)
    assert report.files_covered == len(point.manifest.files) + 1  # + savepoint.json
    assert SIGNATURE_NAME in report.ignored and SIGNATURE_NAME not in report.files
    # The hash check allows the signature beside the listed files, for the save point
    # and the run, and the run still lists it.
    assert point.verify().ok and savepoints.verify(points.path).ok
    assert [p.step for p in points.list()] == [1]
    # A signature kept outside the folder works too.
    outside = sign_folder(point, keys["private"], signature=tmp_path / "step1.sig")
    assert verify_signature(point, keys["public"], signature=outside).key == keys["public"]


def test_a_corrupt_save_point_is_not_signed(tmp_path, gpt2_cls, keys):
    point = _run(tmp_path, gpt2_cls).latest()
    _flip_byte(point.path / "model.safetensors")
    with pytest.raises(SignRefusedError, match=r"model\.safetensors: altered") as e:
        sign_folder(point, keys["private"])
    assert "not signed" in e.value.message and "verifies" in e.value.hint
    assert not is_signed(point.path)


def test_a_weight_byte_changed_after_signing_is_named(tmp_path, gpt2_cls, keys):
    point = _run(tmp_path, gpt2_cls).latest()
    sign_folder(point, keys["private"])
    _flip_byte(point.path / "model.safetensors")
    with pytest.raises(SignatureMismatchError) as e:
        verify_signature(point, keys["public"])
    assert e.value.problems == ["model.safetensors: altered (its hash differs from the signed one)"]
    assert "do not trust" in e.value.hint
    # A file added after signing is named as well.
    (point.path / "config.json").with_name("extra.txt").write_text("added")
    with pytest.raises(SignatureMismatchError, match=r"extra\.txt: extra"):
        verify_signature(point, keys["public"])


def test_a_tampered_signature_file_is_refused(tmp_path, gpt2_cls, keys):
    point = _run(tmp_path, gpt2_cls).latest()
    sig = sign_folder(point, keys["private"])
    bundle = json.loads(sig.read_bytes())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    # Make the signed list say the (tampered) weights are fine: the payload no longer
    # matches its cryptographic signature.
    for resource in statement["predicate"]["resources"]:
        if resource["name"] == "model.safetensors":
            resource["digest"] = "00" * 32
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    sig.write_text(json.dumps(bundle))
    with pytest.raises(SignatureInvalidError, match="altered after signing"):
        verify_signature(point, keys["public"])
    sig.write_text("{not json")
    with pytest.raises(SignatureInvalidError, match="not an OpenSSF model signature"):
        verify_signature(point, keys["public"])


def test_another_key_and_no_signature_are_refused(tmp_path, gpt2_cls, keys):
    point = _run(tmp_path, gpt2_cls).latest()
    with pytest.raises(UnsignedError) as unsigned:
        verify_signature(point, keys["public"])
    assert isinstance(unsigned.value, FileNotFoundError)
    assert "savepoints sign" in unsigned.value.hint
    sign_folder(point, keys["other_private"])
    with pytest.raises(UntrustedSignatureError) as e:
        verify_signature(point, [keys["public"]])
    assert e.value.tried == [keys["public"]] and len(e.value.key_id) == 64


def test_unusable_key_files_are_refused_with_nothing_written(tmp_path, gpt2_cls, keys):
    point = _run(tmp_path, gpt2_cls).latest()
    for key, why in [
        (keys["public"], "holds no private key"),
        (keys["not_pem"], "not a PEM file"),
        (keys["rsa"], "elliptic-curve"),
        (tmp_path / "missing.pem", "does not exist"),
        (keys["encrypted"], "encrypted and no password"),
    ]:
        with pytest.raises(KeyFileError, match=why) as e:
            sign_folder(point, key)
        assert e.value.key == key and e.value.hint
    assert not is_signed(point.path)
    with pytest.raises(KeyFileError, match="password is wrong"):
        sign_folder(point, keys["encrypted"], password="wrong")
    sign_folder(point, keys["encrypted"], password="s3cret")  # the same key, encrypted
    assert verify_signature(point, keys["public"]).key == keys["public"]
    with pytest.raises(KeyFileError, match="private key, and checking a signature needs"):
        verify_signature(point, keys["private"])
    with pytest.raises(savepoints.errors.InvalidArgumentError, match="No public key"):
        verify_signature(point, [])


def test_a_failed_resign_leaves_the_old_signature_whole(tmp_path, gpt2_cls, keys):
    points = _run(tmp_path, gpt2_cls)
    folder = export(points.latest(), tmp_path / "exported")
    sig = sign_folder(folder, keys["private"])
    before = sig.read_bytes()
    (folder / "link.json").symlink_to(folder / "config.json")  # model_signing refuses links
    with pytest.raises(savepoints.errors.InvalidArgumentError, match="symlink"):
        sign_folder(folder, keys["other_private"])
    assert sig.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_tagging_a_signed_save_point_needs_a_new_signature(tmp_path, gpt2_cls, keys):
    points = _run(tmp_path, gpt2_cls)
    sign_folder(points.latest(), keys["private"])
    points.tag(1, "release")
    with pytest.raises(SignatureMismatchError) as e:
        verify_signature(points.get("release"), keys["public"])
    assert "tag, untag or compact" in e.value.hint
    sign_folder(points.get("release"), keys["private"])
    assert check_trusted(points.get("release"), [keys["public"]]).key == keys["public"]


# ---------------------------------------------------------------- restore and retention


def test_restore_with_trusted_keys_loads_only_a_trusted_save_point(tmp_path, gpt2_cls, keys):
    points = _run(tmp_path, gpt2_cls, steps=2)
    saved = {k: v.clone() for k, v in gpt2_cls.state_dict().items()}
    with torch.no_grad():
        for p in gpt2_cls.parameters():
            p.add_(1.0)
    changed = {k: v.clone() for k, v in gpt2_cls.state_dict().items()}

    def untouched() -> bool:
        now = gpt2_cls.state_dict()
        return all(torch.equal(now[k], changed[k]) for k in now)

    # Step 1 signed, the latest (2) not: refused, not skipped for step 1.
    sign_folder(points.get(1), keys["private"])
    with pytest.raises(UnsignedError, match="step-00000002"):
        points.restore(model=gpt2_cls, trusted_keys=[keys["public"]])
    assert untouched()
    sign_folder(points.get(2), keys["other_private"])
    with pytest.raises(UntrustedSignatureError):
        points.restore(model=gpt2_cls, trusted_keys=keys["public"])
    assert untouched()
    with pytest.raises(KeyFileError):
        points.restore(model=gpt2_cls, trusted_keys=[keys["private"]])
    sign_folder(points.get(2), keys["private"])
    points.restore(model=gpt2_cls, trusted_keys=[keys["other_public"], keys["public"]])
    assert all(torch.equal(gpt2_cls.state_dict()[k], v) for k, v in saved.items())


def test_restore_falls_back_past_a_corrupt_latest_only_to_a_trusted_one(tmp_path, gpt2_cls, keys):
    points = _run(tmp_path, gpt2_cls, steps=2)
    sign_folder(points.get(1), keys["private"])
    sign_folder(points.get(2), keys["private"])
    _flip_byte(points.get(2).path / "model.safetensors")  # damage: the hash check falls back
    restored = type(gpt2_cls)(gpt2_cls.config)
    with pytest.warns(UserWarning, match="restoring step 1"):
        state = points.restore(model=restored, trusted_keys=[keys["public"]])
    assert state == {} and points.get(1).verify().ok
    (points.get(1).path / SIGNATURE_NAME).unlink()  # the fallback target must be signed
    with pytest.warns(UserWarning), pytest.raises(UnsignedError, match="step-00000001"):
        points.restore(model=restored, trusted_keys=[keys["public"]])


def test_retention_deletes_a_signed_save_point_with_its_signature(tmp_path, gpt2_cls, keys):
    points = SavePoints(tmp_path / "run", async_save=False, keep=Keep(last=1))
    opt = torch.optim.AdamW(gpt2_cls.parameters())
    first = points.save(1, model=gpt2_cls, optimizer=opt)
    sign_folder(first, keys["private"])
    train_steps(gpt2_cls, opt, steps=1)
    points.save(2, model=gpt2_cls, optimizer=opt)
    assert [p.step for p in points.list()] == [2] and not first.path.exists()
    assert points.gc() == (0, 0) and points.verify().ok
    points.delete(2)  # and a plain delete of a signed one
    sign_folder(points.save(3, model=gpt2_cls), keys["private"])
    points.delete(3)
    assert points.list() == [] and not (tmp_path / "run" / "step-00000003").exists()


# ---------------------------------------------------------------- the reference CLI


def test_the_reference_cli_verifies_our_signatures_and_we_verify_its(tmp_path, gpt2_cls, keys):
    points = _run(tmp_path, gpt2_cls)
    point = points.latest()
    folder = export(point, tmp_path / "exported")

    # Ours -> theirs: a save point and an exported folder, no --ignore-paths needed.
    for signed in (point.path, folder):
        sig = sign_folder(signed, keys["private"])
        ok = _cli("verify", "key", signed, "--signature", sig, "--public_key", keys["public"])
        assert ok.returncode == 0, ok.stderr
    wrong = _cli("verify", "key", folder, "--signature", sig, "--public_key", keys["other_public"])
    assert wrong.returncode != 0 and "Key mismatch" in wrong.stderr

    # Theirs -> ours: the CLI signs a save point and an exported folder in place.
    other_private = keys["other_private"]
    for signed in (point.path, folder):
        sig = signed / SIGNATURE_NAME
        out = _cli("sign", "key", signed, "--signature", sig, "--private_key", other_private)
        assert out.returncode == 0, out.stderr
        report = check_trusted(signed, [keys["other_public"]])
        assert report.key == keys["other_public"] and "config.json" in report.files
    assert point.verify().ok  # the CLI's signature is no extra file to the hash check
    restored = type(gpt2_cls)(gpt2_cls.config)
    points.restore(model=restored, trusted_keys=[keys["other_public"]])
    assert same_weights(restored, gpt2_cls)

    # A signature that leaves save point files out does not vouch for the save point.
    out = _cli(
        "sign", "key", point.path, "--signature", point.path / SIGNATURE_NAME,
        "--private_key", keys["private"], "--ignore-paths", point.path / "training_state",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    with pytest.raises(SignatureMismatchError, match="training_state/.*not covered"):
        check_trusted(point, [keys["public"]])


@pytest.mark.parametrize(
    "serialization",
    [{"method": "files", "hash": "blake3"}, {"method": "shards", "hash": "blake2", "size": 64}],
)
def test_signatures_the_library_makes_with_other_hashes_verify(tmp_path, keys, serialization):
    from model_signing import hashing, signing

    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (folder / "sub" / "config.json").write_text("{}")
    config = hashing.Config()
    if serialization["method"] == "files":
        config.use_file_serialization(hashing_algorithm=serialization["hash"])
    else:
        config.use_shard_serialization(
            hashing_algorithm=serialization["hash"], shard_size=serialization["size"]
        )
    config.set_ignored_paths(paths=[SIGNATURE_NAME])
    signing.Config().use_elliptic_key_signer(private_key=keys["private"]).set_hashing_config(
        config
    ).sign(folder, folder / SIGNATURE_NAME)
    report = verify_signature(folder, keys["public"])
    assert report.files == ("sub/config.json", "weights.bin")
    _flip_byte(folder / "weights.bin", offset=3)
    with pytest.raises(SignatureMismatchError, match=r"weights\.bin.*: altered"):
        verify_signature(folder, keys["public"])


# ---------------------------------------------------------------- an optional dependency


def test_signing_is_optional_and_its_absence_is_a_clear_error(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        import savepoints, savepoints.interop.signing as signing
        assert "model_signing" not in sys.modules, "imported by import savepoints"
        sys.modules["model_signing"] = None  # as if it were not installed
        try:
            signing.sign_folder(sys.argv[1], "key.pem")
        except savepoints.errors.MissingDependencyError as e:
            print(e.package, "|", e.hint)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == (
        "model-signing | pip install 'savepoints[sign]' (or pip install model-signing)."
    )


def test_copy_of_a_signed_folder_verifies_anywhere(tmp_path, gpt2_cls, keys):
    """File paths in the signature are relative: a moved or renamed folder verifies."""
    point = _run(tmp_path, gpt2_cls).latest()
    sign_folder(point, keys["private"])
    moved = shutil.copytree(point.path, tmp_path / "elsewhere" / "renamed")
    assert verify_signature(moved, keys["public"]).folder == moved.resolve()


# ---------------------------------------------------------------- the command line


def test_sign_and_verify_from_the_command_line(tmp_path, gpt2_cls, keys, monkeypatch):
    from click.testing import CliRunner

    from savepoints.cli import cli

    runner = CliRunner()
    points = _run(tmp_path, gpt2_cls, steps=2)
    points.close()
    run = tmp_path / "run"
    signed = runner.invoke(cli, ["sign", str(run), "2", "--key", str(keys["private"])])
    assert signed.exit_code == 0, signed.output
    text = " ".join(signed.output.split())
    assert "signed save point step 2" in text and "model.sig" in text
    assert (points.get(2).path / "model.sig").is_file()
    assert not (points.get(1).path / "model.sig").exists()
    # One save point: signed and verified. The whole run: step 1 is not signed.
    one = runner.invoke(cli, ["verify", str(run), "2", "--key", str(keys["public"])])
    assert one.exit_code == 0, one.output
    assert "signed by" in one.output and "signed by a trusted key" in one.output
    whole = runner.invoke(cli, ["verify", str(run), "--key", str(keys["public"]), "--json"])
    assert whole.exit_code == 3
    report = json.loads(whole.stdout)
    by_step = {Path(c["path"]).name: c for c in report["save_points"]}
    assert by_step["step-00000002"]["signature"]["ok"] and by_step["step-00000002"]["ok"]
    assert not by_step["step-00000001"]["signature"]["ok"] and not report["ok"]
    assert "is not signed" in by_step["step-00000001"]["signature"]["error"]
    # Without --key, verify is the hash check it always was: model.sig is no extra file.
    assert runner.invoke(cli, ["verify", str(run)]).exit_code == 0
    # Another signer's key: refused, exit 3, saying whose key signed it.
    other = runner.invoke(cli, ["verify", str(run), "2", "--key", str(keys["other_public"])])
    assert other.exit_code == 3 and "none of the trusted keys" in " ".join(other.output.split())
    # A private key where a public one is needed: a bad argument (exit 1), before hashing.
    wrong = runner.invoke(cli, ["verify", str(run), "2", "--key", str(keys["private"])])
    assert wrong.exit_code == 1 and "Cannot use the key file" in " ".join(wrong.output.split())
    # An encrypted key: its password comes from the environment, never an argument.
    monkeypatch.setenv("SP_KEY_PASSWORD", "s3cret")
    again = runner.invoke(cli, ["sign", str(run), "1", "--key", str(keys["encrypted"]),
                                "--password-env", "SP_KEY_PASSWORD"])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert runner.invoke(cli, ["verify", str(run), "--key", str(keys["public"])]).exit_code == 0
    # Tags live in the signed manifest: tagging says the signature must be made again.
    tagged = runner.invoke(cli, ["tag", str(run), "2", "release"])
    assert tagged.exit_code == 0
    assert "signature no longer matches" in " ".join(tagged.output.split())
    stale = runner.invoke(cli, ["verify", str(run), "release", "--key", str(keys["public"])])
    assert stale.exit_code == 3 and "savepoint.json" in stale.output
    unset = runner.invoke(cli, ["sign", str(run), "1", "--key", str(keys["encrypted"]),
                                "--password-env", "SP_NOT_SET"])  # fmt: skip
    assert unset.exit_code == 1 and "SP_NOT_SET, which is not set" in unset.output


def test_an_exported_folder_is_signed_and_checked_by_folder(tmp_path, gpt2_cls, keys):
    from click.testing import CliRunner

    from savepoints.cli import cli

    runner = CliRunner()
    points = _run(tmp_path, gpt2_cls, steps=1)
    out = tmp_path / "export"
    export(points.get(1), out)
    points.close()
    assert runner.invoke(cli, ["sign", str(out), "--key", str(keys["private"])]).exit_code == 0
    ok = runner.invoke(cli, ["verify", str(out), "--key", str(keys["public"]), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["signature"]["ok"]
    (out / "config.json").write_text((out / "config.json").read_text() + " ")
    bad = runner.invoke(cli, ["verify", str(out), "--key", str(keys["public"])])
    assert bad.exit_code == 3 and "config.json" in bad.output
