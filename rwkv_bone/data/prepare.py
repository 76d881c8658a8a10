"""make_data: stream text or instruction data into binidx token files (plus loss masks for SFT).

Inputs
- `.jsonl`, one JSON object per line (blank lines are ignored). Each record is, per --format:
  text:   {"text": ...}                                  -> the whole text is trained
  qa:     {"query": ..., "response": ...}                (MetaMathQA field names)
  alpaca: {"instruction": ..., "input": ..., "output": ...}  ("input" optional; when non-empty it
          joins the instruction after a newline)
  auto (default) decides per record, in that order, by which fields are present. Field names are
  options (--text_field, --prompt_field, --response_field, --instruction_field, --input_field,
  --output_field).
- `.txt`: one document per blank-line-separated block (--txt_mode blocks, default), per line
  (lines), or the whole file as one document (whole; that document is held in memory).

Instruction records are rendered with the RWKV chat convention
    prompt   = "User: {prompt}\\n\\nAssistant:"      (--prompt_template)
    response = " {response}"                        (--response_template)
so the model sees "User: What is 2+2?\\n\\nAssistant: 4" and, at inference, a prompt ending in
"Assistant:" (no trailing space) is continued by the response. The prompt and the response are
tokenised separately and concatenated, so the mask boundary is a token boundary.

Outputs (PREFIX = --output)
- PREFIX.bin/.idx: one item per document, its tokens followed by the end-of-document id 0;
  uint16 when the vocab has <= 65536 ids, else int32.
- PREFIX.mask.bin/.idx (uint8, same item sizes), written when any record is an instruction record:
  1 on response tokens and the final 0 (the tokens to predict), 0 on prompt tokens; plain-text
  documents are all 1. A trainer uses loss mask = mask[1:] for targets y = doc[1:].
All files go to temporary names first and are renamed at the end: an error leaves nothing behind.

Tokeniser: --tokenizer (default RWKV World). World-format vocabs are encoded by our C byte trie
(data/world_trie.py) once its ids equal our reference on a start-up check, else (the World vocab)
by pyrwkv-tokenizer after the same check, else, with one line on stderr, by the Python
WorldTokenizer. Encoded ids go straight into arrays: no Python list per document.

Streaming: the input is read line by line in batches; batches are tokenised by a pool of worker
processes (order preserved, a bounded number in flight) and appended to the .bin as they arrive;
only the document sizes stay in memory. --epochs N writes the data N times, each epoch in a fresh
seeded random order (--seed); --shuffle shuffles a single epoch too.
"""
from __future__ import annotations

import gc
import itertools
import json
import json.scanner
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..atomic import atomic_path, check_writable_dir
from ..errors import UserError
from .binidx import MAX_ITEM, BinIdxWriter, MMapIndexedDataset, magic_prime, split_prefix
from .records import (DEFAULT_PROMPT_TEMPLATE, DEFAULT_RESPONSE_TEMPLATE, FORMATS, RecordError,
                      RecordFormat, check_templates, encode_text)
from .tokenizer import EOD_ID, Tokenizer, load_tokenizer, token_dtype

__all__ = ["DEFAULT_PROMPT_TEMPLATE", "DEFAULT_RESPONSE_TEMPLATE", "FORMATS", "TXT_MODES",
           "PrepareOptions", "PrepareResult", "prepare", "record_format"]
TXT_MODES = ("blocks", "lines", "whole")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class PrepareOptions(RecordFormat):
    """make_data's options. The record options (format, *_field, *_template) are RecordFormat's
    fields, keyword-only; the ones below may also be given by position (input, output, ...)."""
    input: str
    output: str
    tokenizer: str | None = None           # None: RWKV World; a tokenizer.json; a World vocab .txt
    native_tokenizer: bool = True          # World vocabs: the C trie (or pyrwkv) after its start-up check
    input_format: str | None = None        # "jsonl" | "txt"; None: from the file extension
    txt_mode: str = "blocks"
    epochs: int = 1
    shuffle: bool = False
    seed: int = 0
    ctx_len: int | None = None
    workers: int | None = None             # None: os.cpu_count()
    skip_bad: bool = False
    progress: bool = True
    batch_docs: int = 4096                 # records (or lines) per batch a worker encodes
    batch_bytes: int = 1 << 18


