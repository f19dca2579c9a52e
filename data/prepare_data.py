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

Outputs (``--out-dir`` defaults to ``data/``)::

    OUT/tokenizers/{name}_{V}_bpe.model and .vocab
    OUT/datasets/{name}_sp{V}/fineweb_val_000000.bin, fineweb_train_000000.bin, ..., manifest.json

(``--name fineweb`` writes ``datasets/fineweb10B_sp{V}``, the directory ``train_gpt.py`` reads
by default.) Two runs with the same inputs give byte-identical shards and ``.model`` files.
"""

from __future__ import annotations

import argparse
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
HEADER_INTS = 256
BOS_ID = 1
OFFICIAL_VAL_DOCS = 50_000          # NUM_VAL_DOCS of the official FineWeb export
OFFICIAL_SHARD_TOKENS = 10**8       # official shard size
EMBEDDED_SHARD_TOKENS = 2_000_000   # smaller shards for the ~9.5M-token embedded corpus
DEFAULT_VOCAB_SIZE = 1024
SP_TRAIN_THREADS = 2                # stored in the .model; fixed so the file is reproducible
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
SHARD_RE = re.compile(r"^fineweb_(train|val)_\d{6}\.bin$")


class PrepareError(RuntimeError):
    """An input problem the user can fix; reported without a traceback."""


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
                raise PrepareError(f"{path}:{lineno}: expected a JSON object with a \"text\" field ({exc})") from exc
            if not isinstance(text, str):
                raise PrepareError(f"{path}:{lineno}: \"text\" must be a string")
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


# --------------------------------------------------------------------------- pass 1: scan (+ train)


@dataclass
class Scan:
    """What one pass over the docs learns: hash, counts, and train docs dropped for overlap."""
    val_docs: int
    sha256: str = ""
    num_docs: int = 0
    dropped: set[int] = field(default_factory=set)   # indices of train docs equal to a val doc
    bytes_val: int = 0
    bytes_train: int = 0
    tokenizer_train_docs: int = 0


def scan_docs(docs: Path, scan: Scan, train_cap: int | None) -> Iterator[str]:
    """Walk every doc once. Yields the (cleaned) train texts the tokenizer trains on, at
    most ``train_cap`` of them, but always scans the whole file before finishing."""
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
            clean = text.replace("\x00", " ").strip()  # as the official recipe feeds SentencePiece
            if clean:
                scan.tokenizer_train_docs += 1
                yield clean
    scan.sha256 = hasher.hexdigest()


def train_tokenizer(sentences: Iterator[str], vocab_size: int) -> bytes:
    """Train a BPE model with the official recipe; returns the serialized .model bytes."""
    import sentencepiece as spm

    writer = io.BytesIO()
    # model_writer (instead of model_prefix) keeps output paths out of the stored trainer_spec.
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=writer, vocab_size=vocab_size,
        num_threads=SP_TRAIN_THREADS, minloglevel=2, **SP_RECIPE,
    )
    return writer.getvalue()


def vocab_text(sp) -> str:
    """The .vocab companion file: one "piece<TAB>score" line per id, like SentencePiece's."""
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))


# --------------------------------------------------------------------------- pass 2: encode + shards


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = DATAFILE_MAGIC, DATAFILE_VERSION, len(tokens)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)


class ShardWriter:
    """Concatenates documents and cuts them into shards of exactly ``shard_tokens`` tokens."""

    def __init__(self, out_dir: Path, shard_tokens: int):
        self.out_dir = out_dir
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.split = "val"
        self.shards: dict[str, list[dict]] = {"val": [], "train": []}
        self.tokens = {"val": 0, "train": 0}
        self.docs = {"val": 0, "train": 0}

    def add(self, split: str, tokens: np.ndarray, num_docs: int) -> None:
        if split != self.split:
            self.flush()
            self.split = split
        self.tokens[split] += len(tokens)
        self.docs[split] += num_docs
        pos = 0
        while pos < len(tokens):
            take = min(len(self.buf) - self.fill, len(tokens) - pos)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == len(self.buf):
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = f"fineweb_{self.split}_{len(self.shards[self.split]):06d}.bin"
        write_shard(self.out_dir / name, self.buf[:self.fill])
        self.shards[self.split].append({"name": name, "tokens": int(self.fill)})
        self.fill = 0


def encode_batch(sp, texts: list[str], threads: int, vocab_size: int) -> np.ndarray:
    ids = sp.encode(texts, out_type=int, num_threads=threads)
    total = sum(len(x) for x in ids) + len(ids)
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain((BOS_ID,), x) for x in ids),
                       dtype=np.int64, count=total)
    if flat.size and (flat.max() >= vocab_size or flat.min() < 0):
        raise PrepareError(f"token id {int(flat.max())} outside the tokenizer's vocab of {vocab_size}")
    return flat.astype(np.uint16)


