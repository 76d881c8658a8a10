"""make_data.py given hostile input: a tokenizer that fails on encode, an output prefix that names
the input file: one `error:` line, exit 2, nothing written and the input untouched."""
from __future__ import annotations

import pytest

from hostile_cli import error_line, listing, run_script

TEXT = "hello world\n\nhello there\n"


def make_data(monkeypatch, capsys, *argv) -> tuple[int, str]:
    code, out, err = run_script(monkeypatch, capsys, "make_data", *argv, "--quiet")
    assert out == ""
    return code, error_line(err)


@pytest.fixture
def broken_tokenizer(tmp_path_factory) -> str:
    """A valid tokenizer.json whose WordLevel model has no unk token: encode fails on 'there'."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"hello": 1, "world": 2}))
    tok.pre_tokenizer = Whitespace()
    path = str(tmp_path_factory.mktemp("tok") / "wordlevel.json")
    tok.save(path)
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_a_tokenizer_that_fails_on_encode_is_one_sentence_naming_it(tmp_path, monkeypatch, capsys,
                                                                    broken_tokenizer, workers):
    src = tmp_path / "in.txt"
    src.write_text(TEXT)
    code, line = make_data(monkeypatch, capsys, src, "--output", tmp_path / "out", "--tokenizer",
                           broken_tokenizer, "--workers", workers)
    assert code == 2
    assert line == (f"error: the tokenizer {broken_tokenizer} failed to encode the text (WordLevel error: "
                    "Missing [UNK] token from the vocabulary); fix the tokenizer file or choose another --tokenizer")
    assert listing(tmp_path) == ["in.txt"]  # no PREFIX.bin/.idx, no temporary files


@pytest.mark.parametrize("name,output", [("data.bin", "data"), ("data.idx", "data.bin"), ("data.mask.bin", "data"),
                                         ("data.mask.idx", "data.idx")])
def test_an_output_prefix_that_names_the_input_is_refused(tmp_path, monkeypatch, capsys, name, output):
    src = tmp_path / name
    src.write_text(TEXT)
    prefix = str(tmp_path / output)
    code, line = make_data(monkeypatch, capsys, src, "--input_format", "txt", "--output", prefix)
    assert code == 2
    assert line == (f"error: --output {prefix} would write {src}, which is the input file; choose another "
                    "--output prefix")
    assert src.read_text() == TEXT and listing(tmp_path) == [name]


def test_a_folder_as_the_tokenizer_says_it_is_a_folder(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in.txt"
    src.write_text(TEXT)
    code, line = make_data(monkeypatch, capsys, src, "--output", tmp_path / "out", "--tokenizer", tmp_path)
    assert code == 2
    assert line == f"error: --tokenizer {tmp_path} is a folder; pass the tokenizer.json or World vocab .txt file in it"
    assert listing(tmp_path) == ["in.txt"]
