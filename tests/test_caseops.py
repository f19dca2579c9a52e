"""CaseOps (data side): the lossless case transform, the per-token byte sidecar and its guards.

The transform must be a bijection (a lossy casefold tokenizer was rejected by the contest), and bits
per byte must count the bytes of the ORIGINAL text: decoding the val token ids and undoing the
transform gives back the documents exactly, and the sidecar sums to their UTF-8 length.
"""

from __future__ import annotations

import itertools
import json
import lzma
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_data_tools import CORPUS, PREPARE, load_module, read_shard

pd = load_module("prepare_data")
T, A, C, E = pd.TITLE, pd.ALLCAPS, pd.CAPNEXT, pd.ESC

SLICE_DOCS, SLICE_VAL, VOCAB = 300, 40, 512
ADVERSARIAL = [
    "",
    " ",
    "   \n\t\n  ",
    "\x00",
    "a\x00B",
    "\ue000\ue001\ue002\ue003\ue004 \u2581 x\u2581y \ue003\ue003A \ue004\u2581",  # operators, ▁ and its stand-in
    "Straße STRASSE ẞ İstanbul İİ ǅungla ǄUNGLA \u212a\u212a Ω\u2126 ΟΔΟΣ Σοφία ΣΑΣ ς σ",  # not 1:1 mappings
    "iPhone McDonald McDONALD'S eBay NASA's I A a x86 ABC123DEF 3D Ⅻ² ½ É\u0301COLE ÉCOLE",
    "😀 emoji 👍🏽 mixed 😀A😀 \u200bZero\u200dWidth tabs\t\tand  runs   of    spaces  ",
    "Ⱥⱥ ȺȺ Ɐ ɐ ᲐᲑ ა \U00010400\U00010428 \U0001e900",  # case pairs whose UTF-8 lengths differ
]


def run_prepare(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREPARE), *map(str, args)], capture_output=True, text=True)


# --------------------------------------------------------------------------- the transform


def test_examples():
    assert (
        pd.case_encode("Hello WORLD iPhone McDonald a I")
        == f"{T}hello {A}world i{C}phone {T}mc{C}donald a {T}i"
    )
    assert pd.case_encode("ΟΔΟΣ Σ ς") == f"{A}οδοσ {T}σ ς"  # per-character lower: no final-sigma rewrite
    assert pd.case_encode("Straße ẞ İ \u212a") == f"{T}straße ẞ İ \u212a"  # ẞ, İ, Kelvin sign: literal
    assert pd.case_encode("x\ue002y\u2581\ue004") == f"x{E}\ue002y{E}\ue004\ue004"
    assert pd.case_encode("ABC123DEF x86") == f"{A}abc123{A}def x86"  # digits end a word
    assert pd.original_char_bytes(f"{T}hi {A}ⱥⱥ").tolist() == [0, 1, 1, 1, 0, 2, 2]  # ⱥ is 3 bytes, Ⱥ 2


@pytest.mark.parametrize("bad", [T, A + "a", A + "a1", C + "1", T + "ß", E + "a", E, "ok " + C])
def test_malformed_operators_are_refused(bad):
    with pytest.raises(pd.CaseOpsError, match=r"at \d+ is followed by"):
        pd.case_decode(bad)


def test_bijective_on_adversarial_and_random_strings():
    alphabet = (
        "aZ zß ẞİıiIΣσςǅǄǆ\u212akK9_²Ⅻ\u0301.'-\n\t\x00😀Ⱥⱥ\U00010400\U00010428"
        + "".join(pd.CASEOPS_OPERATORS.values())
        + pd.SP_SPACE
        + pd.SP_SPACE_STANDIN
    )
    rng = random.Random(0)
    strings = ADVERSARIAL + ["".join(rng.choices(alphabet, k=rng.randrange(30))) for _ in range(3000)]
    for s in strings:
        enc = pd.case_encode(s)
        assert pd.case_decode(enc) == s, repr(s)
        assert pd.SP_SPACE not in enc  # SentencePiece would decode it as a space
        assert int(pd.original_char_bytes(enc).sum()) == len(s.encode("utf-8")), repr(s)