@dataclass
class PrepareResult:
    prefix: str
    documents: int             # per epoch
    tokens: int                # in the .bin, all epochs
    epochs: int
    dtype: np.dtype
    vocab_size: int
    has_masks: bool
    skipped: int = 0
    first_skipped: str | None = None
    magic_prime: int | None = None
    ctx_len: int | None = None
    outputs: list[str] = field(default_factory=list)

    def train_args(self) -> str | None:
        """The train.py arguments for one pass over the data (needs ctx_len)."""
        if self.ctx_len is None or self.magic_prime is None:
            return None
        return (f"--data_file {self.prefix} --ctx_len {self.ctx_len} "
                f"--magic_prime {self.magic_prime} --my_exit_tokens {self.tokens}")


@dataclass
class _Encoded:
    tokens: np.ndarray                  # (T,) all documents of the batch, 0 after each
    sizes: np.ndarray                   # (docs,) int64
    masks: np.ndarray | None            # (T,) uint8, None when the batch has no instruction record
    errors: list[tuple[int, str]]       # (line, message) of skipped records
    nbytes: int


_SCAN = json.scanner.make_scanner(json.JSONDecoder())  # (text, start) -> (value, end) or StopIteration


@dataclass(frozen=True)
class _Block:
    """Whole lines of a .jsonl file (or of a .txt read per line), from line `first` on, blank
    lines included: what the reader hands a worker, so that splitting, decoding and parsing the
    lines is the workers' work, not the reading process's."""
    first: int
    data: bytes


# The whitespace bytes.strip() removes: a line of only these is blank (str.strip() would also drop
# Unicode spaces such as U+3000, which are text).
_BLANK = " \t\n\r\x0b\x0c"


def record_format(o: PrepareOptions) -> RecordFormat:
    """The record format (fields, templates) alone, as a plain RecordFormat."""
    return RecordFormat(**{f.name: getattr(o, f.name) for f in fields(RecordFormat)})


