#!/usr/bin/env python3
"""Train a SentencePiece tokenizer and write token shards from a docs JSONL file.

Input is any ``{"text": ...}``-per-line JSONL file (``.jsonl``, ``.jsonl.xz`` or
``.jsonl.zst``); by default the embedded corpus ``data/corpus/docs_selected.jsonl.xz``.
The first ``--val-docs`` documents are the validation split, the rest is train. The
tokenizer is trained on the train documents only, with the official Parameter Golf
recipe; shards use the official format (256 x int32 header, then uint16 tokens, each
document written as ``[BOS] + tokens`` with no EOS).

Usage::

    python data/prepare_data.py                        # embedded corpus, sp1024
    python data/prepare_data.py --if-missing           # no-op when outputs are up to date
    python data/prepare_data.py --vocab-size 4096      # another vocabulary size
    python data/prepare_data.py --docs docs_selected.jsonl --name fineweb
        # -> data/tokenizers/fineweb_1024_bpe.model, data/datasets/fineweb10B_sp1024/
    python data/prepare_data.py --tokenizer data/tokenizers/fineweb_1024_bpe.model \\
        --docs docs_selected.jsonl --name fineweb      # reuse a tokenizer, only re-shard
    python data/prepare_data.py --caseops              # CaseOps: case operators + byte sidecars

Outputs (``--out-dir`` defaults to ``data/``)::

    OUT/tokenizers/{name}_{V}_bpe.model and .vocab
    OUT/datasets/{name}_sp{V}/fineweb_val_000000.bin, fineweb_train_000000.bin, ..., manifest.json

(``--name fineweb`` writes ``datasets/fineweb10B_sp{V}``, the directory ``train_gpt.py`` reads
by default.) Two runs with the same inputs give byte-identical shards and ``.model`` files.

``--caseops`` writes ``OUT/tokenizers/{name}_{V}_bpe_caseops.model`` and
``OUT/datasets/{name}_sp{V}_caseops/``: tokens of the case-encoded text (case_encode, a bijection)
and, next to each token shard, ``fineweb_{split}_bytes_NNNNNN.bin`` with each token's count of
ORIGINAL UTF-8 bytes (CASEOPS_BYTE_RULE); check_sidecar is the scorer's guard for them.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import itertools
import json
import lzma
import os
import re
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT / "data"
DEFAULT_DOCS = DEFAULT_DATA_DIR / "corpus" / "docs_selected.jsonl.xz"

DATAFILE_MAGIC = 20240520
DATAFILE_VERSION = 1
# CaseOps byte sidecars have the token shards' header with their own magic, so a loader that globs
# fineweb_val_*.bin fails on them instead of reading byte counts as tokens. The official CaseOps
# export (romeerp/parameter-golf-caseops-v1) reuses the token magic; check_sidecar accepts both.
SIDECAR_MAGIC = 20240521
SIDECAR_MAGICS = (SIDECAR_MAGIC, DATAFILE_MAGIC)
HEADER_INTS = 256
BOS_ID = 1
OFFICIAL_VAL_DOCS = 50_000  # NUM_VAL_DOCS of the official FineWeb export
OFFICIAL_SHARD_TOKENS = 10**8  # official shard size
EMBEDDED_SHARD_TOKENS = 2_000_000  # smaller shards for the ~9.5M-token embedded corpus
DEFAULT_VOCAB_SIZE = 1024
SP_TRAIN_THREADS = 2  # stored in the .model; fixed so the file is reproducible
ENCODE_BATCH_DOCS = 1024

# The official tokenizer recipe (build_sentencepiece_tokenizer of openai/parameter-golf).
SP_RECIPE = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": BOS_ID,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}
# CaseOps must reproduce the text exactly, so no normalisation (nmt_nfkc folds compatibility
# characters and turns newlines and whitespace runs into one space); the operators are single pieces;
# long documents are not dropped from training (the default max_sentence_length is 4192 bytes).
CASEOPS_SP_RECIPE = {
    **SP_RECIPE,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "max_sentence_length": 1 << 16,
    "user_defined_symbols": "\ue000,\ue001,\ue002,\ue003",
}
SHARD_RE = re.compile(r"^fineweb_(train|val)(_bytes)?_\d{6}\.bin$")
TOKEN_SHARD_RE = re.compile(r"^fineweb_(train|val)_\d{6}\.bin$")


class PrepareError(RuntimeError):
    """An input problem the user can fix; reported without a traceback."""


class SidecarError(PrepareError):
    """A CaseOps shard set whose byte sidecars are missing or do not match its tokens."""


# --------------------------------------------------------------------------- reading docs


def open_uncompressed(path: Path) -> io.BufferedIOBase:
    """Open a .jsonl, .jsonl.xz or .jsonl.zst file as a binary stream of JSONL bytes."""
    name = path.name
    if not path.is_file():
        raise PrepareError(f"docs file {path} does not exist")
    if name.endswith(".jsonl.xz"):
        return lzma.open(path, "rb")
    if name.endswith(".jsonl.zst"):
        try:
            import zstandard
        except ImportError as exc:
            raise PrepareError(f"{path} is zstd-compressed: pip install zstandard") from exc
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    if name.endswith(".jsonl"):
        return open(path, "rb")
    raise PrepareError(f"unsupported docs file {path}: expected .jsonl, .jsonl.xz or .jsonl.zst")


def iter_docs(path: Path, hasher=None) -> Iterator[str]:
    """Yield each document's text; feed the raw JSONL bytes to ``hasher`` when given."""
    with open_uncompressed(path) as f:
        for lineno, line in enumerate(f, 1):
            if hasher is not None:
                hasher.update(line)
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise PrepareError(
                    f'{path}:{lineno}: expected a JSON object with a "text" field ({exc})'
                ) from exc
            if not isinstance(text, str):
                raise PrepareError(f'{path}:{lineno}: "text" must be a string')
            yield text


