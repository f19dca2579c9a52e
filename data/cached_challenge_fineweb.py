#!/usr/bin/env python3
"""Download the official cached FineWeb shards and tokenizer of the Parameter Golf challenge.

The files live in the Hugging Face dataset repo ``willdepueoai/parameter-golf`` under the
remote root ``datasets/``::

    datasets/manifest.json
    datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin, fineweb_train_000000.bin, ...
    datasets/tokenizers/fineweb_1024_bpe.model, fineweb_1024_bpe.vocab
    datasets/docs_selected.jsonl, docs_selected.source_manifest.json      (--with-docs)

and are mirrored below ``data/`` without the remote root, i.e. into
``data/datasets/fineweb10B_sp1024/`` and ``data/tokenizers/``: the paths ``train_gpt.py``
reads by default. Shard and tokenizer lists come from the remote ``manifest.json``.

Usage::

    pip install huggingface_hub
    python data/cached_challenge_fineweb.py                      # sp1024, val + 80 train shards
    python data/cached_challenge_fineweb.py --train-shards 1     # a quick subset (val + 1 shard)
    python data/cached_challenge_fineweb.py --list               # show what goes where, no download

Files already present are skipped. ``MATCHED_FINEWEB_REPO_ID`` and
``MATCHED_FINEWEB_REMOTE_ROOT_PREFIX`` override the repo and remote root, as in the
official script. ``huggingface_hub`` is only needed when something must be downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_REPO_ID = os.environ.get("MATCHED_FINEWEB_REPO_ID", "willdepueoai/parameter-golf")
DEFAULT_REMOTE_ROOT = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets")
DEFAULT_VARIANT = "sp1024"
# 80 shards x 10^8 tokens = the 8B training tokens the official baseline and records use.
# The maximum is whatever the remote manifest lists (stats.files_train).
DEFAULT_TRAIN_SHARDS = 80
FALLBACK_VAL_SHARDS = 1  # used only when no manifest is available (--skip-manifest / --list)
INSTALL_HINT = (
    "huggingface_hub is not installed, and it is needed to download the cached FineWeb "
    "files.\nInstall it with:  pip install huggingface_hub\n"
    "(or build the embedded corpus instead:  python data/prepare_data.py)"
)


class DownloadError(RuntimeError):
    """A problem the user can act on."""


# --------------------------------------------------------------------------- names and paths


def dataset_dir_for_variant(variant: str) -> str:
    if variant == "byte260" or (variant.startswith("sp") and variant[2:].isdigit()):
        return f"fineweb10B_{variant}"
    raise DownloadError(f"unknown variant {variant!r}: expected sp<VOCAB> (e.g. sp1024) or byte260")


def default_tokenizer_files(variant: str) -> list[str]:
    """Tokenizer paths (relative to the remote root) when the manifest does not list them."""
    if variant == "byte260":
        return ["tokenizers/fineweb_pure_byte_260.json"]
    vocab = variant[2:]
    return [f"tokenizers/fineweb_{vocab}_bpe.model", f"tokenizers/fineweb_{vocab}_bpe.vocab"]


def remote_path(remote_root: str, relative: str) -> str:
    """Join the remote root and a root-relative path (POSIX, as on the Hub)."""
    return str(PurePosixPath(remote_root, relative)) if remote_root else relative


def local_path_for_remote(
    remote: str, data_dir: Path = DATA_DIR, remote_root: str = DEFAULT_REMOTE_ROOT
) -> Path:
    """Where a remote file lands: the remote root is dropped and the rest mirrored under data_dir.

    datasets/datasets/fineweb10B_sp1024/x.bin -> data/datasets/fineweb10B_sp1024/x.bin
    datasets/tokenizers/fineweb_1024_bpe.model -> data/tokenizers/fineweb_1024_bpe.model
    datasets/manifest.json                    -> data/manifest.json
    """
    parts = PurePosixPath(remote).parts
    root_parts = PurePosixPath(remote_root).parts if remote_root else ()
    if root_parts and parts[: len(root_parts)] == root_parts:
        parts = parts[len(root_parts) :]
    if not parts or any(p in ("..", "") for p in parts):
        raise DownloadError(f"refusing odd remote path {remote!r}")
    return data_dir.joinpath(*parts)


@dataclass
class Plan:
    files: list[str]  # remote paths, in download order
    train_shards_available: int | None


def load_manifest(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DownloadError(f"{path} is not valid JSON ({exc}); delete it to download it again") from exc


def plan_files(
    variant: str,
    train_shards: int,
    manifest: dict | None,
    remote_root: str = DEFAULT_REMOTE_ROOT,
    with_docs: bool = False,
) -> Plan:
    """The remote files to fetch for a variant, from the manifest when one is available."""
    if train_shards < 0:
        raise DownloadError(f"--train-shards must be >= 0, got {train_shards}")
    dataset = dataset_dir_for_variant(variant)
    val_shards, available, tokenizer_files = FALLBACK_VAL_SHARDS, None, default_tokenizer_files(variant)
    if manifest is not None:
        entry = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset), None)
        if entry is None:
            names = ", ".join(str(d.get("name")) for d in manifest.get("datasets", []))
            raise DownloadError(f"the remote manifest has no dataset {dataset!r} (it has: {names})")
        stats = entry.get("stats") or {}
        val_shards = int(stats.get("files_val", FALLBACK_VAL_SHARDS))
        available = int(stats["files_train"]) if "files_train" in stats else None
        tok = next(
            (t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None
        )
        if tok is not None:
            listed = [str(tok[k]) for k in ("model_path", "vocab_path", "path") if tok.get(k)]
            tokenizer_files = listed or tokenizer_files
    if available is not None and train_shards > available:
        raise DownloadError(
            f"{variant} has {available} train shards on the Hub; --train-shards {train_shards} is too many"
        )
    files = [f"datasets/{dataset}/fineweb_val_{i:06d}.bin" for i in range(val_shards)]
    files += [f"datasets/{dataset}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files += tokenizer_files
    if with_docs:
        files += ["docs_selected.jsonl", "docs_selected.source_manifest.json"]
    return Plan([remote_path(remote_root, f) for f in files], available)


# --------------------------------------------------------------------------- downloading


def import_hf_hub_download():
    """The download function, imported only when needed; None when the package is missing."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    return hf_hub_download