class _Encoder:
    """Turns raw records into token ids (and masks). Lives in every worker process."""

    def __init__(self, tok: Tokenizer, opts: PrepareOptions, kind: str,
                 dtype: np.dtype):
        self.tok, self.o, self.kind, self.dtype = tok, opts, kind, dtype
        self.fmt = record_format(opts)

    def _parse(self, text: str) -> tuple[str | None, str]:
        """(prompt or None, body) of one record."""
        if self.kind == "txt":
            return None, text
        return self.fmt.render_line(text)

    def _encode_all(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, dict[int, RecordError]]:
        """(ids, counts, bad): every text's ids one after another, each text's number of ids, and
        the RecordError of each text that could not be encoded (its count is 0). One tokenizer call
        for all texts when the tokenizer has a batch call (encode_flat straight into an array, or
        encode_many); on a failure, text by text to find which (encode_text)."""
        flat = getattr(self.tok, "encode_flat", None)
        if flat is not None:
            try:
                ids, counts = flat(texts)
                return ids.astype(self.dtype, copy=False), counts, {}
            except Exception:  # noqa: BLE001 - some text is bad: find which, one by one below
                pass
        lists: list[list[int] | RecordError] | None = None
        many = getattr(self.tok, "encode_many", None)
        if many is not None and flat is None:
            try:
                lists = many(texts)
            except Exception:  # noqa: BLE001 - as above
                pass
        if lists is None:
            lists = []
            for text in texts:
                try:
                    lists.append(encode_text(self.tok, text, self.o.tokenizer))
                except RecordError as e:
                    lists.append(e)
        bad = {i: e for i, e in enumerate(lists) if isinstance(e, RecordError)}
        counts = np.array([0 if i in bad else len(x) for i, x in enumerate(lists)], dtype=np.int64)
        good = (x for x in lists if not isinstance(x, RecordError))
        ids = np.fromiter(itertools.chain.from_iterable(good), dtype=self.dtype, count=int(counts.sum()))
        return ids, counts, bad

    def _decode(self, lineno: int, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = lineno + raw.count(b"\n", 0, e.start)
            col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
            raise RecordError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col}); "
                              "re-encode the file as UTF-8", line) from None

    def _block_lines(self, block: _Block) -> list[tuple[int, str | bytes]]:
        """(line number, text) of each non-blank line of `block`, decoded in one call; a block
        that is not valid UTF-8 gives its lines as bytes, for _decode to name the bad one."""
        try:
            lines: Sequence[str | bytes] = block.data.decode("utf-8").split("\n")
            blank, cr = _BLANK, "\r"
        except UnicodeDecodeError:
            lines, blank, cr = block.data.split(b"\n"), _BLANK.encode(), b"\r"
        first = block.first
        return [(first + k, line.rstrip(cr)) for k, line in enumerate(lines) if line.strip(blank)]  # type: ignore

    def encode_batch(self, batch: _Block | tuple[list[tuple[int, bytes]], int]) -> _Encoded:
        """The documents of a batch (a block of lines, or (records, bytes)) in record order: the
        same ids and errors as record by record."""
        if isinstance(batch, _Block):
            done = self._plain_block(batch)
            if done is not None:
                return done
            return self._encode_records(self._block_lines(batch), len(batch.data))[0]
        return self._encode_records(*batch)[0]

    def _plain_block(self, block: _Block) -> _Encoded | None:
        """A .jsonl block through the tokenizer's C reader of plain records (encode_plain_jsonl:
        {"text": "...", ...} lines parsed, encoded and closed with their 0 in C), every other line
        through _encode_records, the two merged in line order. None where that reader does not
        apply: no such reader, another record format, or a block that is not valid UTF-8."""
        reader = getattr(self.tok, "encode_plain_jsonl", None)
        if reader is None or self.kind != "jsonl" or self.fmt.format not in ("auto", "text"):
            return None
        try:
            text = block.data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        ids, lines, sizes = reader(block.data, self.fmt.text_field, MAX_ITEM)
        ids = ids.astype(self.dtype, copy=False)
        rest = sizes < 0
        if not rest.any():
            return _Encoded(ids, sizes, None, [], len(block.data))
        split = text.split("\n")
        records = [(block.first + k, split[k].rstrip("\r")) for k in lines[rest].tolist()]
        sub, kept = self._encode_records(records, 0)
        # Each document's line, C's first then Python's; the merged order sorts by line.
        line = np.concatenate([lines[~rest], lines[rest][kept]])
        size = np.concatenate([sizes[~rest], sub.sizes])
        pool = np.concatenate([ids, sub.tokens])
        start = np.cumsum(size) - size                      # each document's ids in pool
        order = np.argsort(line, kind="stable")
        out_sizes = size[order]
        out_start = np.cumsum(out_sizes) - out_sizes
        gather = np.repeat(start[order] - out_start, out_sizes) + np.arange(int(out_sizes.sum()))
        masks = None
        if sub.masks is not None:
            masks = np.concatenate([np.ones(len(ids), np.uint8), sub.masks])[gather]
        return _Encoded(pool[gather], out_sizes, masks, sub.errors, len(block.data))

    def _encode_records(self, records: Sequence[tuple[int, str | bytes]], nbytes: int
                        ) -> tuple[_Encoded, np.ndarray]:
        """(documents, the record index of each): parse every record, encode all their texts in
        one tokenizer call, then assemble the documents in record order."""
        errors: list[tuple[int, int, str]] = []   # (record index, line, message) of skipped records
        texts: list[str] = []
        parsed: list[tuple[int, int, bool]] = []  # (record index, line, has a prompt)
        # The common record, a JSON object whose text field is a string (format auto or text), in
        # a few steps: json's own C scanner on the whole line (json.loads minus its Python frames;
        # a line it does not take whole, e.g. padded with spaces, goes to json.loads); anything
        # else, errors included, takes the general path (_parse).
        plain = self.kind == "jsonl" and self.fmt.format in ("auto", "text")
        field, scan, add_text, add_doc = self.fmt.text_field, _SCAN, texts.append, parsed.append
        for i, (lineno, raw) in enumerate(records):
            if plain and type(raw) is str:
                try:
                    rec, end = scan(raw, 0)
                except (StopIteration, ValueError):
                    rec, end = None, 0
                body = rec.get(field) if type(rec) is dict and end == len(raw) else None
                if type(body) is str:
                    add_text(body)
                    add_doc((i, lineno, False))
                    continue
            try:
                prompt, body = self._parse(raw if isinstance(raw, str) else self._decode(lineno, raw))
            except RecordError as e:
                errors.append((i, e.line or lineno, e.message))
                continue
            if prompt is not None:
                add_text(prompt)
            add_text(body)
            add_doc((i, lineno, prompt is not None))
        ids, counts, bad_texts = self._encode_all(texts)
        # Per document: its body's text index, its prompt's (-1: none), its size with the final 0.
        n = len(parsed)
        has_prompt = np.array([p[2] for p in parsed], dtype=bool)
        body = np.cumsum(has_prompt.astype(np.int64) + 1) - 1 if n else np.zeros(0, np.int64)
        prompt = np.where(has_prompt, body - 1, -1)
        p_len = np.where(has_prompt, counts[np.maximum(prompt, 0)] if n else 0, 0)
        sizes = p_len + counts[body] + 1
        doomed = set(np.flatnonzero(sizes > MAX_ITEM).tolist())
        if bad_texts:
            doomed |= {d for d in range(n) if int(prompt[d]) in bad_texts or int(body[d]) in bad_texts}
        keep = np.ones(n, dtype=bool)
        for d in sorted(doomed):    # a text that failed to encode is named before an overlong document
            i, lineno, _ = parsed[d]
            e = bad_texts.get(int(prompt[d])) or bad_texts.get(int(body[d])) or RecordError(
                f"document of {int(sizes[d])} tokens exceeds the binidx limit of {MAX_ITEM}")
            errors.append((i, e.line or lineno, e.message))
            keep[d] = False
        # The documents' tokens: each one's prompt and body ids (adjacent in `ids`), then 0.
        ends = np.cumsum(counts)[body] if n else np.zeros(0, np.int64)
        tokens = np.insert(ids, ends, EOD_ID)
        if not keep.all():
            tokens = tokens[np.repeat(keep, sizes)]
            sizes, p_len, has_prompt = sizes[keep], p_len[keep], has_prompt[keep]
        masks = None
        if has_prompt.any():  # 0 on prompt tokens, 1 on the body and its 0
            values = np.tile(np.array([0, 1], np.uint8), len(sizes))
            masks = np.repeat(values, np.stack([p_len, sizes - p_len], axis=1).reshape(-1))
        errors.sort(key=lambda e: e[0])            # record order, as the records came
        kept = np.array([p[0] for p in parsed], dtype=np.int64)[keep] if n else np.zeros(0, np.int64)
        return _Encoded(tokens, sizes.astype(np.int64), masks, [e[1:] for e in errors], nbytes), kept


