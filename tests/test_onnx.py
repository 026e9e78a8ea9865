"""`savepoints export --format onnx`: torch's exporter, checked against PyTorch with ONNX
Runtime before the bundle appears."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_gpt2_config
from savepoints import SavePoints
from savepoints.cli import cli
from savepoints.interop.onnx import INT8_MIN_AGREEMENT, OnnxExportError, export_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _run(tmp_path: Path, model, tokenizer, name: str) -> Path:
    run = tmp_path / name
    with SavePoints(run) as points:
        points.save(10, model=model, tokenizer=tokenizer, metrics={"eval_accuracy": 0.5})
    return run


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = tiny_gpt2_config(num_labels=3, pad_token_id=tokenizer.pad_token_id,
                              id2label={0: "negative", 1: "neutral", 2: "positive"},
                              label2id={"negative": 0, "neutral": 1, "positive": 2})  # fmt: skip
    return _run(tmp_path_factory.mktemp("onnx"), GPT2ForSequenceClassification(config).eval(),
                tokenizer, "gpt2")  # fmt: skip


def _onnx_logits(bundle: Path, texts: list[str]) -> np.ndarray:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundle)
    enc = tok(texts, padding=True, return_tensors="np")
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {k: enc[k].astype(np.int64)
                                         for k in ("input_ids", "attention_mask")})  # fmt: skip
    return logits


def test_an_fp32_export_matches_pytorch_at_any_batch_and_length(gpt2_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    runner = CliRunner()
    out = tmp_path / "bundle"
    done = runner.invoke(cli, ["export", str(gpt2_run), str(out), "--format", "onnx",
                               "--step", "10"])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "parity with PyTorch on 64 texts: max |Δ logit|" in " ".join(done.output.split())
    info = json.loads((out / "savepoints-onnx.json").read_text())
    assert info["parity"]["max_abs_diff"] <= 1e-4 and info["parity"]["agreement"] == 1.0
    assert info["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert info["source"]["step"] == 10 and (out / "README.md").read_text().count("## ONNX")
    # Batches and lengths the trace never saw: the axes are dynamic.
    texts = ["a", "a somewhat longer text with more words in it than the first one", "mid one"]
    model = AutoModelForSequenceClassification.from_pretrained(gpt2_run / "step-00000010")
    tok = AutoTokenizer.from_pretrained(gpt2_run / "step-00000010")
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc).logits.numpy()
    assert np.abs(_onnx_logits(out, texts) - expected).max() <= 1e-4
    assert not list(tmp_path.glob(".bundle.tmp-*"))


def test_an_int8_export_is_smaller_and_agrees_on_the_labels(gpt2_run, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("great game tonight\nterrible service\nwhat time is it\n")
    parity = export_onnx(
        SavePoints(gpt2_run, readonly=True).get(10), tmp_path / "int8", quantize="int8",
        texts=texts.read_text().splitlines(),
    )  # fmt: skip
    assert parity.texts == 3 and parity.agreement >= INT8_MIN_AGREEMENT
    assert parity.tolerance is None and parity.quantize == "int8"
    import onnx

    graph = onnx.load(str(tmp_path / "int8" / "model.onnx"))
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in graph.graph.node)


def test_what_cannot_be_exported_is_refused_and_nothing_is_written(gpt2_run, tmp_path):
    from transformers import GPT2LMHeadModel

    runner = CliRunner()
    torch.manual_seed(0)
    lm = _run(tmp_path, GPT2LMHeadModel(tiny_gpt2_config()), None, "lm")
    refused = runner.invoke(cli, ["export", str(lm), str(tmp_path / "out"), "--format", "onnx",
                                  "--latest"])  # fmt: skip
    assert refused.exit_code == 1 and "GPT2LMHeadModel" in refused.output
    assert "sequence classifiers" in " ".join(refused.output.split())
    wrong = runner.invoke(cli, ["export", str(gpt2_run), str(tmp_path / "out"), "--quantize",
                                "int8", "--latest"])  # fmt: skip
    assert wrong.exit_code == 1 and "go with --format onnx" in wrong.output
    cast = runner.invoke(cli, ["export", str(gpt2_run), str(tmp_path / "out"), "--format",
                               "onnx", "--dtype", "fp16", "--latest"])  # fmt: skip
    assert cast.exit_code == 1 and "--dtype does not apply" in cast.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_an_export_that_drifts_from_pytorch_is_refused(gpt2_run, tmp_path, monkeypatch):
    from savepoints.interop import onnx as onnx_mod

    monkeypatch.setattr(onnx_mod, "FP32_TOLERANCE", 0.0)  # any float difference is too much
    point = SavePoints(gpt2_run, readonly=True).get(10)
    try:
        export_onnx(point, tmp_path / "out", texts=["one text", "and another, longer one"])
    except OnnxExportError as e:
        assert "does not match PyTorch" in e.message and "nothing was written" in e.message
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    else:  # bit-identical logits: nothing to refuse
        assert (tmp_path / "out" / "model.onnx").is_file()


def test_a_bert_classifier_exports_too(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=2,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    run = _run(tmp_path, BertForSequenceClassification(config).eval(), tokenizer, "bert")
    parity = export_onnx(SavePoints(run, readonly=True).get(10), tmp_path / "bert-onnx")
    assert parity.max_abs_diff <= 1e-4 and parity.agreement == 1.0
    logits = _onnx_logits(tmp_path / "bert-onnx", ["short", "a much longer text than that"])
    assert logits.shape == (2, 2)


# Run by the test below in a fresh interpreter where torch and transformers cannot be
# imported at all: the ONNX path of `savepoints predict` must need neither.
NO_TORCH = """
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
from savepoints.cli import main
sys.argv = ["savepoints", *sys.argv[1:]]
try:
    main()