def test_bijective_on_the_whole_embedded_corpus():
    docs = ops = 0
    for text in pd.iter_docs(CORPUS):
        enc = pd.case_encode(text)
        assert pd.case_decode(enc) == text, text[:80]
        assert not any(pd.simple_lower(c) for c in set(enc))  # every simple capital was lowered
        docs, ops = docs + 1, ops + sum(enc.count(op) for op in (T, A, C))
    assert docs == json.loads(CORPUS.with_name("docs_selected.source_manifest.json").read_text())["num_docs"]
    assert ops > 100_000


# --------------------------------------------------------------------------- prepare_data.py --caseops


@pytest.fixture(scope="module")
def caseops_set(tmp_path_factory):
    """prepare_data.py --caseops on adversarial docs + 300 embedded docs (+ a re-spaced copy of val doc 12)."""
    with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
        texts = ADVERSARIAL + [json.loads(line)["text"] for line in itertools.islice(f, SLICE_DOCS)]
    texts.append("  " + texts[12].replace(" ", "   ") + "\n")  # the same doc once normalised
    out = tmp_path_factory.mktemp("caseops")
    docs = out / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )
    proc = run_prepare(
        "--caseops",
        "--docs",
        docs,
        "--out-dir",
        out,
        "--name",
        "c",
        "--vocab-size",
        VOCAB,
        "--val-docs",
        SLICE_VAL,
        "--shard-tokens",
        40_000,
    )
    assert proc.returncode == 0, proc.stderr
    ds = out / "datasets" / f"c_sp{VOCAB}_caseops"
    return dict(
        texts=texts,
        docs=docs,
        out=out,
        ds=ds,
        model=out / "tokenizers" / f"c_{VOCAB}_bpe_caseops.model",
        manifest=json.loads((ds / "manifest.json").read_text(encoding="utf-8")),
    )


def val_docs(ds: Path) -> list[np.ndarray]:
    tokens = np.concatenate([read_shard(p)[1] for p in sorted(ds.glob("fineweb_val_??????.bin"))])
    return np.split(tokens, np.flatnonzero(tokens == 1)[1:])


def test_manifest_records_caseops_bos_and_disjointness(caseops_set):
    m, ds = caseops_set["manifest"], caseops_set["ds"]
    assert m["val_docs"] == SLICE_VAL and m["bos_count"] == {"val": SLICE_VAL, "train": m["train_docs"]}
    assert m["train_val_overlap_docs_removed"] == 1 and m["train_val_disjoint"] is True
    assert m["train_docs"] == len(caseops_set["texts"]) - SLICE_VAL - 1
    assert pd.check_disjoint(ds) == SLICE_VAL  # distinct val token sequences, none of them in train
    cops = m["caseops"]
    assert cops["operators"] == {"TITLE": "U+E000", "ALLCAPS": "U+E001", "CAPNEXT": "U+E002", "ESC": "U+E003"}
    assert sorted(cops["operator_ids"].values()) == [4, 5, 6, 7]  # user-defined pieces follow the specials
    assert m["tokenizer"]["recipe"]["normalization_rule_name"] == "identity"
    for split in ("val", "train"):
        assert [s["name"] for s in cops["byte_sidecars"][split]] == [
            pd.sidecar_name(s["name"]) for s in m["shards"][split]
        ]
        assert sum(s["bytes"] for s in cops["byte_sidecars"][split]) == m["text_bytes"][split]
    assert len(m["shards"]["train"]) >= 2  # docs and their sidecars span shard boundaries
    header, _ = read_shard(ds / "fineweb_val_bytes_000000.bin")
    assert header[0] == pd.SIDECAR_MAGIC and header[1] == 1 and header[2] == m["shards"]["val"][0]["tokens"]