_WORKER: _Encoder | None = None


def _init_worker(encoder: _Encoder) -> None:
    global _WORKER
    _WORKER = encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool and cleans up


def _work(batch: _Block | tuple[list[tuple[int, bytes]], int]) -> _Encoded:
    assert _WORKER is not None
    return _WORKER.encode_batch(batch)


def _read_records(path: str, kind: str, txt_mode: str) -> Iterator[tuple[int, bytes]]:
    """(first line number, raw bytes) of each record, streamed."""
    with open(path, "rb") as f:
        if kind == "txt" and txt_mode == "whole":
            data = f.read()
            yield 1, data[3:] if data.startswith(_BOM) else data
            return
        block: list[bytes] = []
        start = 0
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(_BOM):
                line = line[3:]
            if kind == "jsonl" or txt_mode == "lines":
                if line.strip():
                    yield lineno, line.rstrip(b"\r\n")
            elif line.strip():
                if not block:
                    start = lineno
                block.append(line)
            elif block:
                yield start, b"".join(block).rstrip(b"\r\n")
                block = []
        if block:
            yield start, b"".join(block).rstrip(b"\r\n")


def _read_blocks(path: str, max_lines: int, max_bytes: int) -> Iterator[_Block]:
    """The file as blocks of whole lines, about `max_bytes` each (a longer line is one block of its
    own) and at most `max_lines` lines; line 1's byte-order mark dropped."""
    first, pending = 1, []   # pieces of a line whose newline is not read yet
    with open(path, "rb") as f:
        chunk = f.read(max(max_bytes, len(_BOM)))
        if chunk.startswith(_BOM):
            chunk = chunk[3:] or f.read(max_bytes)
        while chunk or pending:
            if chunk:
                cut = chunk.rfind(b"\n") + 1
                if not cut:
                    pending.append(chunk)
                    chunk = f.read(max_bytes)
                    continue
                data = b"".join(pending + [chunk[:cut]]) if pending else chunk[:cut]
                pending = [chunk[cut:]] if cut < len(chunk) else []
            else:  # the end of the file: its last line has no newline
                data, pending = b"".join(pending), []
            n = data.count(b"\n")
            if n <= max_lines:
                yield _Block(first, data)
            else:
                lines = data.split(b"\n")  # n + 1 parts: the last follows the last newline
                for k in range(0, n + 1, max_lines):
                    part = b"\n".join(lines[k:k + max_lines]) + (b"\n" if k + max_lines <= n else b"")
                    if part:
                        yield _Block(first + k, part)
            first += n
            chunk = f.read(max_bytes) if chunk else b""