def sidecar_path(docs: Path) -> Path:
    """docs_selected.jsonl[.xz|.zst] -> docs_selected.source_manifest.json"""
    stem = re.sub(r"\.jsonl(\.xz|\.zst)?$", "", docs.name)
    return docs.with_name(f"{stem}.source_manifest.json")


def load_sidecar(docs: Path) -> dict | None:
    path = sidecar_path(docs)
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise PrepareError(f"sidecar {path} is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise PrepareError(f"sidecar {path} must hold a JSON object")
    return payload


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def overlap_key(text: str) -> bytes:
    """Hash of a doc's normalised text (NFKC, whitespace runs collapsed, trimmed)."""
    normalised = " ".join(unicodedata.normalize("NFKC", text).split())
    return hashlib.sha256(normalised.encode("utf-8")).digest()


# --------------------------------------------------------------------------- CaseOps: lossless case transform
#
# case_encode lowercases text and marks the case with operator characters from Unicode's private use
# area, which the CaseOps tokenizer holds as user_defined_symbols (one token each):
#   TITLE   U+E000  the next character is a capital (a word's first letter: "Hello", "I")
#   ALLCAPS U+E001  every letter of the next word is a capital (words of 2 or more letters: "NASA")
#   CAPNEXT U+E002  the next character is a capital (later letters of mixed-case words: "iPhone")
#   ESC     U+E003  the next character is literal: ESC + U+E000..U+E003 is that character, and ESC +
#                   U+E004 is U+2581 "▁", which SentencePiece would decode as a space
# A word is a maximal run of characters matching [^\W\d_] (c.isalnum() and not c.isdecimal() and
# c != "_": letters, and numerals such as ² or Ⅻ). Only "simple" capitals are lowercased: c whose
# c.lower() is one letter whose .upper() is c again. All others stay literal (İ lowercases to two
# characters, ẞ and ß upper-case to "SS", the Kelvin sign lowercases to k, titlecase ǅ, final ς), and
# c.lower() is applied per character (str.lower would turn a word-final Σ into ς). Hence
# case_decode(case_encode(s)) == s for every string s.

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue000", "\ue001", "\ue002", "\ue003"
CASEOPS_OPERATORS = {"TITLE": TITLE, "ALLCAPS": ALLCAPS, "CAPNEXT": CAPNEXT, "ESC": ESC}
SP_SPACE, SP_SPACE_STANDIN = "\u2581", "\ue004"
_ESCAPE = {**{op: ESC + op for op in CASEOPS_OPERATORS.values()}, SP_SPACE: ESC + SP_SPACE_STANDIN}
_UNESCAPE = {**{op: op for op in CASEOPS_OPERATORS.values()}, SP_SPACE_STANDIN: SP_SPACE}
_ESCAPE_TABLE = str.maketrans(_ESCAPE)
_WORD_CHAR = re.compile(r"[^\W\d_]")
_WORD = re.compile(r"[^\W\d_]+")
_CASED_TAIL = re.compile(r"([^\W\d_a-z][^\W\d_]*)")  # a word from its first letter outside a-z to its end
_OPERATOR = re.compile("[\ue000-\ue003]")


class CaseOpsError(ValueError):
    """Text that case_decode cannot read: an operator without a valid argument."""


@functools.lru_cache(maxsize=None)
def simple_lower(c: str) -> str | None:
    """c.lower() if c is a capital that lowercases to one letter and back to c, else None."""
    low = c.lower()
    return low if low != c and len(low) == 1 and low.upper() == c and c.isalpha() and low.isalpha() else None


@functools.lru_cache(maxsize=None)
def simple_upper(c: str) -> str | None:
    """The capital whose simple_lower is c, else None."""
    up = c.upper()
    return up if len(up) == 1 and simple_lower(up) == c else None


@functools.lru_cache(maxsize=None)
def _is_word_char(c: str) -> bool:
    return _WORD_CHAR.match(c) is not None


@functools.lru_cache(maxsize=1 << 16)  # words repeat: "The", "I", "Mr"
def _encode_cased(part: str, whole: bool) -> str:
    """A word (``whole``) or the end of one after a-z letters, from its first letter outside a-z."""
    first = simple_lower(part[0])
    if whole and first and part[1:].islower():  # "Hello", the common case
        return TITLE + first + part[1:]
    lows = [simple_lower(c) for c in part]
    if whole and len(part) >= 2 and all(lows):
        return ALLCAPS + "".join(lows)
    return "".join(
        c if low is None else (TITLE if whole and i == 0 else CAPNEXT) + low
        for i, (c, low) in enumerate(zip(part, lows))
    )


def case_encode(text: str) -> str:
    """Text -> lowercased text with CaseOps operators (see above); case_decode inverts it exactly."""
    if any(c in text for c in _ESCAPE):
        text = text.translate(_ESCAPE_TABLE)
    parts = _CASED_TAIL.split(text)  # [other, cased, other, cased, ..., other]
    for i in range(1, len(parts), 2):
        before = parts[i - 1]
        parts[i] = _encode_cased(parts[i], not before or not _is_word_char(before[-1]))
    return "".join(parts)


def _upper_word(word: str) -> str | None:
    ups = [simple_upper(c) for c in word]
    return "".join(ups) if len(ups) >= 2 and None not in ups else None


def _operations(t: str) -> Iterator[tuple[int, int, str]]:
    """Each operator of t as (start, end, original): t[start] is the operator, t[start + 1:end] its
    argument and ``original`` the characters the argument stands for (one per argument character)."""
    end = 0
    for m in _OPERATOR.finditer(t):
        i, op = m.start(), m.group()
        if i < end:
            continue  # an operator character escaped by the ESC before it
        if op == ALLCAPS:
            word = _WORD.match(t, i + 1)
            arg = word.group() if word else ""
            original = _upper_word(arg)
        else:
            arg = t[i + 1 : i + 2]
            original = _UNESCAPE.get(arg) if op == ESC else simple_upper(arg)
        if original is None:
            name = next(k for k, v in CASEOPS_OPERATORS.items() if v == op)
            want = {
                "ESC": "U+E000..U+E004",
                "ALLCAPS": "a word of 2 or more lower-case letters with one-letter capitals",
            }
            raise CaseOpsError(
                f"{name} at {i} is followed by {arg!r}, not by "
                f"{want.get(name, 'a lower-case letter with a one-letter capital')}"
            )
        end = i + 1 + len(arg)
        yield i, end, original


def case_decode(t: str) -> str:
    """The inverse of case_encode; raises CaseOpsError on a misplaced operator."""
    out, pos = [], 0
    for start, end, original in _operations(t):
        out += (t[pos:start], original)
        pos = end
    out.append(t[pos:])
    return "".join(out)


def utf8_lengths(t: str) -> np.ndarray:
    """UTF-8 length of each character of t."""
    cp = np.frombuffer(t.encode("utf-32-le"), dtype="<u4")
    return 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)