def encode_docs(docs: Path, sp, scan: Scan, writer: ShardWriter, threads: int) -> None:
    vocab_size = sp.vocab_size()
    batch: list[str] = []
    batch_split = "val"

    def emit():
        if batch:
            writer.add(batch_split, encode_batch(sp, batch, threads, vocab_size), len(batch))
            batch.clear()

    for i, text in enumerate(iter_docs(docs)):
        if i in scan.dropped:
            continue
        split = "val" if i < scan.val_docs else "train"
        if split != batch_split or len(batch) >= ENCODE_BATCH_DOCS:
            emit()
            batch_split = split
        batch.append(text)
    emit()
    writer.flush()


# --------------------------------------------------------------------------- paths and manifest


def display_path(path: Path) -> str:
    """Repo-relative POSIX path when inside the checkout, else absolute."""
    path = path.resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def dataset_dir_name(name: str, vocab_size: int) -> str:
    # "fineweb" keeps the official directory name that train_gpt.py defaults to.
    return f"fineweb10B_sp{vocab_size}" if name == "fineweb" else f"{name}_sp{vocab_size}"


@dataclass
class Plan:
    docs: Path
    val_docs: int
    vocab_size: int
    shard_tokens: int
    tokenizer_in: Path | None      # reuse this model instead of training
    tokenizer_model: Path          # the model the shards are encoded with
    dataset_dir: Path
    threads: int
    tokenizer_train_docs: int | None
    sidecar: dict | None


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
            raise PrepareError(f"--tokenizer {tokenizer_in} has {model_vocab} pieces but --vocab-size is {vocab_size}")
        vocab_size = model_vocab
    vocab_size = vocab_size or DEFAULT_VOCAB_SIZE
    if not 260 < vocab_size <= 65536:
        raise PrepareError(f"--vocab-size must be in 261..65536 (4 specials + 256 byte pieces + merges; "
                           f"shards store uint16), got {vocab_size}")

    out_dir = args.out_dir.resolve()
    model = tokenizer_in or out_dir / "tokenizers" / f"{args.name}_{vocab_size}_bpe.model"
    return Plan(docs=docs, val_docs=val_docs, vocab_size=vocab_size, shard_tokens=shard_tokens,
                tokenizer_in=tokenizer_in, tokenizer_model=model,
                dataset_dir=out_dir / "datasets" / dataset_dir_name(args.name, vocab_size),
                threads=args.threads, tokenizer_train_docs=args.tokenizer_train_docs, sidecar=sidecar)