finally:
    assert "torch" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
"""


def test_predict_on_a_bundle_runs_without_torch_and_says_what_pytorch_says(gpt2_run, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "bundle"
    runner = CliRunner()
    assert runner.invoke(cli, ["export", str(gpt2_run), str(out), "--format", "onnx",
                               "--step", "10"]).exit_code == 0  # fmt: skip
    texts = ["great game tonight!", "terrible service, never again", "ok", "what time is it"]
    expected = runner.invoke(cli, ["predict", str(gpt2_run), *texts, "--step", "10", "--json"])
    assert expected.exit_code == 0, expected.output
    expected_rows = [json.loads(line) for line in expected.stdout.splitlines()]

    def no_torch(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", NO_TORCH, *args],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    def predict(*args: str) -> subprocess.CompletedProcess[str]:
        return no_torch("predict", *args)

    # Without torch, the other commands still list, and say what they need.
    listed = no_torch("--help")
    assert listed.returncode == 0 and "predict" in listed.stdout and "Needs torch" in listed.stdout
    needs = no_torch("list", str(gpt2_run))
    assert needs.returncode == 1 and "pip install torch" in needs.stderr

    done = predict(str(out), *texts, "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["text"] for r in rows] == texts
    assert [r["label"] for r in rows] == [r["label"] for r in expected_rows]
    assert all(abs(a["probability"] - b["probability"]) <= 1e-3
               for a, b in zip(rows, expected_rows))  # fmt: skip
    shown = predict(str(out), *texts)
    assert shown.returncode == 0 and "ONNX bundle" in shown.stdout and "fp32" in shown.stdout
    assert "exported from step 10" in shown.stdout
    # Signed (savepoints sign): --key serves it only when a trusted key signed it, still
    # without torch.
    if importlib.util.find_spec("model_signing") is not None:
        from test_signing import _write_pair

        private, public = _write_pair(tmp_path, "ship")
        _, stranger = _write_pair(tmp_path, "stranger")
        assert runner.invoke(cli, ["predict", str(out), "x", "--key", str(public)]).exit_code == 3
        signed = no_torch("sign", str(out), "--key", str(private))
        assert signed.returncode == 0 and "signed folder" in signed.stdout, signed.stderr
        trusted = predict(str(out), *texts, "--key", str(public))
        assert trusted.returncode == 0 and "signed by" in trusted.stdout, trusted.stderr
        refused = predict(str(out), "hello", "--key", str(stranger), "--json")
        assert refused.returncode == 3 and not refused.stdout
        assert "none of the trusted keys" in " ".join(refused.stderr.split())
    # A bundle is verified before it is used, and holds one model.
    with open(out / "model.onnx", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    altered = predict(str(out), "hello")
    assert altered.returncode == 3 and "model.onnx (altered)" in altered.stderr
    assert "--no-verify" in altered.stderr
    # A bundle that records no hashes cannot be verified: refused unless --no-verify.
    info = json.loads((out / "savepoints-onnx.json").read_text())
    info.pop("files")
    (out / "savepoints-onnx.json").write_text(json.dumps(info))
    unlisted = runner.invoke(cli, ["predict", str(out), "hello"])
    assert unlisted.exit_code == 3 and "records no file hashes" in " ".join(unlisted.output.split())
    stepped = predict(str(out), "hello", "--step", "10")
    assert stepped.returncode == 1 and "holds one model" in " ".join(stepped.stderr.split())


def test_without_onnxruntime_export_and_predict_say_what_to_install(gpt2_run, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    import sys

    runner = CliRunner()
    out = tmp_path / "bundle"
    assert runner.invoke(cli, ["export", str(gpt2_run), str(out), "--format", "onnx",
                               "--step", "10"]).exit_code == 0  # fmt: skip
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    refused = runner.invoke(cli, ["export", str(gpt2_run), str(tmp_path / "again"), "--format",
                                  "onnx", "--step", "10"])  # fmt: skip
    text = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "needs the package 'onnxruntime'" in text
    assert "pip install 'savepoints[onnx]'" in text and not (tmp_path / "again").exists()
    predicted = runner.invoke(cli, ["predict", str(out), "hello"])
    text = " ".join(predicted.output.split())
    assert predicted.exit_code == 1 and "needs the package 'onnxruntime'" in text