def original_char_bytes(t: str) -> np.ndarray:
    """For each character of case-encoded text t, the UTF-8 bytes of the original character it stands
    for: 0 for an operator; a capitalised letter counts its capital, whose length rarely differs
    (ⱥ 3 bytes -> Ⱥ 2); an escaped U+E000..U+E004 stands for a 3-byte character like itself."""
    counts = utf8_lengths(t)
    operators = []
    for start, end, original in _operations(t):
        operators.append(start)
        if not original.isascii():
            counts[start + 1 : end] = [len(c.encode("utf-8")) for c in original]
    counts[operators] = 0
    return counts


# --------------------------------------------------------------------------- pass 1: scan (+ train)


@dataclass
class Scan:
    """What one pass over the docs learns: hash, counts, and train docs dropped for overlap."""

    val_docs: int
    sha256: str = ""
    num_docs: int = 0
    dropped: set[int] = field(default_factory=set)  # indices of train docs equal to a val doc
    bytes_val: int = 0
    bytes_train: int = 0
    tokenizer_train_docs: int = 0


def scan_docs(docs: Path, scan: Scan, train_cap: int | None, caseops: bool = False) -> Iterator[str]:
    """Walk every doc once. Yields the (cleaned, with ``caseops`` case-encoded) train texts the
    tokenizer trains on, at most ``train_cap`` of them, but always scans the whole file before finishing."""
    hasher = hashlib.sha256()
    val_keys: set[bytes] = set()
    for i, text in enumerate(iter_docs(docs, hasher)):
        scan.num_docs += 1
        size = len(text.encode("utf-8"))
        if i < scan.val_docs:
            val_keys.add(overlap_key(text))
            scan.bytes_val += size
            continue
        if overlap_key(text) in val_keys:
            scan.dropped.add(i)
            continue
        scan.bytes_train += size
        if train_cap is None or scan.tokenizer_train_docs < train_cap:
            clean = (
                (case_encode(text) if caseops else text).replace("\x00", " ").strip()
            )  # as the official recipe
            if clean:
                scan.tokenizer_train_docs += 1
                yield clean
    scan.sha256 = hasher.hexdigest()


def train_tokenizer(sentences: Iterator[str], vocab_size: int, recipe: dict = SP_RECIPE) -> bytes:
    """Train a BPE model with the official (or the CaseOps) recipe; returns the serialized .model bytes."""
    import sentencepiece as spm

    writer = io.BytesIO()
    # model_writer (instead of model_prefix) keeps output paths out of the stored trainer_spec.
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=writer,
        vocab_size=vocab_size,
        num_threads=SP_TRAIN_THREADS,
        minloglevel=2,
        **recipe,
    )
    return writer.getvalue()


def vocab_text(sp) -> str:
    """The .vocab companion file: one "piece<TAB>score" line per id, like SentencePiece's."""
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))


# --------------------------------------------------------------------------- pass 2: encode + shards


def write_shard(path: Path, tokens: np.ndarray, magic: int = DATAFILE_MAGIC) -> None:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = magic, DATAFILE_VERSION, len(tokens)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)


def sidecar_name(token_shard: str) -> str:
    """fineweb_val_000000.bin -> fineweb_val_bytes_000000.bin (the official CaseOps names)."""
    return re.sub(r"_(\d{6})\.bin$", r"_bytes_\1.bin", token_shard)