def test_oracle_decoded_val_ids_give_back_the_documents(caseops_set):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(caseops_set["model"]))
    ds, originals = caseops_set["ds"], caseops_set["texts"][:SLICE_VAL]
    docs = val_docs(ds)
    assert len(docs) == SLICE_VAL and all(d[0] == 1 for d in docs)
    assert [pd.case_decode(sp.decode(d[1:].tolist())) for d in docs] == originals
    side = np.concatenate([read_shard(p)[1] for p in sorted(ds.glob("fineweb_val_bytes_*.bin"))])
    per_doc = np.split(side, np.cumsum([len(d) for d in docs])[:-1])
    assert [int(s.sum()) for s in per_doc] == [len(t.encode("utf-8")) for t in originals]
    assert int(side.sum()) == caseops_set["manifest"]["text_bytes"]["val"]
    tokens = np.concatenate(docs)
    op_ids = caseops_set["manifest"]["caseops"]["operator_ids"]
    ops = np.isin(tokens, list(op_ids.values()))
    escaped = np.zeros(len(tokens), dtype=bool)  # an operator character after an acting ESC is a literal
    for i in range(1, len(tokens)):
        escaped[i] = tokens[i - 1] == op_ids["ESC"] and ops[i - 1] and not escaped[i - 1]
    assert ops.sum() > 100 and escaped.sum() >= 6
    assert not side[ops & ~escaped].any() and (side[ops & escaped] == 3).all() and not side[tokens == 1].any()
    assert pd.check_sidecar(ds, ("val", "train"))["val"] == {
        "tokens": len(tokens),
        "bytes": int(side.sum()),
        "docs": SLICE_VAL,
    }


def test_missing_or_mismatched_sidecar_is_refused(caseops_set, tmp_path):
    def broken(edit):
        ds = tmp_path / f"ds{len(list(tmp_path.iterdir()))}"
        shutil.copytree(caseops_set["ds"], ds)
        edit(ds)
        return ds

    def poke(name, position, value):
        def edit(ds):
            data = bytearray((ds / name).read_bytes())
            at = (
                position
                if position is not None
                else int(np.flatnonzero(read_shard(ds / name.replace("_bytes", ""))[1] != 1)[-1])
            )  # not a BOS
            data[1024 + 2 * at : 1026 + 2 * at] = int(value).to_bytes(2, "little")
            (ds / name).write_bytes(data)

        return edit

    side = "fineweb_val_bytes_000000.bin"
    cases = [
        (lambda ds: (ds / side).unlink(), rf"{side} is missing"),
        (poke(side, None, 999), rf"{side} differs from the sidecar recorded"),
        (poke(side, 0, 3), rf"{side} gives bytes to the BOS at position 0"),
        (
            lambda ds: pd.write_shard(ds / side, np.zeros(7, np.uint16), pd.SIDECAR_MAGIC),
            "has 7 byte counts but",
        ),
        (
            lambda ds: shutil.copy(ds / side, ds / "fineweb_val_bytes_000009.bin"),
            "000009.bin matches no token shard",
        ),
        (
            lambda ds: (ds / "fineweb_train_bytes_000001.bin").unlink(),
            "fineweb_train_bytes_000001.bin is missing",
        ),
        (poke("fineweb_val_000000.bin", 0, 9), "does not start with BOS"),
    ]
    for edit, message in cases:
        with pytest.raises(pd.SidecarError, match=message):
            pd.check_sidecar(broken(edit), ("val", "train"))
    # Without a manifest (the official download) the totals cannot be checked, the structure still is.
    ds = broken(lambda ds: (ds / "manifest.json").unlink())
    assert pd.check_sidecar(ds)["val"]["docs"] == SLICE_VAL
    with pytest.raises(pd.SidecarError, match="gives bytes to the BOS"):
        pd.check_sidecar(broken(lambda ds: ((ds / "manifest.json").unlink(), poke(side, 0, 3)(ds))))
    with pytest.raises(pd.SidecarError, match="does not describe a CaseOps dataset"):
        pd.check_sidecar(broken(lambda ds: (ds / "manifest.json").write_text('{"caseops": null}')))
    with pytest.raises(pd.SidecarError, match="also occur in its train shards"):
        pd.check_disjoint(
            broken(lambda ds: shutil.copy(ds / "fineweb_val_000000.bin", ds / "fineweb_train_000099.bin"))
        )


