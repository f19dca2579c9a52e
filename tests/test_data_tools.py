"""Tests for the data/ tooling: embedded corpus, prepare_data.py, cached_challenge_fineweb.py.

CPU only and offline; build_corpus.py itself needs npm and the network, so only its
committed output is checked here (run `python data/build_corpus.py --check` by hand).
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import lzma
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
CORPUS = DATA / "corpus" / "docs_selected.jsonl.xz"
CORPUS_MANIFEST = DATA / "corpus" / "docs_selected.source_manifest.json"
PREPARE = DATA / "prepare_data.py"

SLICE_DOCS = 400
SLICE_VAL = 50
SLICE_VOCAB = 512


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_data_{name}", DATA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_prepare(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREPARE), *map(str, args)], capture_output=True, text=True)


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    header = np.fromfile(path, dtype="<i4", count=256)
    tokens = np.fromfile(path, dtype="<u2", offset=1024)
    return header, tokens


# --------------------------------------------------------------------------- embedded corpus


def test_committed_corpus_matches_manifest():
    manifest = json.loads(CORPUS_MANIFEST.read_text(encoding="utf-8"))
    blob = CORPUS.read_bytes()
    assert hashlib.sha256(blob).hexdigest() == manifest["xz_sha256"]
    raw = lzma.decompress(blob)
    assert hashlib.sha256(raw).hexdigest() == manifest["docs_sha256"]
    lines = raw.decode("utf-8").split("\n")[:-1]  # not splitlines(): U+2028 etc. are text
    assert len(lines) == manifest["num_docs"]
    assert 0 < manifest["docs_val"] < manifest["num_docs"]
    assert sum(s["docs"] for s in manifest["sources"].values()) == manifest["num_docs"]
    first = json.loads(lines[0])
    assert set(first) == {"text"} and first["text"]
    assert max(len(json.loads(x)["text"].encode("utf-8")) for x in lines[:200]) <= manifest["max_doc_bytes"]


# --------------------------------------------------------------------------- prepare_data.py


@pytest.fixture(scope="module")
def slice_docs(tmp_path_factory) -> Path:
    """The first 400 embedded docs, plus one re-spaced copy of a val doc at the end."""
    with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in itertools.islice(f, SLICE_DOCS)]
    texts.append("  " + texts[3].replace(" ", "   ") + "\n")  # same text once normalised
    path = tmp_path_factory.mktemp("slice") / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )
    return path


def prepare_slice(docs: Path, out: Path, *extra) -> dict:
    proc = run_prepare(
        "--docs",
        docs,
        "--out-dir",
        out,
        "--name",
        "t",
        "--vocab-size",
        SLICE_VOCAB,
        "--val-docs",
        SLICE_VAL,
        "--shard-tokens",
        50_000,
        *extra,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "datasets" / f"t_sp{SLICE_VOCAB}" / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def built(slice_docs, tmp_path_factory):
    out_a, out_b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    return (
        slice_docs,
        out_a,
        prepare_slice(slice_docs, out_a),
        out_b,
        prepare_slice(slice_docs, out_b, "--threads", 1),
    )


def test_shards_are_valid(built):
    _docs, out, manifest, *_ = built
    ds = out / "datasets" / f"t_sp{SLICE_VOCAB}"
    assert manifest["val_docs"] == SLICE_VAL
    assert manifest["train_docs"] == SLICE_DOCS - SLICE_VAL  # the duplicate was dropped
    assert manifest["train_val_overlap_docs_removed"] == 1 and manifest["train_val_disjoint"] is True
    bos = {"val": 0, "train": 0}
    for split in ("val", "train"):
        names = sorted(p.name for p in ds.glob(f"fineweb_{split}_*.bin"))
        assert names == [s["name"] for s in manifest["shards"][split]]
        assert names[0] == f"fineweb_{split}_000000.bin"
        total = 0
        for name in names:
            header, tokens = read_shard(ds / name)
            assert header[0] == 20240520 and header[1] == 1 and header[2] == len(tokens)
            assert not header[3:].any()
            assert (ds / name).stat().st_size == 1024 + 2 * int(header[2])
            assert tokens.max() < SLICE_VOCAB
            bos[split] += int((tokens == 1).sum())
            total += len(tokens)
        assert total == manifest["tokens"][split]
    assert len(manifest["shards"]["train"]) >= 2  # docs span shard boundaries
    assert all(s["tokens"] == 50_000 for s in manifest["shards"]["train"][:-1])
    assert bos == {"val": SLICE_VAL, "train": SLICE_DOCS - SLICE_VAL}
    _header, first_val = read_shard(ds / "fineweb_val_000000.bin")
    assert first_val[0] == 1


def test_tokenizer_matches_recipe(built):
    import sentencepiece as spm

    _docs, out, manifest, *_ = built
    model = out / "tokenizers" / f"t_{SLICE_VOCAB}_bpe.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.vocab_size() == SLICE_VOCAB
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.id_to_piece(4) == "<0x00>"  # byte fallback pieces follow the specials
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert (
        len((out / "tokenizers" / f"t_{SLICE_VOCAB}_bpe.vocab").read_text(encoding="utf-8").splitlines())
        == SLICE_VOCAB
    )


def test_prepare_is_deterministic(built):
    _docs, out_a, man_a, out_b, man_b = built
    files_a = sorted((out_a / "datasets").rglob("*.bin")) + sorted((out_a / "tokenizers").iterdir())
    files_b = sorted((out_b / "datasets").rglob("*.bin")) + sorted((out_b / "tokenizers").iterdir())
    assert [p.name for p in files_a] == [p.name for p in files_b]
    for a, b in zip(files_a, files_b):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert man_a["tokens"] == man_b["tokens"]


def test_reused_tokenizer_zst_input_and_if_missing(built, tmp_path):
    zstandard = pytest.importorskip("zstandard")
    docs, out_a, manifest, *_ = built
    zst = tmp_path / "docs.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(docs.read_bytes()))
    model = out_a / "tokenizers" / f"t_{SLICE_VOCAB}_bpe.model"
    args = (
        "--docs",
        zst,
        "--out-dir",
        tmp_path,
        "--name",
        "t",
        "--tokenizer",
        model,
        "--val-docs",
        SLICE_VAL,
        "--shard-tokens",
        50_000,
    )
    proc = run_prepare(*args)
    assert proc.returncode == 0, proc.stderr
    ds_a, ds_z = out_a / "datasets" / f"t_sp{SLICE_VOCAB}", tmp_path / "datasets" / f"t_sp{SLICE_VOCAB}"
    for shard in itertools.chain(*manifest["shards"].values()):
        assert (ds_a / shard["name"]).read_bytes() == (ds_z / shard["name"]).read_bytes()
    again = run_prepare(*args, "--if-missing")
    assert again.returncode == 0 and "up to date" in again.stdout
    changed = run_prepare(*args[:-4], "--val-docs", SLICE_VAL + 1, "--shard-tokens", 50_000, "--if-missing")
    assert changed.returncode == 0 and "val docs changed" in changed.stdout


def test_refuses_vocab_the_corpus_cannot_fill(slice_docs, tmp_path):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(slice_docs.read_text(encoding="utf-8").splitlines(True)[:4]), encoding="utf-8")
    proc = run_prepare(
        "--docs", tiny, "--out-dir", tmp_path, "--name", "t", "--vocab-size", 8192, "--val-docs", 1
    )
    assert proc.returncode != 0
    assert "not the requested 8192" in proc.stderr and "smaller --vocab-size" in proc.stderr
    assert not (tmp_path / "tokenizers" / "t_8192_bpe.model").exists()


def test_bad_inputs_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    proc = run_prepare("--docs", bad, "--out-dir", tmp_path, "--val-docs", 1)
    assert proc.returncode != 0 and "bad.jsonl:2" in proc.stderr
    proc = run_prepare("--docs", tmp_path / "nope.jsonl", "--out-dir", tmp_path)
    assert proc.returncode != 0 and "does not exist" in proc.stderr


# --------------------------------------------------------------------------- cached_challenge_fineweb.py


def test_downloader_without_huggingface_hub(monkeypatch, tmp_path, capsys):
    dl = load_module("cached_challenge_fineweb")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    rc = dl.main(["--data-dir", str(tmp_path)])
    assert rc != 0
    assert "pip install huggingface_hub" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_downloader_remote_to_local_paths(tmp_path):
    dl = load_module("cached_challenge_fineweb")
    m = dl.local_path_for_remote
    assert (
        m("datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin", tmp_path, "datasets")
        == tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    )
    assert (
        m("datasets/tokenizers/fineweb_1024_bpe.model", tmp_path, "datasets")
        == tmp_path / "tokenizers" / "fineweb_1024_bpe.model"
    )
    assert m("datasets/manifest.json", tmp_path, "datasets") == tmp_path / "manifest.json"
    assert m("tokenizers/x.model", tmp_path, "") == tmp_path / "tokenizers" / "x.model"
    assert (
        dl.local_path_for_remote("datasets/datasets/fineweb10B_sp1024/a.bin")
        == DATA / "datasets" / "fineweb10B_sp1024" / "a.bin"
    )  # where train_gpt.py looks by default
    with pytest.raises(dl.DownloadError):
        m("datasets/../etc/passwd", tmp_path, "datasets")


def test_downloader_plan_follows_manifest():
    dl = load_module("cached_challenge_fineweb")
    manifest = {
        "datasets": [
            {
                "name": "fineweb10B_sp1024",
                "tokenizer_name": "sp_bpe_1024",
                "stats": {"files_train": 3, "files_val": 1},
            }
        ],
        "tokenizers": [
            {
                "name": "sp_bpe_1024",
                "model_path": "tokenizers/fineweb_1024_bpe.model",
                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
            }
        ],
    }
    plan = dl.plan_files("sp1024", 2, manifest, "datasets")
    assert plan.files == [
        "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
        "datasets/tokenizers/fineweb_1024_bpe.model",
        "datasets/tokenizers/fineweb_1024_bpe.vocab",
    ]
    assert len(dl.plan_files("sp1024", 0, None).files) == 3  # defaults: val shard + tokenizer pair
    assert dl.DEFAULT_TRAIN_SHARDS == 80 and dl.DEFAULT_VARIANT == "sp1024"
    with pytest.raises(dl.DownloadError, match="3 train shards"):
        dl.plan_files("sp1024", 4, manifest, "datasets")
    with pytest.raises(dl.DownloadError, match="no dataset"):
        dl.plan_files("sp4096", 1, manifest, "datasets")


def test_downloader_fetches_and_skips_present_files(monkeypatch, tmp_path):
    dl = load_module("cached_challenge_fineweb")
    cache, calls = tmp_path / "hf_cache", []

    def fake_hf_hub_download(repo_id, repo_type, filename, subfolder=None):
        assert repo_id == "willdepueoai/parameter-golf" and repo_type == "dataset"
        calls.append(f"{subfolder}/{filename}")
        path = cache / (subfolder or "") / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if filename == "manifest.json":
            path.write_text(
                json.dumps(
                    {"datasets": [{"name": "fineweb10B_sp1024", "stats": {"files_train": 5, "files_val": 1}}]}
                )
            )
        else:
            path.write_bytes(filename.encode())
        return str(path)

    monkeypatch.setattr(dl, "import_hf_hub_download", lambda: fake_hf_hub_download)
    data = tmp_path / "data"
    assert (
        dl.main(["--data-dir", str(data), "--train-shards", "2", "--repo-id", "willdepueoai/parameter-golf"])
        == 0
    )
    assert calls[0] == "datasets/manifest.json" and len(calls) == 6
    assert (
        data / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin"
    ).read_bytes() == b"fineweb_train_000001.bin"
    assert (data / "tokenizers" / "fineweb_1024_bpe.model").is_file()
    assert (
        dl.main(["--data-dir", str(data), "--train-shards", "2", "--repo-id", "willdepueoai/parameter-golf"])
        == 0
    )
    assert len(calls) == 6  # everything present: nothing fetched again