class ShardWriter:
    """Concatenates documents and cuts them into shards of exactly ``shard_tokens`` tokens; with
    ``sidecars``, cuts the per-token byte counts into parallel fineweb_{split}_bytes_* files."""

    def __init__(self, out_dir: Path, shard_tokens: int, sidecars: bool = False):
        self.out_dir = out_dir
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.nbuf = np.empty(shard_tokens, dtype=np.uint16) if sidecars else None
        self.fill = 0
        self.split = "val"
        self.shards: dict[str, list[dict]] = {"val": [], "train": []}
        self.sidecars: dict[str, list[dict]] = {"val": [], "train": []}
        self.tokens = {"val": 0, "train": 0}
        self.docs = {"val": 0, "train": 0}
        self.bos = {"val": 0, "train": 0}

    def add(self, split: str, tokens: np.ndarray, num_docs: int, nbytes: np.ndarray | None = None) -> None:
        if split != self.split:
            self.flush()
            self.split = split
        self.tokens[split] += len(tokens)
        self.docs[split] += num_docs
        self.bos[split] += int(np.count_nonzero(tokens == BOS_ID))
        pos = 0
        while pos < len(tokens):
            take = min(len(self.buf) - self.fill, len(tokens) - pos)
            self.buf[self.fill : self.fill + take] = tokens[pos : pos + take]
            if self.nbuf is not None:
                self.nbuf[self.fill : self.fill + take] = nbytes[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == len(self.buf):
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = f"fineweb_{self.split}_{len(self.shards[self.split]):06d}.bin"
        write_shard(self.out_dir / name, self.buf[: self.fill])
        self.shards[self.split].append({"name": name, "tokens": int(self.fill)})
        if self.nbuf is not None:
            side = self.out_dir / sidecar_name(name)
            write_shard(side, self.nbuf[: self.fill], SIDECAR_MAGIC)
            self.sidecars[self.split].append(
                {
                    "name": side.name,
                    "tokens": int(self.fill),
                    "sha256": sha256_file(side),
                    "bytes": int(self.nbuf[: self.fill].sum(dtype=np.int64)),
                }
            )
        self.fill = 0


def piece_emit_lengths(sp) -> np.ndarray:
    """UTF-8 bytes each token id adds to the decoded text: a byte piece one, BOS/EOS/PAD (and UNK, which
    byte fallback never produces) none, any other piece its text with each "▁" read as a space."""
    n = sp.vocab_size()
    return np.array(
        [
            0
            if sp.is_control(i) or sp.is_unknown(i)
            else 1
            if sp.is_byte(i)
            else len(sp.id_to_piece(i).replace(SP_SPACE, " ").encode("utf-8"))
            for i in range(n)
        ],
        dtype=np.int64,
    )


def token_original_bytes(ids: np.ndarray, transformed: str, emit: np.ndarray) -> np.ndarray:
    """The byte sidecar of one case-encoded document (``ids`` without its BOS): each token counts the
    original UTF-8 bytes (original_char_bytes) of the transformed characters whose last byte it emits."""
    token_end = np.cumsum(emit[ids])
    char_end = np.cumsum(utf8_lengths(transformed))
    emitted, expected = (
        (int(token_end[-1]) if len(ids) else 0),
        (int(char_end[-1]) if len(transformed) else 0),
    )
    if emitted != expected:
        raise PrepareError(
            f"the tokens of a document decode to {emitted} bytes, its case-encoded text has "
            f"{expected}: the tokenizer does not reproduce text exactly (use a --caseops tokenizer)"
        )
    owner = np.searchsorted(token_end, char_end, side="left")
    return np.bincount(owner, weights=original_char_bytes(transformed), minlength=len(ids)).astype(np.int64)


def encode_batch(
    sp, texts: list[str], threads: int, vocab_size: int, emit: np.ndarray | None = None, oracle: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Tokens ``[BOS] + ids`` of each doc, concatenated. With CaseOps (``emit``, from piece_emit_lengths)
    the texts are case-encoded first and the byte sidecar comes too (0 at each BOS), checked to sum to
    each doc's UTF-8 length; ``oracle`` also checks that decoding the ids gives back each text exactly."""
    docs = [case_encode(t) for t in texts] if emit is not None else texts
    ids = sp.encode(docs, out_type=int, num_threads=threads)
    total = sum(len(x) for x in ids) + len(ids)
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.chain((BOS_ID,), x) for x in ids), dtype=np.int64, count=total
    )
    if flat.size and (flat.max() >= vocab_size or flat.min() < 0):
        raise PrepareError(f"token id {int(flat.max())} outside the tokenizer's vocab of {vocab_size}")
    if emit is None:
        return flat.astype(np.uint16), None
    nbytes, pos = np.zeros(total, dtype=np.int64), 0
    for text, doc, x in zip(texts, docs, ids):
        counts = token_original_bytes(flat[pos + 1 : pos + 1 + len(x)], doc, emit)
        if counts.sum() != len(text.encode("utf-8")):
            raise PrepareError(
                f"byte sidecar sums to {int(counts.sum())} for a document of "
                f"{len(text.encode('utf-8'))} bytes: {text[:60]!r}"
            )
        if oracle and case_decode(sp.decode(x)) != text:
            raise PrepareError(f"decoding the tokens does not give back the document {text[:60]!r}")
        nbytes[pos + 1 : pos + 1 + len(x)] = counts
        pos += 1 + len(x)
    if nbytes.max(initial=0) > 0xFFFF:
        raise PrepareError("a token accounts for more than 65,535 bytes; the sidecar stores uint16")
    return flat.astype(np.uint16), nbytes.astype(np.uint16)


def encode_docs(docs: Path, sp, scan: Scan, writer: ShardWriter, threads: int, caseops: bool = False) -> None:
    vocab_size = sp.vocab_size()
    emit = piece_emit_lengths(sp) if caseops else None
    batch: list[str] = []
    batch_split = "val"

    def emit_batch():
        if batch:
            # Val docs get the full oracle: their bytes must be reproducible by decoding the token ids.
            tokens, nbytes = encode_batch(sp, batch, threads, vocab_size, emit, oracle=batch_split == "val")
            writer.add(batch_split, tokens, len(batch), nbytes)
            batch.clear()

    for i, text in enumerate(iter_docs(docs)):
        if i in scan.dropped:
            continue
        split = "val" if i < scan.val_docs else "train"
        if split != batch_split or len(batch) >= ENCODE_BATCH_DOCS:
            emit_batch()
            batch_split = split
        batch.append(text)
    emit_batch()
    writer.flush()


# --------------------------------------------------------------------------- checking a CaseOps shard set


def read_datafile(path: Path, magics: tuple[int, ...] = (DATAFILE_MAGIC,)) -> np.ndarray:
    """The uint16 payload of a token shard or byte sidecar, after checking its header and size."""
    size = path.stat().st_size
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if size < HEADER_INTS * 4 or header[0] not in magics or header[1] != DATAFILE_VERSION:
        raise SidecarError(
            f"{path}: not a shard with magic {' or '.join(map(str, magics))}, version {DATAFILE_VERSION}"
        )
    if size != HEADER_INTS * 4 + 2 * int(header[2]):
        raise SidecarError(
            f"{path}: header says {int(header[2])} entries but the file has {size} bytes (truncated?)"
        )
    return np.fromfile(path, dtype="<u2", offset=HEADER_INTS * 4)