def build_manifest(plan: Plan, scan: Scan, writer: ShardWriter, docs_file_sha: str) -> dict:
    tok_tokens = {s: writer.tokens[s] - writer.docs[s] for s in ("val", "train")}  # BOS excluded
    byte_counts = {"val": scan.bytes_val, "train": scan.bytes_train}
    sidecar = sidecar_path(plan.docs)
    return {
        "format": {"magic": DATAFILE_MAGIC, "version": DATAFILE_VERSION, "header_bytes": HEADER_INTS * 4,
                   "token_dtype": "<u2", "doc_prefix": "BOS (id 1)", "append_eos": False},
        "docs": {"path": display_path(plan.docs), "sha256": scan.sha256, "file_sha256": docs_file_sha,
                 "sidecar": display_path(sidecar) if plan.sidecar is not None else None},
        "tokenizer": {
            "path": display_path(plan.tokenizer_model),
            "vocab_path": display_path(plan.tokenizer_model.with_suffix(".vocab")),
            "sha256": sha256_file(plan.tokenizer_model),
            "trained_here": plan.tokenizer_in is None,
            "train_docs": scan.tokenizer_train_docs if plan.tokenizer_in is None else None,
            "recipe": {**SP_RECIPE, "num_threads": SP_TRAIN_THREADS} if plan.tokenizer_in is None else None,
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
        "shards": {s: writer.shards[s] for s in ("val", "train")},
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
    expected = {"docs file sha256": (m.get("docs", {}).get("file_sha256"), sha256_file(plan.docs)),
                "vocab_size": (m.get("vocab_size"), plan.vocab_size),
                "val docs": (m.get("val_docs"), plan.val_docs),
                "shard_tokens": (m.get("shard_tokens"), plan.shard_tokens)}
    for what, (have, want) in expected.items():
        if have != want:
            return False, f"{what} changed ({have} -> {want})"
    if not plan.tokenizer_model.is_file():
        return False, f"{plan.tokenizer_model} is missing"
    if m.get("tokenizer", {}).get("sha256") != sha256_file(plan.tokenizer_model):
        return False, f"{plan.tokenizer_model} differs from the one the shards were made with"
    for split in ("val", "train"):
        for shard in m.get("shards", {}).get(split, []):
            f = plan.dataset_dir / shard["name"]
            if not f.is_file() or f.stat().st_size != HEADER_INTS * 4 + 2 * shard["tokens"]:
                return False, f"{f} is missing or has the wrong size"
    return True, "up to date"


# --------------------------------------------------------------------------- main


def prepare(plan: Plan) -> dict:
    import sentencepiece as spm

    t0 = time.perf_counter()
    if plan.sidecar and plan.docs.name.endswith(".xz") and plan.sidecar.get("xz_sha256"):
        if sha256_file(plan.docs) != plan.sidecar["xz_sha256"]:
            raise PrepareError(f"{plan.docs} does not match xz_sha256 in {sidecar_path(plan.docs)}; "
                               "rebuild the corpus (data/build_corpus.py) or restore the file")
    plan.dataset_dir.mkdir(parents=True, exist_ok=True)
    (plan.dataset_dir / "manifest.json").unlink(missing_ok=True)  # written again only on success

    scan = Scan(val_docs=plan.val_docs)
    sentences = scan_docs(plan.docs, scan, plan.tokenizer_train_docs)
    if plan.tokenizer_in is None:
        model_bytes = train_tokenizer(sentences, plan.vocab_size)
        for _ in sentences:  # finish the scan should the trainer stop reading early
            pass
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        if sp.vocab_size() != plan.vocab_size:
            raise PrepareError(
                f"the tokenizer trained on {scan.tokenizer_train_docs:,} train docs has only "
                f"{sp.vocab_size()} pieces, not the requested {plan.vocab_size}: the corpus is too "
                "small for this vocabulary (hard_vocab_limit=False). Use a smaller --vocab-size or more docs.")
        plan.tokenizer_model.parent.mkdir(parents=True, exist_ok=True)
        plan.tokenizer_model.write_bytes(model_bytes)
        plan.tokenizer_model.with_suffix(".vocab").write_text(vocab_text(sp), encoding="utf-8")
        what = f"trained tokenizer on {scan.tokenizer_train_docs:,} docs"
    else:
        for _ in sentences:  # scan only
            pass
        sp = spm.SentencePieceProcessor(model_file=str(plan.tokenizer_model))
        what = "scanned docs"
    t1 = time.perf_counter()
    print(f"{what} ({scan.num_docs:,} docs, sha256 {scan.sha256[:12]}...) in {t1 - t0:.1f}s")

    if plan.val_docs >= scan.num_docs:
        raise PrepareError(f"--val-docs {plan.val_docs} leaves no train docs: {plan.docs} has {scan.num_docs}")
    if plan.sidecar and plan.sidecar.get("docs_sha256") not in (None, scan.sha256):
        raise PrepareError(f"{plan.docs} (sha256 {scan.sha256}) does not match docs_sha256 in "
                           f"{sidecar_path(plan.docs)}; the docs and their sidecar are out of sync")

    for stale in plan.dataset_dir.iterdir():
        if SHARD_RE.match(stale.name):
            stale.unlink()
    writer = ShardWriter(plan.dataset_dir, plan.shard_tokens)
    encode_docs(plan.docs, sp, scan, writer, plan.threads)
    t2 = time.perf_counter()
    print(f"encoded and wrote {len(writer.shards['val'])} val + {len(writer.shards['train'])} train shards "
          f"({writer.tokens['val']:,} + {writer.tokens['train']:,} tokens) in {t2 - t1:.1f}s")

    manifest = build_manifest(plan, scan, writer, sha256_file(plan.docs))
    (plan.dataset_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if scan.dropped:
        print(f"dropped {len(scan.dropped)} train docs that duplicate a val doc")
    print(f"bytes/token val {manifest['bytes_per_token']['val']} train {manifest['bytes_per_token']['train']}; "
          f"tokenizer {display_path(plan.tokenizer_model)}; shards {display_path(plan.dataset_dir)}; "
          f"total {time.perf_counter() - t0:.1f}s")
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See data/README.md for details and timings.")
    p.add_argument("--docs", type=Path, default=DEFAULT_DOCS,
                   help="docs JSONL (.jsonl, .jsonl.xz, .jsonl.zst) with one {\"text\": ...} per line "
                        f"(default: {display_path(DEFAULT_DOCS)})")
    p.add_argument("--val-docs", type=int, default=None,
                   help="leading docs that form the validation split (default: docs_val from the "
                        f"*.source_manifest.json next to --docs, else {OFFICIAL_VAL_DOCS:,})")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"tokenizer vocabulary size (default {DEFAULT_VOCAB_SIZE}, or the --tokenizer's)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="reuse this SentencePiece .model instead of training one")
    p.add_argument("--tokenizer-train-docs", type=int, default=None,
                   help="train the tokenizer on at most this many train docs (default: all)")
    p.add_argument("--name", default="pdmix",
                   help="output name: tokenizers/{name}_{V}_bpe.model, datasets/{name}_sp{V}/ "
                        "(fineweb: datasets/fineweb10B_sp{V}/) (default: pdmix)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="root for tokenizers/ and datasets/ (default: data/)")
    p.add_argument("--shard-tokens", type=int, default=None,
                   help=f"tokens per shard (default {OFFICIAL_SHARD_TOKENS:,}; "
                        f"{EMBEDDED_SHARD_TOKENS:,} for the embedded corpus)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="encoding threads (does not change the output; default: all cores)")
    p.add_argument("--if-missing", action="store_true",
                   help="exit at once if the outputs exist and their manifest matches these inputs")
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