def _batches(records: Iterator[tuple[int, bytes]], max_docs: int, max_bytes: int
             ) -> Iterator[tuple[list[tuple[int, bytes]], int]]:
    batch: list[tuple[int, bytes]] = []
    nbytes = 0
    for rec in records:
        batch.append(rec)
        nbytes += len(rec[1]) + 1
        if len(batch) >= max_docs or nbytes >= max_bytes:
            yield batch, nbytes
            batch, nbytes = [], 0
    if batch:
        yield batch, nbytes


def _bounded_imap(pool, func: Callable, items, ahead: int) -> Iterator:
    """Like pool.imap (order preserved) but never more than `ahead` items in flight (memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(func, (item,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _check_options(o: PrepareOptions) -> str:
    """Validate options and the input file; returns the input kind ("jsonl" | "txt")."""
    if not os.path.exists(o.input):
        raise UserError(f"input file {o.input} not found; check the path")
    if not os.path.isfile(o.input):
        raise UserError(f"input {o.input} is not a file; pass a .jsonl or .txt file")
    kind = o.input_format
    if kind is None:
        ext = os.path.splitext(o.input)[1].lower()
        if ext == ".json":
            raise UserError(f"{o.input} is .json; make_data reads JSON lines (one object per "
                            "line): convert it, e.g. jq -c '.[]' in.json > in.jsonl, or pass "
                            "--input_format jsonl if it already is")
        kind = {".jsonl": "jsonl", ".txt": "txt", ".text": "txt", ".md": "txt"}.get(ext)
        if kind is None:
            raise UserError(f"cannot tell the type of {o.input} from its extension; "
                            "pass --input_format jsonl or --input_format txt")
    if kind not in ("jsonl", "txt"):
        raise UserError(f"--input_format must be jsonl or txt, got {kind!r}")
    if o.format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {o.format!r}")
    if o.txt_mode not in TXT_MODES:
        raise UserError(f"--txt_mode must be one of {', '.join(TXT_MODES)}, got {o.txt_mode!r}")
    check_templates(o.prompt_template, o.response_template)
    if o.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {o.epochs}")
    if o.workers is not None and o.workers < 1:
        raise UserError(f"--workers must be at least 1, got {o.workers}")
    if o.ctx_len is not None and o.ctx_len < 1:
        raise UserError(f"--ctx_len must be positive, got {o.ctx_len}")
    prefix = split_prefix(o.output)
    if not os.path.basename(prefix) or os.path.isdir(prefix):
        raise UserError(f"--output {o.output} is a folder; give a file prefix such as "
                        f"{os.path.join(o.output, 'mydata')}")
    for ext in (".bin", ".idx", ".mask.bin", ".mask.idx"):
        out = prefix + ext
        if os.path.abspath(out) == os.path.abspath(o.input) or \
                (os.path.exists(out) and os.path.samefile(out, o.input)):
            raise UserError(f"--output {o.output} would write {out}, which is the input file; "
                            "choose another --output prefix")
    check_writable_dir(prefix + ".bin", "--output")
    return kind


def _progress(o: PrepareOptions):
    if not o.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=os.path.getsize(o.input), unit="B", unit_scale=True, file=sys.stderr,
                desc=os.path.basename(o.input), mininterval=0.5)


def prepare(o: PrepareOptions) -> PrepareResult:
    """Tokenise `o.input` into `o.output`.bin/.idx (+ .mask.bin/.idx); see the module docstring."""
    kind = _check_options(o)
    prefix = split_prefix(o.output)
    tok = load_tokenizer(o.tokenizer, native=o.native_tokenizer)
    dtype = token_dtype(tok.vocab_size)
    encoder = _Encoder(tok, o, kind, dtype)
    reshuffle = o.epochs > 1 or o.shuffle
    # Pass 1 writes the final pair directly, or a hidden stage pair that the epoch pass re-orders.
    stage = atomic_path(prefix) + ".stage" if reshuffle else prefix
    writers: list[BinIdxWriter] = []
    staged: list[str] = []
    pool = bar = None
    try:
        tokens_w = BinIdxWriter(stage, dtype)
        writers.append(tokens_w)
        masks_w: BinIdxWriter | None = None
        skipped, first_bad = 0, None
        if kind == "jsonl" or o.txt_mode == "lines":
            batches: Iterator = _read_blocks(o.input, o.batch_docs, o.batch_bytes)
        else:
            batches = _batches(_read_records(o.input, kind, o.txt_mode), o.batch_docs, o.batch_bytes)
        workers = o.workers or os.cpu_count() or 1
        if workers > 1:
            # fork: workers inherit the tokenizer tables instead of rebuilding them.
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else None)
            gc.freeze()  # keep the collector from touching (copying) the inherited tables
            try:
                pool = ctx.Pool(workers, initializer=_init_worker, initargs=(encoder,))
            finally:
                gc.unfreeze()
            results = _bounded_imap(pool, _work, batches, ahead=2 * workers + 2)
        else:
            results = map(encoder.encode_batch, batches)
        bar, t0 = _progress(o), time.time()
        for res in results:
            for line, msg in res.errors:
                where = f"{o.input} line {line}: {msg}"
                if not o.skip_bad:
                    raise UserError(f"{where}; fix the line or pass --skip_bad")
                skipped += 1
                first_bad = first_bad or where
            if res.masks is not None and masks_w is None:
                masks_w = BinIdxWriter(stage + ".mask", np.uint8)
                writers.append(masks_w)
                _fill_ones(masks_w, tokens_w)  # earlier plain-text documents: all trained
            tokens_w.add_many(res.tokens, res.sizes)
            if masks_w is not None:
                masks_w.add_many(res.masks if res.masks is not None
                                 else np.ones(res.tokens.size, np.uint8), res.sizes)
            if bar is not None:
                el = max(time.time() - t0, 1e-9)
                bar.set_postfix_str(f"{tokens_w.num_items} docs, {tokens_w.num_items / el:.0f} "
                                    f"docs/s, {tokens_w.num_tokens / el / 1e3:.1f}k tok/s",
                                    refresh=False)
                bar.update(res.nbytes)
        if bar is not None:
            bar.update(bar.total - bar.n)  # blank lines were not counted
            bar.close()
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        documents = tokens_w.num_items
        if documents == 0:
            extra = f" ({skipped} bad records skipped)" if skipped else ""
            raise UserError(f"{o.input} contains no documents{extra}; check the file and "
                            "--input_format / --txt_mode")
        for w in writers:
            w.finish()
        if reshuffle:
            for w in writers:
                w.commit()
                staged += [w.bin_path, w.idx_path]
            writers = _write_epochs(stage, prefix, dtype, masks_w is not None, o.epochs,
                                    o.shuffle or o.epochs > 1, o.seed, writers)
        total_tokens = writers[0].num_tokens
        prime = magic_prime(total_tokens, o.ctx_len) if o.ctx_len is not None else None
        for w in writers:
            w.finish()
        for w in writers:
            w.commit()
        outputs = [p for w in writers for p in (w.bin_path, w.idx_path)]
        if len(writers) == 1:  # no masks: drop stale ones from an earlier run of the same prefix
            for ext in (".mask.bin", ".mask.idx"):
                if os.path.exists(prefix + ext):
                    os.remove(prefix + ext)
        writers = []
    except BaseException:
        if bar is not None:
            bar.close()  # end the bar's line before the error message
        if pool is not None:
            pool.terminate()
        for w in writers:
            w.abort()
        raise
    finally:
        for path in staged:
            if os.path.exists(path):
                os.remove(path)
    result = PrepareResult(prefix, documents, total_tokens, o.epochs, dtype, tok.vocab_size,
                           masks_w is not None, skipped, first_bad, outputs=outputs)
    result.ctx_len, result.magic_prime = o.ctx_len, prime
    return result


def _fill_ones(masks_w: BinIdxWriter, tokens_w: BinIdxWriter, chunk: int = 1 << 16) -> None:
    """Give the documents already written to `tokens_w` all-ones masks."""
    sizes = tokens_w.sizes()
    for i in range(0, len(sizes), chunk):
        part = sizes[i:i + chunk]
        masks_w.add_many(np.ones(int(part.sum(dtype=np.int64)), np.uint8), part)


def _write_epochs(stage: str, prefix: str, dtype: np.dtype, with_masks: bool, epochs: int,
                  shuffle: bool, seed: int, cleanup: list[BinIdxWriter]) -> list[BinIdxWriter]:
    """Write `epochs` copies of the stage pair to `prefix`, each in a fresh seeded order."""
    src = [MMapIndexedDataset(stage)] + ([MMapIndexedDataset(stage + ".mask")] if with_masks else [])
    cleanup.clear()  # the stage writers are committed; the caller aborts these new ones on error
    cleanup.append(BinIdxWriter(prefix, dtype))
    if with_masks:
        cleanup.append(BinIdxWriter(prefix + ".mask", np.uint8))
    out = list(cleanup)
    rng = np.random.default_rng(seed)
    n = len(src[0])
    for _ in range(epochs):
        order = rng.permutation(n) if shuffle else np.arange(n)
        for i in range(0, n, 4096):
            part = order[i:i + 4096]
            for ds, w in zip(src, out):
                w.add_many(np.concatenate([ds.get(int(j)) for j in part]), ds.sizes[part])
    return out