def check_shard(data_dir: Path, name: str, recorded: dict | None, manifest_path: Path, first: bool) -> tuple:
    """One token shard's byte sidecar against check_sidecar's rules (recorded: the manifest's sidecars of the
    split, None without a manifest; first: no token of the split before it). Returns (tokens, bytes, docs)."""
    side = data_dir / sidecar_name(name)
    if not side.is_file():
        raise SidecarError(
            f"{side} is missing: CaseOps bits per byte need the byte sidecar of every "
            f"token shard ({name}); rebuild with `python data/prepare_data.py --caseops`"
        )
    tokens, nbytes = read_datafile(data_dir / name), read_datafile(side, SIDECAR_MAGICS)
    if len(nbytes) != len(tokens):
        raise SidecarError(f"{side} has {len(nbytes):,} byte counts but {name} has {len(tokens):,} tokens")
    if first and len(tokens) and tokens[0] != BOS_ID:
        raise SidecarError(
            f"{data_dir / name} does not start with BOS (id {BOS_ID}): documents cannot be found"
        )
    bos = tokens == BOS_ID
    if nbytes[bos].any():
        raise SidecarError(
            f"{side} gives bytes to the BOS at position {int(np.flatnonzero(bos & (nbytes > 0))[0])}"
        )
    if recorded is not None and recorded.get(side.name, {}).get("sha256") != sha256_file(side):
        raise SidecarError(
            f"{side} differs from the sidecar recorded in {manifest_path} (sha256)"
            if side.name in recorded
            else f"{side} is not listed in {manifest_path}"
        )
    return len(tokens), int(nbytes.sum(dtype=np.int64)), int(bos.sum())


def check_sidecar(data_dir: Path, splits: tuple[str, ...] = ("val",)) -> dict:
    """Refuse a CaseOps shard set whose byte sidecars are missing or do not match its tokens.

    Each token shard fineweb_{split}_NNNNNN.bin needs fineweb_{split}_bytes_NNNNNN.bin with as many
    entries, 0 at every BOS, and the sha256 recorded in manifest.json; the split must start with BOS;
    with a manifest, the sidecars must sum to the split's original UTF-8 bytes and the BOS count must
    equal its doc count. Returns {split: {"tokens", "bytes", "docs"}}. The scorer applies these rules."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    if manifest and not manifest.get("caseops"):
        raise SidecarError(
            f"{manifest_path} does not describe a CaseOps dataset; build one with "
            "`python data/prepare_data.py --caseops`"
        )
    summary = {}
    for split in splits:
        names = sorted(p.name for p in data_dir.glob(f"fineweb_{split}_*.bin"))
        shards = [n for n in names if TOKEN_SHARD_RE.match(n)]
        if not shards:
            raise SidecarError(f"no {split} token shards (fineweb_{split}_NNNNNN.bin) in {data_dir}")
        orphans = sorted(set(names) - set(shards) - {sidecar_name(n) for n in shards})
        if orphans:
            raise SidecarError(
                f"{data_dir / orphans[0]} matches no token shard; remove it or rebuild the dataset"
            )
        recorded = {
            s["name"]: s for s in (manifest.get("caseops") or {}).get("byte_sidecars", {}).get(split, [])
        }
        tokens_total = bytes_total = docs = 0
        for name in shards:
            n_tokens, n_bytes, n_docs = check_shard(
                data_dir, name, recorded if manifest else None, manifest_path, tokens_total == 0
            )
            tokens_total += n_tokens
            bytes_total += n_bytes
            docs += n_docs
        want_bytes, want_docs = manifest.get("text_bytes", {}).get(split), manifest.get(f"{split}_docs")
        if want_bytes is not None and bytes_total != want_bytes:
            raise SidecarError(
                f"the {split} sidecars sum to {bytes_total:,} bytes but the original {split} text "
                f"has {want_bytes:,} ({manifest_path})"
            )
        if want_docs is not None and docs != want_docs:
            raise SidecarError(
                f"the {split} shards hold {docs:,} BOS tokens but {manifest_path} lists {want_docs:,} docs"
            )
        summary[split] = {"tokens": tokens_total, "bytes": bytes_total, "docs": docs}
    return summary


def doc_hashes(files: list[Path]) -> set[bytes]:
    """sha256 of each document's token sequence (BOS to the next BOS) across consecutive shards."""
    hashes, carry = set(), np.empty(0, dtype=np.uint16)
    for f in files:
        tokens = np.concatenate([carry, read_datafile(f)])
        starts = np.flatnonzero(tokens == BOS_ID)
        if len(tokens) and (not len(starts) or starts[0] != 0):
            raise SidecarError(f"{f}: the token stream does not start with BOS (id {BOS_ID})")
        docs = np.split(tokens, starts[1:]) if len(starts) else []
        hashes.update(hashlib.sha256(d.tobytes()).digest() for d in docs[:-1])
        carry = docs[-1] if docs else carry
    if len(carry):
        hashes.add(hashlib.sha256(carry.tobytes()).digest())
    return hashes


def check_disjoint(data_dir: Path) -> int:
    """Raise if any train document's tokens equal a val document's; returns the number of distinct val docs."""
    data_dir = Path(data_dir)
    split_files = {
        s: sorted(p for p in data_dir.glob(f"fineweb_{s}_*.bin") if TOKEN_SHARD_RE.match(p.name))
        for s in ("val", "train")
    }
    val = doc_hashes(split_files["val"])
    shared = val & doc_hashes(split_files["train"])
    if shared:
        raise SidecarError(f"{len(shared)} val documents of {data_dir} also occur in its train shards")
    return len(val)


# --------------------------------------------------------------------------- paths and manifest