def fetch(hf_hub_download, repo_id: str, remote: str, dest: Path) -> None:
    """Download one file into the HF cache and hard-link (or copy) it to ``dest``."""
    path = PurePosixPath(remote)
    cached = Path(
        hf_hub_download(
            repo_id=repo_id,
            repo_type="dataset",
            filename=path.name,
            subfolder=str(path.parent) if str(path.parent) != "." else None,
        )
    )
    source = cached.resolve(strict=True)  # the cache holds symlinks into its blob store
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, dest)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Layout and options: see data/README.md.",
    )
    p.add_argument(
        "--variant",
        default=DEFAULT_VARIANT,
        help="tokenizer family: sp1024 (default), sp512, sp2048, sp4096, byte260, ...",
    )
    p.add_argument(
        "--train-shards",
        type=int,
        default=DEFAULT_TRAIN_SHARDS,
        help=f"number of 100M-token train shards (default {DEFAULT_TRAIN_SHARDS}, the 8B tokens "
        "of the official runs; the maximum is the manifest's files_train)",
    )
    p.add_argument(
        "--with-docs",
        action="store_true",
        help="also fetch docs_selected.jsonl (large) and its sidecar, for re-tokenizing",
    )
    p.add_argument(
        "--skip-manifest",
        action="store_true",
        help="do not download manifest.json; use a local one or built-in defaults",
    )
    p.add_argument("--list", action="store_true", help="print the remote -> local mapping; download nothing")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="local root (default: data/)")
    p.add_argument("--repo-id", default=DEFAULT_REPO_ID, help=f"Hub dataset repo (default {DEFAULT_REPO_ID})")
    p.add_argument(
        "--remote-root",
        default=DEFAULT_REMOTE_ROOT,
        help=f"folder of the export inside the repo (default {DEFAULT_REMOTE_ROOT!r})",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest_remote = remote_path(args.remote_root, "manifest.json")
        manifest_local = local_path_for_remote(manifest_remote, args.data_dir, args.remote_root)
        hf_hub_download = None
        if not manifest_local.is_file() and not (args.skip_manifest or args.list):
            hf_hub_download = import_hf_hub_download()
            if hf_hub_download is None:
                print(f"error: {INSTALL_HINT}", file=sys.stderr)
                return 3
            print(f"fetching {manifest_remote}")
            fetch(hf_hub_download, args.repo_id, manifest_remote, manifest_local)
        manifest = load_manifest(manifest_local)
        if manifest is None:
            print(
                f"note: no {manifest_local}; assuming {FALLBACK_VAL_SHARDS} val shard and the standard tokenizer files"
            )
        plan = plan_files(args.variant, args.train_shards, manifest, args.remote_root, args.with_docs)
        targets = [(r, local_path_for_remote(r, args.data_dir, args.remote_root)) for r in plan.files]
        missing = [(r, dest) for r, dest in targets if not dest.is_file()]
        if args.list:
            for r, dest in targets:
                print(f"{'present' if dest.is_file() else 'missing'}  {args.repo_id}:{r} -> {dest}")
            return 0
        if not missing:
            print(f"all {len(targets)} files already present under {args.data_dir}")
            return 0
        hf_hub_download = hf_hub_download or import_hf_hub_download()
        if hf_hub_download is None:
            print(f"error: {INSTALL_HINT}", file=sys.stderr)
            return 3
        print(f"downloading {len(missing)} of {len(targets)} files from {args.repo_id} into {args.data_dir}")
        for i, (r, dest) in enumerate(missing, 1):
            print(f"[{i}/{len(missing)}] {r}", flush=True)
            fetch(hf_hub_download, args.repo_id, r, dest)
        return 0
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