def test_reuse_if_missing_and_refusing_a_plain_tokenizer(caseops_set, tmp_path):
    common = ("--docs", caseops_set["docs"], "--name", "c", "--val-docs", SLICE_VAL, "--shard-tokens", 40_000)
    again = run_prepare(
        "--caseops", *common, "--out-dir", caseops_set["out"], "--vocab-size", VOCAB, "--if-missing"
    )
    assert again.returncode == 0 and "up to date" in again.stdout
    reuse = run_prepare("--caseops", *common, "--out-dir", tmp_path, "--tokenizer", caseops_set["model"])
    assert reuse.returncode == 0, reuse.stderr
    for p in sorted(caseops_set["ds"].glob("*.bin")):  # the same tokens and sidecars
        assert (tmp_path / "datasets" / f"c_sp{VOCAB}_caseops" / p.name).read_bytes() == p.read_bytes()
    plain = tmp_path / "plain"
    assert run_prepare(*common, "--out-dir", plain, "--vocab-size", VOCAB).returncode == 0
    refused = run_prepare(
        "--caseops", *common, "--out-dir", plain, "--tokenizer", plain / "tokenizers" / f"c_{VOCAB}_bpe.model"
    )
    assert (
        refused.returncode == 2
        and "is not a CaseOps tokenizer: TITLE (U+E000) is not one piece" in refused.stderr
    )
    with pytest.raises(pd.SidecarError, match="does not describe a CaseOps dataset"):
        pd.check_sidecar(plain / "datasets" / f"c_sp{VOCAB}")


def test_conftest_caseops_fixture_is_a_valid_set(caseops_data):
    summary = pd.check_sidecar(Path(caseops_data["DATA_PATH"]), ("val", "train"))
    assert summary["val"]["docs"] == 100 and summary["train"]["docs"] == 500
    assert Path(caseops_data["TOKENIZER_PATH"]).is_file() and caseops_data["VOCAB_SIZE"] == "512"


# --------------------------------------------------------------------------- the scorer (train_gpt.py)


def test_the_scorer_counts_the_original_bytes_from_the_sidecar(caseops_data, tmp_path):
    """train_gpt's bpb denominator on CaseOps data is the bytes of the original val text (the sidecar),
    not the pieces' UTF-8 (an operator piece would count 3); every pass and rank sees the same bytes. A
    CaseOps tokenizer without its sidecar, or a sidecar that does not pair with the shards, is refused."""
    from conftest import cpu_runtime, hparams, tg

    h = hparams(caseops_data, VAL_MAX_TOKENS=0)
    rt = cpu_runtime()
    sp = tg.load_tokenizer(h)
    tokens = tg.load_val_tokens(h, rt)
    luts = tg.byte_counter(h, sp, tokens, rt)
    manifest = json.loads((Path(caseops_data["DATA_PATH"]) / "manifest.json").read_text())

    def fake(x, y):
        return torch.zeros(x.shape)

    for stride in (64, 17):  # every target once: the byte sum is the original text's, minus the first BOS's 0
        totals = tg.evaluate(fake, tokens, 64, stride, 16, luts, rt)
        assert int(totals[1]) == manifest["text_bytes"]["val"] and int(totals[2]) == tokens.numel() - 1
    pieces = tg.build_byte_luts(sp, "cpu")
    assert (
        int(tg.target_bytes(tokens[:-1].long(), tokens[1:].long(), pieces).sum())
        > manifest["text_bytes"]["val"]
    )
    bare = tmp_path / "bare"
    shutil.copytree(caseops_data["DATA_PATH"], bare)
    for f in bare.glob("fineweb_val_bytes_*.bin"):
        f.unlink()
    with pytest.raises(tg.ConfigError, match="no fineweb_val_bytes_"):
        tg.byte_counter(hparams(caseops_data, DATA_PATH=bare), sp, tokens, rt)
    shutil.copy(
        sorted(Path(caseops_data["DATA_PATH"]).glob("fineweb_val_bytes_*.bin"))[0],
        bare / "fineweb_val_bytes_000001.bin",
    )  # a sidecar with no shard of its own
    with pytest.raises(tg.ConfigError, match="do not pair"):
        tg.byte_counter(hparams(caseops_data, DATA_PATH=bare), sp, tokens, rt)