def display_path(path: Path) -> str:
    """Repo-relative POSIX path when inside the checkout, else absolute."""
    path = path.resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def dataset_dir_name(name: str, vocab_size: int, caseops: bool = False) -> str:
    # "fineweb" keeps the official directory name that train_gpt.py defaults to.
    base = f"fineweb10B_sp{vocab_size}" if name == "fineweb" else f"{name}_sp{vocab_size}"
    return base + ("_caseops" if caseops else "")


def check_caseops_tokenizer(sp, path: Path) -> None:
    """A tokenizer reused with --caseops must hold each operator as one piece and reproduce text exactly."""
    for name, op in CASEOPS_OPERATORS.items():
        ids = sp.encode(op)
        if len(ids) != 1 or sp.is_unknown(ids[0]) or sp.is_byte(ids[0]):
            raise PrepareError(
                f"{path} is not a CaseOps tokenizer: {name} (U+{ord(op):04X}) is not one piece; "
                "drop --tokenizer to train one with --caseops"
            )
    probe = case_encode("  Two\tspaces,\n\nnew LINES \u00bd\ufb01 ")
    if sp.decode(sp.encode(probe)) != probe:
        raise PrepareError(
            f"{path} does not reproduce text exactly (it normalises whitespace or characters), "
            "so CaseOps bytes would not be the original text's; train one with --caseops"
        )


@dataclass
class Plan:
    docs: Path
    val_docs: int
    vocab_size: int
    shard_tokens: int
    tokenizer_in: Path | None  # reuse this model instead of training
    tokenizer_model: Path  # the model the shards are encoded with
    dataset_dir: Path
    threads: int
    tokenizer_train_docs: int | None
    sidecar: dict | None
    caseops: bool = False


def resolve_plan(args: argparse.Namespace) -> Plan:
    docs = args.docs.resolve()
    sidecar = load_sidecar(docs)
    if args.val_docs is not None:
        val_docs = args.val_docs
    elif sidecar and "docs_val" in sidecar:
        val_docs = int(sidecar["docs_val"])
    else:
        val_docs = OFFICIAL_VAL_DOCS
    if val_docs < 1:
        raise PrepareError(f"--val-docs must be at least 1, got {val_docs}")
    if args.shard_tokens is not None:
        shard_tokens = args.shard_tokens
    else:
        shard_tokens = EMBEDDED_SHARD_TOKENS if docs == DEFAULT_DOCS.resolve() else OFFICIAL_SHARD_TOKENS
    if shard_tokens < 1:
        raise PrepareError(f"--shard-tokens must be positive, got {shard_tokens}")

    tokenizer_in = args.tokenizer.resolve() if args.tokenizer else None
    vocab_size = args.vocab_size
    if tokenizer_in is not None:
        if not tokenizer_in.is_file():
            raise PrepareError(f"--tokenizer {tokenizer_in} does not exist")
        import sentencepiece as spm

        model_vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_in)).vocab_size()
        if vocab_size is not None and vocab_size != model_vocab:
            raise PrepareError(
                f"--tokenizer {tokenizer_in} has {model_vocab} pieces but --vocab-size is {vocab_size}"
            )
        vocab_size = model_vocab
    vocab_size = vocab_size or DEFAULT_VOCAB_SIZE
    fixed = 260 + 4 * args.caseops  # specials and byte pieces (and the CaseOps operators)
    if not fixed < vocab_size <= 65536:
        raise PrepareError(
            f"--vocab-size must be in {fixed + 1}..65536 ({fixed} fixed pieces + merges; "
            f"shards store uint16), got {vocab_size}"
        )

    out_dir = args.out_dir.resolve()
    suffix = "_caseops" if args.caseops else ""
    model = tokenizer_in or out_dir / "tokenizers" / f"{args.name}_{vocab_size}_bpe{suffix}.model"
    return Plan(
        docs=docs,
        val_docs=val_docs,
        vocab_size=vocab_size,
        shard_tokens=shard_tokens,
        tokenizer_in=tokenizer_in,
        tokenizer_model=model,
        dataset_dir=out_dir / "datasets" / dataset_dir_name(args.name, vocab_size, args.caseops),
        threads=args.threads,
        tokenizer_train_docs=args.tokenizer_train_docs,
        sidecar=sidecar,
        caseops=args.caseops,
    )


CASEOPS_BYTE_RULE = (
    "Per token, the UTF-8 bytes of the original text it accounts for. Token k emits bytes: a byte piece "
    "its byte, BOS nothing, any other piece its text with each U+2581 read as a space; a document's "
    "tokens emit exactly the UTF-8 of its case-encoded text. Each case-encoded character stands for one "
    "original character (the capital for a letter after TITLE/CAPNEXT or inside an ALLCAPS word, U+2581 "
    "for U+E004 after ESC, else itself) or none (an operator, unless an ESC makes it a literal); its "
    "original UTF-8 length is counted by the token that emits its last byte. So BOS and operator tokens "
    "count 0 (an escaped operator character counts its 3 bytes), and per document the counts sum to "
    "len(original_text.encode('utf-8'))."
)


def caseops_manifest(sp, writer: ShardWriter) -> dict:
    return {
        "transform": "case_encode / case_decode in data/prepare_data.py (data/README.md, CaseOps)",
        "operators": {name: f"U+{ord(op):04X}" for name, op in CASEOPS_OPERATORS.items()},
        "operator_ids": {name: sp.piece_to_id(op) for name, op in CASEOPS_OPERATORS.items()},
        "escaped_standin": {"U+E004": "U+2581"},
        "sidecar_format": {
            "name": "fineweb_{split}_bytes_{index:06d}.bin, one per token shard, same cuts",
            "magic": SIDECAR_MAGIC,
            "version": DATAFILE_VERSION,
            "header_bytes": HEADER_INTS * 4,
            "dtype": "<u2",
            "entries": "one per token of fineweb_{split}_{index:06d}.bin",
        },
        "byte_rule": CASEOPS_BYTE_RULE,
        "byte_sidecars": {s: writer.sidecars[s] for s in ("val", "train")},
    }


