"""`savepoints train` on bad data files: one line naming the file, the line and what is
wrong, a hint how to fix it, exit status 1, nothing written, never a raw exception."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from savepoints import DataFileError, InvalidArgumentError
from savepoints.cli import cli
from savepoints.integrations.finetune import FinetuneConfig, load_data

pytest.importorskip("transformers")


def rows(n: int = 12) -> str:
    return "".join(f"text number {i},{i % 2}\n" for i in range(n))


GOOD_CSV = "text,label\n" + rows()

# (file name, contents, line named in the message or None, what the message says)
BAD_FILES = [
    ("unterminated.csv", 'text,label\nfine,1\n"never closed,0\nmore,1\n', 3, "never closed"),
    ("latin1.csv", "text,label\nok,1\ncafé,0\n".encode("latin-1"), 3, "not UTF-8"),
    ("single.csv", "text,label\n" + "".join(f"t {i},pos\n" for i in range(9)), None,
     "every example has the label 'pos'; a classifier needs at least two labels"),
    ("empty.csv", "", None, "the file is empty"),
    ("blank.jsonl", "\n  \n", None, "the file is empty"),
    ("header-only.csv", "text,label\n", None, "a header row but no examples"),
    ("columns.csv", "sentence,y\nhi,1\nho,0\n", 1,
     "has no column 'text' or 'label' (its columns: 'sentence' and 'y')"),
    ("no-label.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', 2,
     "has no column 'label' (its columns: 'text')"),
    ("empty-text.csv", "text,label\nhi,1\n  ,0\nho,0\n", 3, "its 'text' is empty"),
    ("blank-label.csv", "text,label\nhi,1\nthere, \nho,0\n", 3, "its 'label' is empty"),
    ("null-label.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n', 2,
     "its 'label' is empty"),
    ("missing-field.csv", "text,label\nhi,1\nthere\nho,0\n", 3, "1 field(s) and no 'label'"),
    ("comma.csv", "text,label\nhi,1\nhello, world,0\n", 3, "3 fields, the header has 2"),
    ("not-json.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n', 2,
     "is not valid JSON"),
    ("array.json", '[\n  {"text": "a", "label": 1}\n]\n', 1, "a JSON array, not JSON Lines"),
    ("list-line.jsonl", '{"text": "a", "label": 1}\n["b", 0]\n', 2,
     "a JSON array, not an object"),
    ("nested.jsonl", '{"text": {"a": 1}, "label": 1}\n', 1, "'text' is a JSON object"),
    ("negative.csv", "text,label\n" + rows() + "bad,-1\n", 14, "label -1 is negative"),
    ("semicolons.csv", "text;label\nhi;1\n", 1, "its columns: 'text;label'"),
]  # fmt: skip


def train(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["train", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def assert_one_error(code: int, out: str, err: str, fragment: str) -> list[str]:
    assert code == 1, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error:") and lines[1].startswith("hint:")
    assert fragment in lines[0], lines[0]
    return lines


@pytest.mark.parametrize(
    ("name", "content", "line", "fragment"), BAD_FILES, ids=[b[0] for b in BAD_FILES]
)
def test_bad_training_file_is_one_error_naming_file_and_line(
    tmp_path: Path, name: str, content: str | bytes, line: int | None, fragment: str
) -> None:
    data = tmp_path / name
    if isinstance(content, bytes):
        data.write_bytes(content)
    else:
        data.write_text(content, encoding="utf-8")
    code, out, err = train(data, "--run", tmp_path / "run")
    (error, _hint) = assert_one_error(code, out, err, fragment)
    where = f"{data}, line {line}:" if line is not None else f"{data}:"
    assert error.startswith(f"error: Cannot read {where}"), error
    assert not (tmp_path / "run").exists()  # nothing written before the data is good


def test_the_hints_say_how_to_fix_it(tmp_path: Path) -> None:
    cases = {
        "q.csv": ('text,label\n"open,1\n', 'write a quote inside a quoted field as two ("")'),
        "one.csv": ("text,label\na,x\nb,x\n", "Add examples of another label"),
        "semi.csv": ("text;label\nhi;1\n", "The header looks separated by ';'"),
        "cols.jsonl": ('{"t": "a", "y": 1}\n', "--text-column and --label-column"),
    }
    for name, (content, hint) in cases.items():
        (tmp_path / name).write_text(content)
        code, out, err = train(tmp_path / name, "--run", tmp_path / "run")
        assert hint in assert_one_error(code, out, err, "Cannot read")[1]
    (tmp_path / "l1.csv").write_bytes(b"text,label\ncaf\xe9,1\n")
    code, out, err = train(tmp_path / "l1.csv", "--run", tmp_path / "run")
    assert "Save the file as UTF-8" in assert_one_error(code, out, err, "byte 0xe9")[1]


def test_missing_and_folder_data_paths_are_data_file_errors(tmp_path: Path) -> None:
    for path, fragment in ((tmp_path / "nope.csv", "does not exist"), (tmp_path, "a folder")):
        code, out, err = train(path, "--run", tmp_path / "run")
        assert_one_error(code, out, err, fragment)


def test_bad_evaluation_file_is_named_too(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text(GOOD_CSV)
    (tmp_path / "eval.csv").write_text("text,label\nfine,1\nodd,7x\n")
    code, out, err = train(
        tmp_path / "train.csv", "--eval", tmp_path / "eval.csv", "--run", tmp_path / "run"
    )
    error, hint = assert_one_error(code, out, err, "label '7x' is not among the training labels")
    assert error.startswith(f"error: Cannot read {tmp_path / 'eval.csv'}, line 3:")
    assert "same label names" in hint


def test_held_out_split_that_leaves_one_label_for_training_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("text,label\na,1\nb,0\n")
    code, out, err = train(tmp_path / "d.csv", "--run", tmp_path / "run")
    _, hint = assert_one_error(code, out, err, "every example left for training has the label")
    assert "--eval" in hint


def test_good_files_read_as_before(tmp_path: Path) -> None:
    """A byte order mark, CRLF line ends, quoted commas and blank lines are fine."""
    csv_text = '\ufefftext,label\r\n"hello, world",pos\r\n\r\nbye,neg\r\n"say ""hi""",pos\r\n'
    (tmp_path / "d.csv").write_text(csv_text, encoding="utf-8", newline="")
    (tmp_path / "e.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "label": y}) for t, y in (("x", "pos"), ("y", "neg")))
    )
    cfg = FinetuneConfig(train_file=str(tmp_path / "d.csv"), eval_file=str(tmp_path / "e.jsonl"),
                         run=str(tmp_path / "run"))  # fmt: skip
    train_set, eval_set = load_data(cfg)
    assert train_set.texts == ["hello, world", "bye", 'say "hi"']
    assert train_set.label_names == ["neg", "pos"] and train_set.labels == [1, 0, 1]
    assert eval_set.texts == ["x", "y"] and eval_set.labels == [1, 0]


