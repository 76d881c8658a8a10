"""make_data: documents, masks, epochs, tokenizers, and every bad-input case (message, exit, no files)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from rwkv_bone.data.binidx import MMapIndexedDataset, load_masks
from rwkv_bone.data.prepare import PrepareOptions, prepare
from rwkv_bone.data.tokenizer import WorldTokenizer
from rwkv_bone.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok() -> WorldTokenizer:
    return WorldTokenizer()


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def run(tmp_path, src, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return prepare(PrepareOptions(src, str(tmp_path / "out"), **kw))


def docs_of(prefix: str) -> list[list[int]]:
    ds = MMapIndexedDataset(prefix)
    return [ds.get(i).tolist() for i in range(len(ds))]


def test_text_jsonl_documents_end_with_zero(tmp_path, tok):
    texts = ["Hello world.", "中文 and emoji 😀", "", "  spaces\n\nand\tlines  "]
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts] + [""])  # blank line
    r = run(tmp_path, src)
    assert r.documents == 4 and not r.has_masks and r.dtype == np.uint16
    assert docs_of(r.prefix) == [tok.encode(t) + [0] for t in texts]
    assert not os.path.exists(r.prefix + ".mask.idx")
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "out.idx", "t.jsonl"]


def test_query_response_masks_cover_response_and_final_zero(tmp_path, tok):
    pairs = [("What is 2+2?", "4"), ("Say hi in French.", "Bonjour ! 你好")]
    src = write_jsonl(tmp_path / "qa.jsonl", [{"query": q, "response": a} for q, a in pairs])
    r = run(tmp_path, src)
    assert r.has_masks
    ds = MMapIndexedDataset(r.prefix)
    masks = load_masks(r.prefix, ds)
    for i, (q, a) in enumerate(pairs):
        prompt = tok.encode(f"User: {q}\n\nAssistant:")
        response = tok.encode(f" {a}")
        doc, mask = ds.get(i).tolist(), masks.get(i).tolist()
        assert doc == prompt + response + [0]
        assert mask == [0] * len(prompt) + [1] * (len(response) + 1)
        trained = [t for t, m in zip(doc, mask) if m]
        assert tok.decode(trained) == f" {a}" and trained[-1] == 0


def test_auto_format_mixes_text_alpaca_and_qa_per_record(tmp_path, tok):
    recs = [{"text": "plain one"}, {"text": "plain two"},
            {"instruction": "Translate.", "input": "chat", "output": "cat"},
            {"instruction": "Count to 2.", "output": "1 2"},
            {"query": "Q?", "response": "A."}]
    src = write_jsonl(tmp_path / "mix.jsonl", recs)
    r = run(tmp_path, src, batch_docs=2)  # the first instruction record arrives in batch 2
    ds = MMapIndexedDataset(r.prefix)
    masks = load_masks(r.prefix, ds)
    assert masks.get(0).tolist() == [1] * int(ds.sizes[0])  # text written before masks existed
    assert masks.get(1).tolist() == [1] * int(ds.sizes[1])
    p2 = tok.encode("User: Translate.\nchat\n\nAssistant:")
    assert ds.get(2).tolist() == p2 + tok.encode(" cat") + [0]
    assert masks.get(2).tolist()[:len(p2)] == [0] * len(p2)
    assert ds.get(3).tolist() == tok.encode("User: Count to 2.\n\nAssistant:") + tok.encode(" 1 2") + [0]
    assert ds.get(4).tolist() == tok.encode("User: Q?\n\nAssistant:") + tok.encode(" A.") + [0]


def test_custom_fields_format_and_templates(tmp_path, tok):
    src = write_jsonl(tmp_path / "c.jsonl", [{"q": "hi", "a": "there", "text": "ignored"}])
    r = run(tmp_path, src, format="qa", prompt_field="q", response_field="a",
            prompt_template="Question: {prompt}\nAnswer:", response_template=" {response}!")
    prompt = tok.encode("Question: hi\nAnswer:")
    assert docs_of(r.prefix) == [prompt + tok.encode(" there!") + [0]]


def test_txt_modes_blocks_lines_whole(tmp_path, tok):
    src = tmp_path / "p.txt"
    src.write_text("first para\nline two\n\n\n  \nsecond para\n\nthird\n", encoding="utf-8")
    blocks = run(tmp_path, str(src))
    assert docs_of(blocks.prefix) == [tok.encode(t) + [0] for t in
                                      ["first para\nline two", "second para", "third"]]
    lines = run(tmp_path, str(src), txt_mode="lines")
    assert docs_of(lines.prefix) == [tok.encode(t) + [0] for t in
                                     ["first para", "line two", "second para", "third"]]
    whole = run(tmp_path, str(src), txt_mode="whole")
    assert docs_of(whole.prefix) == [tok.encode(src.read_text(encoding="utf-8")) + [0]]


def test_two_workers_write_the_same_files_as_one(tmp_path):
    recs = [{"text": f"document {i} " * (i % 7 + 1)} if i % 3 else {"query": f"q{i}", "response": "r"}
            for i in range(60)]
    src = write_jsonl(tmp_path / "w.jsonl", recs)
    one = prepare(PrepareOptions(src, str(tmp_path / "one"), workers=1, progress=False, batch_docs=4))
    two = prepare(PrepareOptions(src, str(tmp_path / "two"), workers=2, progress=False, batch_docs=4))
    for ext in (".bin", ".idx", ".mask.bin", ".mask.idx"):
        assert open(one.prefix + ext, "rb").read() == open(two.prefix + ext, "rb").read()


def test_epochs_shuffle_is_seeded_and_each_epoch_is_a_permutation(tmp_path):
    recs = [{"query": f"question {i}", "response": f"answer {i}"} for i in range(12)]
    src = write_jsonl(tmp_path / "e.jsonl", recs)
    base = docs_of(run(tmp_path, src).prefix)

    def epochs(name, seed):
        r = prepare(PrepareOptions(src, str(tmp_path / name), epochs=3, seed=seed, workers=1,
                                   progress=False))
        ds, masks = MMapIndexedDataset(r.prefix), load_masks(r.prefix, MMapIndexedDataset(r.prefix))
        assert r.tokens == 3 * sum(map(len, base)) and len(ds) == 36
        return docs_of(r.prefix), [masks.get(i).tolist() for i in range(len(ds))]

    a, ma = epochs("a", 1)
    b, mb = epochs("b", 1)
    c, _ = epochs("c", 2)
    assert a == b and ma == mb and a != c
    for e in range(3):
        chunk = a[12 * e:12 * (e + 1)]
        assert sorted(chunk) == sorted(base) and chunk != base
    for doc, mask in zip(a, ma):  # masks moved with their documents
        assert len(mask) == len(doc) and mask[-1] == 1 and mask[0] == 0
    assert not any(".tmp" in n or "stage" in n for n in os.listdir(tmp_path))


def test_hf_tokenizer_json_and_int32_for_large_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eod>": 0, "[UNK]": 1, "hello": 2, "world": 3}
    vocab.update({f"w{i}": i for i in range(4, 70000)})
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    src = write_jsonl(tmp_path / "h.jsonl", [{"text": "hello world w69999"}, {"text": "zzz"}])
    r = run(tmp_path, src, tokenizer=str(tmp_path / "tokenizer.json"))
    assert r.dtype == np.int32 and r.vocab_size == 70000
    assert docs_of(r.prefix) == [[2, 3, 69999, 0], [1, 0]]


def test_new_run_without_instructions_removes_stale_masks(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"query": "a", "response": "b"}])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "only text"}])
    assert run(tmp_path, qa).has_masks and os.path.exists(tmp_path / "out.mask.bin")
    run(tmp_path, text)
    assert not os.path.exists(tmp_path / "out.mask.bin")


def test_ctx_len_gives_magic_prime_and_exit_tokens(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 200}] * 10)
    r = run(tmp_path, src, ctx_len=16)
    assert r.train_args() == (f"--data_file {r.prefix} --ctx_len 16 --magic_prime "
                              f"{r.magic_prime} --my_exit_tokens {r.tokens}")
    assert r.magic_prime % 3 == 2 and r.magic_prime <= r.tokens // 16 - 1


# ---- bad input: one clear sentence naming file and line, exit 2 from the CLI, no files left ----

def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "make_data.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_invalid_json_names_file_and_line_and_leaves_nothing(tmp_path):
    src = write_jsonl(tmp_path / "data.jsonl", [{"text": "ok"}, {"text": "ok"}, '{"text": "x",'])
    p = cli(src, "--output", str(tmp_path / "out"), "--quiet")
    assert p.returncode == 2
    assert p.stderr.strip().startswith(f"error: {src} line 3: invalid JSON (")
    assert p.stderr.strip().endswith("; fix the line or pass --skip_bad")
    assert "Traceback" not in p.stderr
    assert os.listdir(tmp_path) == ["data.jsonl"]


def test_cli_missing_input_and_success_with_train_args(tmp_path):
    p = cli(str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "out"))
    assert p.returncode == 2 and f"error: input file {tmp_path / 'nope.jsonl'} not found" in p.stderr
    src = write_jsonl(tmp_path / "ok.jsonl", [{"text": "word " * 100}] * 20 + ['{"bad'])
    p = cli(src, "--output", str(tmp_path / "out"), "--ctx_len", "32", "--skip_bad", "--workers", "2")
    assert p.returncode == 0, p.stderr
    assert f"skipped 1 bad records (first: {src} line 21: invalid JSON" in p.stderr
    # 20 documents of 101 tokens + the end-of-document 0; 2040 // 32 - 1 = 62 -> 59 (61 % 3 == 1)
    assert f"--data_file {tmp_path / 'out'} --ctx_len 32 --magic_prime 59 --my_exit_tokens 2040" \
        in p.stdout


@pytest.mark.parametrize("record,message", [
    ({"txt": "typo"}, "record has no 'text' field, nor 'query' + 'response'"),
    ({"text": 5}, "field 'text' is int, not a string"),
    ([1, 2], "a record must be a JSON object"),
    ('{"text": "\\ud800"}', "text contains an unpaired surrogate"),
])
def test_bad_records_are_named_by_line(tmp_path, record, message):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, record])
    with pytest.raises(UserError, match=rf"d\.jsonl line 2: {re.escape(message)}.*pass --skip_bad"):
        run(tmp_path, src)
    assert os.listdir(tmp_path) == ["d.jsonl"]


def test_missing_field_with_explicit_format(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"query": "q"}])
    with pytest.raises(UserError, match=r"d\.jsonl line 1: missing field 'response'"):
        run(tmp_path, src, format="qa")


def test_non_utf8_bytes_name_line_and_column(tmp_path):
    src = tmp_path / "d.txt"
    src.write_bytes(b"good block\n\nline one\nline \xff two\n")
    with pytest.raises(UserError, match=r"d\.txt line 4: not valid UTF-8 \(byte 0xff at column 6\)"):
        run(tmp_path, str(src))
    assert os.listdir(tmp_path) == ["d.txt"]


def test_skip_bad_counts_and_keeps_the_good_records(tmp_path, tok):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "{oops", {"x": 1}, {"text": "b"}])
    r = run(tmp_path, src, skip_bad=True)
    assert r.skipped == 2 and r.first_skipped.startswith(f"{src} line 2: invalid JSON")
    assert docs_of(r.prefix) == [tok.encode("a") + [0], tok.encode("b") + [0]]


def test_late_error_after_many_batches_leaves_no_files(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(50)] + ["nope"])
    with pytest.raises(UserError, match=r"line 51: invalid JSON"):
        run(tmp_path, src, batch_docs=3, epochs=2)
    assert os.listdir(tmp_path) == ["d.jsonl"]


def test_empty_input_is_a_user_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match=r"e\.jsonl contains no documents"):
        run(tmp_path, str(tmp_path / "e.jsonl"))
    src = write_jsonl(tmp_path / "b.jsonl", ["{bad"])
    with pytest.raises(UserError, match=r"contains no documents \(1 bad records skipped\)"):
        run(tmp_path, src, skip_bad=True)
    assert sorted(os.listdir(tmp_path)) == ["b.jsonl", "e.jsonl"]


def test_unwritable_output_is_refused_before_reading(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(UserError, match=r"the --output folder .*no_such_dir does not exist"):
        prepare(PrepareOptions(src, str(tmp_path / "no_such_dir" / "out"), progress=False))
    with pytest.raises(UserError, match=r"is a folder; give a file prefix such as"):
        prepare(PrepareOptions(src, str(tmp_path), progress=False))
    (tmp_path / "afile").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"afile does not exist"):
        prepare(PrepareOptions(src, str(tmp_path / "afile" / "out"), progress=False))


def test_unknown_extension_and_json_array_are_refused(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(UserError, match="pass --input_format jsonl or --input_format txt"):
        run(tmp_path, str(tmp_path / "d.csv"))
    (tmp_path / "d.json").write_text('[{"text": "x"}]', encoding="utf-8")
    with pytest.raises(UserError, match=r"convert it, e\.g\. jq -c"):
        run(tmp_path, str(tmp_path / "d.json"))


def test_bad_options_are_user_errors(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(UserError, match="--epochs must be at least 1"):
        run(tmp_path, src, epochs=0)
    with pytest.raises(UserError, match="--prompt_template must contain {prompt}"):
        run(tmp_path, src, prompt_template="User:")
    with pytest.raises(UserError, match="fewer than 3 samples"):
        run(tmp_path, src, ctx_len=4096)
    assert os.listdir(tmp_path) == ["d.jsonl"]  # a failed run writes nothing


def test_worker_encoder_pickles_for_spawned_workers(tmp_path, tok):
    import pickle

    from rwkv_bone.data.prepare import _Encoder

    enc = _Encoder(tok, PrepareOptions("in.jsonl", "out"), "jsonl", np.dtype(np.uint16))
    clone = pickle.loads(pickle.dumps(enc))  # what a spawn-based pool would send
    batch = ([(1, b'{"query": "q", "response": "r"}'), (2, b'{"text": "t"}')], 0)
    a, b = enc.encode_batch(batch), clone.encode_batch(batch)
    assert a.tokens.tolist() == b.tokens.tolist() and a.masks.tolist() == b.masks.tolist()
    assert a.sizes.tolist() == [len(a.tokens) - 2, 2]


@pytest.mark.parametrize("native", [True, False], ids=["pyrwkv-batch", "python"])
def test_batched_encoding_gives_the_ids_masks_and_errors_of_record_by_record(native):
    """One tokenizer call per batch (pyrwkv's encode_batch) against each record alone; bad records
    (JSON, UTF-8, a lone surrogate that only the tokenizer sees) keep their place in the errors."""
    from rwkv_bone.data.prepare import _Encoder
    from rwkv_bone.data.records import RecordError, RecordFormat
    from rwkv_bone.data.tokenizer import load_tokenizer

    tok = load_tokenizer(None, native=native)
    assert hasattr(tok, "encode_many") == native
    lines = [b'{"query": "What is 2+2?", "response": "4"}', b'{"text": "caf\\u00e9 \\u4e2d\\u6587 \xf0\x9f\x98\x80"}',
             b'{"text": "bad \\ud800 surrogate"}', b'not json', b'{"text": ""}', b'{"text": "\xff bytes"}',
             b'{"instruction": "Sum", "input": "1 2", "output": "3"}', b'{"text": "  spaces\\n\\nand lines  "}']
    enc = _Encoder(tok, PrepareOptions("in.jsonl", "out"), "jsonl", np.dtype(np.uint16))
    got = enc.encode_batch(([(i + 1, raw) for i, raw in enumerate(lines)], 0))
    want_tokens, want_masks, want_errors = [], [], []
    for i, raw in enumerate(lines):
        try:
            prompt, body = RecordFormat().render_line(raw.decode("utf-8"))
            ids = ([] if prompt is None else tok.encode(prompt)) + tok.encode(body) + [0]
        except (RecordError, UnicodeError):
            want_errors.append(i + 1)
            continue
        want_tokens += ids
        want_masks += [0] * (len(tok.encode(prompt)) if prompt is not None else 0)
        want_masks += [1] * (len(ids) - (len(tok.encode(prompt)) if prompt is not None else 0))
    assert got.tokens.tolist() == want_tokens and got.masks.tolist() == want_masks
    assert [line for line, _ in got.errors] == want_errors == [3, 4, 6]
    assert "surrogate" in got.errors[0][1] and "JSON" in got.errors[1][1] and "UTF-8" in got.errors[2][1]
    good = [(i + 1, raw) for i, raw in enumerate(lines) if i + 1 not in want_errors]
    alone = enc.encode_batch((good, 0))      # no bad text: the single batch call itself
    assert alone.tokens.tolist() == want_tokens and alone.masks.tolist() == want_masks and not alone.errors


def test_forked_workers_after_an_in_process_batch_run_do_not_hang(tmp_path):
    """pyrwkv's batch call starts a thread pool that a forked child cannot use: a run with workers
    after an in-process run (which used it) must still finish, with the same files."""
    src = write_jsonl(tmp_path / "f.jsonl", [{"text": f"doc {i} \u4e2d" * (i % 5 + 1)} for i in range(40)])
    one = prepare(PrepareOptions(src, str(tmp_path / "one"), workers=1, progress=False, batch_docs=4))
    two = prepare(PrepareOptions(src, str(tmp_path / "two"), workers=2, progress=False, batch_docs=4))
    for ext in (".bin", ".idx"):
        assert open(one.prefix + ext, "rb").read() == open(two.prefix + ext, "rb").read()


def test_a_passed_native_check_is_remembered_only_for_the_same_vocab_and_build(tmp_path, monkeypatch):
    """The second start-up skips our vocab and the checks (same ids); a vocab file with other
    bytes runs them again; a broken cache file is ignored."""
    pytest.importorskip("pyrwkv_tokenizer")
    import shutil

    from rwkv_bone.data import world_native
    from rwkv_bone.data.world_vocab import world_vocab_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    checks = []
    real_check = world_native.NativeWorldTokenizer._check
    monkeypatch.setattr(world_native.NativeWorldTokenizer, "_check", lambda self: checks.append(1) or real_check(self))
    first, why = world_native.NativeWorldTokenizer.create()
    second, _ = world_native.NativeWorldTokenizer.create()
    assert not why and len(checks) == 1 and os.path.isfile(world_native.verdict_cache_file())
    assert second._table is None and second.vocab_size == first.vocab_size == 65530   # vocab not read
    text = "Hello, 世界 😀  x\n\n"
    assert second.encode(text) == first.encode(text) and second.decode(second.encode(text)) == text
    copy = tmp_path / "vocab.txt"                 # the same bytes elsewhere: the same verdict
    shutil.copy(world_vocab_path(), copy)
    assert world_native.NativeWorldTokenizer.create(str(copy))[0] is not None and len(checks) == 1
    with open(copy, "a", encoding="utf-8") as f:  # other bytes: not served from the cache
        f.write("\n")
    tok, why = world_native.NativeWorldTokenizer.create(str(copy))
    assert len(checks) == 2 or (tok is None and why)
    with open(world_native.verdict_cache_file(), "w") as f:
        f.write("{not json")
    n = len(checks)
    assert world_native.NativeWorldTokenizer.create()[0] is not None and len(checks) == n + 1


def test_the_block_reader_cuts_whole_lines_and_numbers_them(tmp_path):
    """_read_blocks on random files (CR, tabs, blank lines, a last line without newline, a BOM)
    at tiny sizes: the blocks rejoin to the file less its BOM, each holds whole lines (at most
    max_lines) and starts at the right line number."""
    import random

    from rwkv_bone.data.prepare import _read_blocks

    rng = random.Random(0)
    path = tmp_path / "f.jsonl"
    for _ in range(500):
        data = b"".join(bytes(rng.choice(b"ab \r\t") for _ in range(rng.randint(0, 40))) + b"\n"
                        for _ in range(rng.randint(0, 30)))
        data += b"tail" * rng.randint(0, 3) if rng.random() < 0.5 else b""
        data = b"\xef\xbb\xbf" + data if rng.random() < 0.3 else data
        path.write_bytes(data)
        max_lines, max_bytes = rng.randint(1, 7), rng.randint(1, 50)
        blocks = list(_read_blocks(str(path), max_lines, max_bytes))
        assert b"".join(b.data for b in blocks) == data.removeprefix(b"\xef\xbb\xbf")
        line = 1
        for b in blocks:
            assert b.first == line and b.data and b.data.count(b"\n") <= max_lines
            assert b is blocks[-1] or b.data.endswith(b"\n")
            line += b.data.count(b"\n")


def test_a_block_of_lines_encodes_as_the_same_lines_one_record_at_a_time():
    """The worker's two inputs (a block of raw lines; a list of records) give the same ids,
    sizes, masks and errors with their line numbers, on the lines the fast path takes and the
    ones it leaves to json.loads and the general path."""
    from rwkv_bone.data.prepare import _Block, _Encoder, _read_records
    from rwkv_bone.data.tokenizer import load_tokenizer, token_dtype

    lines = [b'{"text": "plain \\u00e9 \\n x"}', b'  {"text": "padded"}  ', b'{"text": 5}', b"",
             "\u3000".encode(), b'{"query": "q", "response": "r"}', b"\r", b'{"text": "crlf"}\r',
             b'{"text": "bad \xff byte"}', b"[1, 2]", b'{"other": "x"}', b"{not json", b" \t ",
             b'{"text": "a"} {"text": "b"}', b'{"text": "\\ud800"}', b'{"instruction": "i", "output": "o"}',
             b'\xef\xbb\xbf{"text": "inner bom"}', b'{"text": "last"}']
    data = b"\n".join(lines)
    tok = load_tokenizer(None)
    enc = _Encoder(tok, PrepareOptions("x.jsonl", "out"), "jsonl", token_dtype(tok.vocab_size))
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".jsonl") as f:
        f.write(data)
        f.flush()
        records = list(_read_records(f.name, "jsonl", "lines"))
    a, b = enc.encode_batch(_Block(1, data)), enc.encode_batch((records, len(data)))
    assert a.tokens.tolist() == b.tokens.tolist() and a.sizes.tolist() == b.sizes.tolist()
    assert a.masks.tolist() == b.masks.tolist() and a.errors == b.errors and a.nbytes == b.nbytes
    assert [line for line, _ in a.errors] == [3, 5, 9, 10, 11, 12, 14, 15, 17]
    assert len(a.sizes) == 6  # plain, padded, qa, crlf, instruction and last