def build_manifest(plan: Plan, scan: Scan, writer: ShardWriter, docs_file_sha: str, sp=None) -> dict:
    tok_tokens = {s: writer.tokens[s] - writer.docs[s] for s in ("val", "train")}  # BOS excluded
    byte_counts = {"val": scan.bytes_val, "train": scan.bytes_train}
    sidecar = sidecar_path(plan.docs)
    recipe = CASEOPS_SP_RECIPE if plan.caseops else SP_RECIPE
    return {
        "format": {
            "magic": DATAFILE_MAGIC,
            "version": DATAFILE_VERSION,
            "header_bytes": HEADER_INTS * 4,
            "token_dtype": "<u2",
            "doc_prefix": "BOS (id 1)",
            "append_eos": False,
        },
        "docs": {
            "path": display_path(plan.docs),
            "sha256": scan.sha256,
            "file_sha256": docs_file_sha,
            "sidecar": display_path(sidecar) if plan.sidecar is not None else None,
        },
        "tokenizer": {
            "path": display_path(plan.tokenizer_model),
            "vocab_path": display_path(plan.tokenizer_model.with_suffix(".vocab")),
            "sha256": sha256_file(plan.tokenizer_model),
            "trained_here": plan.tokenizer_in is None,
            "train_docs": scan.tokenizer_train_docs if plan.tokenizer_in is None else None,
            "recipe": {**recipe, "num_threads": SP_TRAIN_THREADS} if plan.tokenizer_in is None else None,
        },
        "vocab_size": plan.vocab_size,
        "num_docs": scan.num_docs,
        "val_docs": writer.docs["val"],
        "train_docs": writer.docs["train"],
        "train_val_overlap_docs_removed": len(scan.dropped),
        "train_val_overlap_normalization": "sha256 of NFKC text with whitespace runs collapsed",
        "train_val_disjoint": True,
        "shard_tokens": plan.shard_tokens,
        "tokens": dict(writer.tokens),
        "text_bytes": byte_counts,
        "bytes_per_token": {s: round(byte_counts[s] / max(tok_tokens[s], 1), 4) for s in ("val", "train")},
        "bytes_per_token_note": "UTF-8 bytes of the raw document text per token, BOS tokens not counted",
        "bos_count": dict(writer.bos),
        "shards": {s: writer.shards[s] for s in ("val", "train")},
        "caseops": caseops_manifest(sp, writer) if plan.caseops else None,
    }


def manifest_is_current(plan: Plan) -> tuple[bool, str]:
    """Whether ``--if-missing`` may skip the build, and why not."""
    path = plan.dataset_dir / "manifest.json"
    if not path.is_file():
        return False, f"{path} does not exist"
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return False, f"{path} is not valid JSON"
    expected = {
        "docs file sha256": (m.get("docs", {}).get("file_sha256"), sha256_file(plan.docs)),
        "vocab_size": (m.get("vocab_size"), plan.vocab_size),
        "val docs": (m.get("val_docs"), plan.val_docs),
        "caseops": (bool(m.get("caseops")), plan.caseops),
        "shard_tokens": (m.get("shard_tokens"), plan.shard_tokens),
    }
    for what, (have, want) in expected.items():
        if have != want:
            return False, f"{what} changed ({have} -> {want})"
    if not plan.tokenizer_model.is_file():
        return False, f"{plan.tokenizer_model} is missing"
    if m.get("tokenizer", {}).get("sha256") != sha256_file(plan.tokenizer_model):
        return False, f"{plan.tokenizer_model} differs from the one the shards were made with"
    sidecars = (m.get("caseops") or {}).get("byte_sidecars", {})
    for split in ("val", "train"):
        for shard in m.get("shards", {}).get(split, []) + sidecars.get(split, []):
            f = plan.dataset_dir / shard["name"]
            if not f.is_file() or f.stat().st_size != HEADER_INTS * 4 + 2 * shard["tokens"]:
                return False, f"{f} is missing or has the wrong size"
    return True, "up to date"


# --------------------------------------------------------------------------- main


def tokenizer_for(plan: Plan, scan: Scan, sentences) -> tuple:
    """The SentencePiece model: trained on the scan's train docs (written to plan.tokenizer_model), or the given one
    (the scan still runs to its end: it hashes the docs and splits val from train). Returns it and what was done."""
    import sentencepiece as spm

    if plan.tokenizer_in is None:
        model_bytes = train_tokenizer(
            sentences, plan.vocab_size, CASEOPS_SP_RECIPE if plan.caseops else SP_RECIPE
        )
        for _ in sentences:  # finish the scan should the trainer stop reading early
            pass
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        if sp.vocab_size() != plan.vocab_size:
            raise PrepareError(
                f"the tokenizer trained on {scan.tokenizer_train_docs:,} train docs has only "
                f"{sp.vocab_size()} pieces, not the requested {plan.vocab_size}: the corpus is too "
                "small for this vocabulary (hard_vocab_limit=False). Use a smaller --vocab-size or more docs."
            )
        plan.tokenizer_model.parent.mkdir(parents=True, exist_ok=True)
        plan.tokenizer_model.write_bytes(model_bytes)
        plan.tokenizer_model.with_suffix(".vocab").write_text(vocab_text(sp), encoding="utf-8")
        what = f"trained tokenizer on {scan.tokenizer_train_docs:,} docs"
    else:
        for _ in sentences:  # scan only
            pass
        sp = spm.SentencePieceProcessor(model_file=str(plan.tokenizer_model))
        what = "scanned docs"
    return sp, what