def test_integer_labels_keep_their_ids_and_float_ids_are_ids(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text(
        "\n".join(json.dumps({"text": f"t{i}", "label": float(i % 3)}) for i in range(9))
    )
    (tmp_path / "e.csv").write_text("text,label\nq,02\n")
    cfg = FinetuneConfig(train_file=str(tmp_path / "d.jsonl"), eval_file=str(tmp_path / "e.csv"),
                         run=str(tmp_path / "run"))  # fmt: skip
    train_set, eval_set = load_data(cfg)
    assert train_set.label_names == ["0", "1", "2"] and eval_set.labels == [2]


def test_data_file_error_is_an_invalid_argument_with_path_and_line(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("text,label\nhi,\n")
    with pytest.raises(DataFileError) as info:
        load_data(FinetuneConfig(train_file=str(tmp_path / "d.csv"), run="r"))
    assert isinstance(info.value, InvalidArgumentError) and isinstance(info.value, ValueError)
    assert info.value.path == tmp_path / "d.csv" and info.value.line == 2


@pytest.mark.parametrize(
    "option", ["--max-train-examples", "--max-eval-examples", "--save-every",
               "--gradient-accumulation"],
)  # fmt: skip
def test_non_positive_counts_are_refused_before_reading(tmp_path: Path, option: str) -> None:
    (tmp_path / "d.csv").write_text(GOOD_CSV)
    code, out, err = train(tmp_path / "d.csv", "--run", tmp_path / "run", option, "0")
    assert_one_error(code, out, err, "must be positive")


def test_a_config_takes_paths_and_keeps_them_as_text(tmp_path):
    """Regression: a pathlib.Path for the model folder failed the first save (the config
    is part of the save point's JSON state)."""
    import json

    from savepoints.integrations.finetune import FinetuneConfig

    cfg = FinetuneConfig(train_file=tmp_path / "train.csv", eval_file=tmp_path / "v.csv",
                         run=tmp_path / "run", model=tmp_path / "model")  # fmt: skip
    assert (cfg.train_file, cfg.run, cfg.model) == (
        str(tmp_path / "train.csv"), str(tmp_path / "run"), str(tmp_path / "model"))  # fmt: skip
    from dataclasses import asdict

    json.dumps(asdict(cfg))