def check_written(plan: Plan, scan: Scan, writer: ShardWriter) -> None:
    """What was written matches what was scanned: a BOS per doc, and (CaseOps) sidecars summing to the text's bytes."""
    for split, text_bytes in (("val", scan.bytes_val), ("train", scan.bytes_train)):
        if writer.bos[split] != writer.docs[split]:  # each doc is [BOS] + ids, and no id is BOS
            raise PrepareError(
                f"{writer.bos[split]:,} BOS tokens in the {split} shards for {writer.docs[split]:,} docs"
            )
        if plan.caseops and sum(s["bytes"] for s in writer.sidecars[split]) != text_bytes:
            raise PrepareError(
                f"the {split} byte sidecars do not sum to the {text_bytes:,} bytes of the {split} text"
            )


def prepare(plan: Plan) -> dict:
    t0 = time.perf_counter()
    if plan.sidecar and plan.docs.name.endswith(".xz") and plan.sidecar.get("xz_sha256"):
        if sha256_file(plan.docs) != plan.sidecar["xz_sha256"]:
            raise PrepareError(
                f"{plan.docs} does not match xz_sha256 in {sidecar_path(plan.docs)}; "
                "rebuild the corpus (data/build_corpus.py) or restore the file"
            )
    plan.dataset_dir.mkdir(parents=True, exist_ok=True)
    (plan.dataset_dir / "manifest.json").unlink(missing_ok=True)  # written again only on success

    scan = Scan(val_docs=plan.val_docs)
    sentences = scan_docs(plan.docs, scan, plan.tokenizer_train_docs, plan.caseops)
    sp, what = tokenizer_for(plan, scan, sentences)
    if plan.caseops:
        check_caseops_tokenizer(sp, plan.tokenizer_model)
    t1 = time.perf_counter()
    print(f"{what} ({scan.num_docs:,} docs, sha256 {scan.sha256[:12]}...) in {t1 - t0:.1f}s")

    if plan.val_docs >= scan.num_docs:
        raise PrepareError(
            f"--val-docs {plan.val_docs} leaves no train docs: {plan.docs} has {scan.num_docs}"
        )
    if plan.sidecar and plan.sidecar.get("docs_sha256") not in (None, scan.sha256):
        raise PrepareError(
            f"{plan.docs} (sha256 {scan.sha256}) does not match docs_sha256 in "
            f"{sidecar_path(plan.docs)}; the docs and their sidecar are out of sync"
        )

    for stale in plan.dataset_dir.iterdir():
        if SHARD_RE.match(stale.name):
            stale.unlink()
    writer = ShardWriter(plan.dataset_dir, plan.shard_tokens, sidecars=plan.caseops)
    encode_docs(plan.docs, sp, scan, writer, plan.threads, plan.caseops)
    t2 = time.perf_counter()
    print(
        f"encoded and wrote {len(writer.shards['val'])} val + {len(writer.shards['train'])} train shards "
        f"({writer.tokens['val']:,} + {writer.tokens['train']:,} tokens"
        f"{', with byte sidecars' if plan.caseops else ''}) in {t2 - t1:.1f}s"
    )
    check_written(plan, scan, writer)

    manifest = build_manifest(plan, scan, writer, sha256_file(plan.docs), sp)
    manifest_path = plan.dataset_dir / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if plan.caseops:
        try:
            check_sidecar(plan.dataset_dir)  # the val sidecars, read back as a scorer will read them
        except SidecarError:
            manifest_path.unlink()
            raise
    if scan.dropped:
        print(f"dropped {len(scan.dropped)} train docs that duplicate a val doc")
    print(
        f"bytes/token val {manifest['bytes_per_token']['val']} train {manifest['bytes_per_token']['train']}; "
        f"tokenizer {display_path(plan.tokenizer_model)}; shards {display_path(plan.dataset_dir)}; "
        f"total {time.perf_counter() - t0:.1f}s"
    )
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See data/README.md for details and timings.",
    )
    p.add_argument(
        "--docs",
        type=Path,
        default=DEFAULT_DOCS,
        help='docs JSONL (.jsonl, .jsonl.xz, .jsonl.zst) with one {"text": ...} per line '
        f"(default: {display_path(DEFAULT_DOCS)})",
    )
    p.add_argument(
        "--val-docs",
        type=int,
        default=None,
        help="leading docs that form the validation split (default: docs_val from the "
        f"*.source_manifest.json next to --docs, else {OFFICIAL_VAL_DOCS:,})",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"tokenizer vocabulary size (default {DEFAULT_VOCAB_SIZE}, or the --tokenizer's)",
    )
    p.add_argument(
        "--tokenizer", type=Path, default=None, help="reuse this SentencePiece .model instead of training one"
    )
    p.add_argument(
        "--tokenizer-train-docs",
        type=int,
        default=None,
        help="train the tokenizer on at most this many train docs (default: all)",
    )
    p.add_argument(
        "--name",
        default="pdmix",
        help="output name: tokenizers/{name}_{V}_bpe.model, datasets/{name}_sp{V}/ "
        "(fineweb: datasets/fineweb10B_sp{V}/) (default: pdmix)",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="root for tokenizers/ and datasets/ (default: data/)",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=None,
        help=f"tokens per shard (default {OFFICIAL_SHARD_TOKENS:,}; "
        f"{EMBEDDED_SHARD_TOKENS:,} for the embedded corpus)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="encoding threads (does not change the output; default: all cores)",
    )
    p.add_argument(
        "--caseops",
        action="store_true",
        help="CaseOps: train the tokenizer on case-encoded text (lossless recipe, operators as "
        "user-defined symbols) and write per-token byte sidecars; outputs get a _caseops suffix",
    )
    p.add_argument(
        "--if-missing",
        action="store_true",
        help="exit at once if the outputs exist and their manifest matches these inputs",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = resolve_plan(args)
        if args.if_missing:
            current, why = manifest_is_current(plan)
            if current:
                print(f"{display_path(plan.dataset_dir)} is up to date (--if-missing); nothing to do")
                return 0
            print(f"building: {why}")
        prepare(plan)
        return 0
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
