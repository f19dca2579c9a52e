"""Shards, loader and the clear errors for bad data."""

import numpy as np
import pytest
import torch

from conftest import cpu_runtime, hparams, make_env, run_script, tg


def write_shard(path, tokens, magic=20240520, version=1, count=None, extra=b""):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes() + extra)
    return str(path)


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65535, 1000)
    assert (tg.load_shard(write_shard(tmp_path / "s.bin", tokens)) == tokens).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(magic=123), "magic/version 123/1"),
        (dict(version=2), "magic/version 20240520/2"),
        (dict(count=1001), "header says 1001 tokens"),
        (dict(extra=b"\0\0"), "but the file has"),
    ],
)
def test_bad_shards_are_named(tmp_path, kwargs, message):
    path = write_shard(tmp_path / "bad.bin", range(1000), **kwargs)
    with pytest.raises(tg.ConfigError, match=message) as e:
        tg.shard_token_count(path)
    assert "bad.bin" in str(e.value)


def test_short_header(tmp_path):
    (tmp_path / "short.bin").write_bytes(b"\0" * 100)
    with pytest.raises(tg.ConfigError, match="short.bin: 100 bytes is shorter"):
        tg.shard_token_count(str(tmp_path / "short.bin"))


def test_missing_and_empty_globs(tmp_path, small_data):
    h = hparams(small_data, DATA_PATH=tmp_path)
    with pytest.raises(tg.ConfigError, match=r"no train shards match .*fineweb_train_\*\.bin: set DATA_PATH"):
        tg.find_shards(h, "train")
    write_shard(tmp_path / "fineweb_val_000000.bin", [])
    with pytest.raises(tg.ConfigError, match="hold no tokens"):
        tg.find_shards(h, "val")


def test_tokenizer_checks(tmp_path, small_data):
    with pytest.raises(tg.ConfigError, match="tokenizer file not found: TOKENIZER_PATH=.*nope.model"):
        tg.load_tokenizer(hparams(small_data, TOKENIZER_PATH=tmp_path / "nope.model"))
    with pytest.raises(tg.ConfigError, match="has 512 pieces but VOCAB_SIZE=1024"):
        tg.load_tokenizer(hparams(small_data, VOCAB_SIZE=1024))


@pytest.mark.parametrize("eval_len", [0, 32])
def test_val_shorter_than_one_window(tmp_path, small_data, eval_len):
    # EVAL_SEQ_LEN=32 < TRAIN_SEQ_LEN=64: the 50 tokens hold an eval window, but not the training-length
    # window the diagnostic eval scores (it was an IndexError there, after training)
    write_shard(tmp_path / "fineweb_val_000000.bin", range(50))
    with pytest.raises(
        tg.ConfigError,
        match=r"the val split \(.*fineweb_val_000000.bin\) has 50 tokens, fewer than "
        r"one window \+ 1 \(65\)",
    ):
        tg.load_val_tokens(
            hparams(small_data, DATA_PATH=tmp_path, EVAL_SEQ_LEN=eval_len, EVAL_STRIDE=32), cpu_runtime()
        )


def test_manifest_tokenizer_must_be_the_one_in_use(tmp_path, small_data):
    h = hparams(small_data)
    sha = tg.file_sha256(h.run.tokenizer_path)
    assert tg.read_manifest(h, sha)["train_val_disjoint"] is True
    assert (
        tg.read_manifest(hparams(small_data, DATA_PATH=tmp_path), sha) == {}
    )  # no manifest (FineWeb): no check
    other = tmp_path / "other.model"
    other.write_bytes(b"another tokenizer")
    with pytest.raises(
        tg.ConfigError,
        match=rf"manifest.json: the shards were tokenized with .*small_512_bpe.model "
        rf"\(sha256 {sha}\), but TOKENIZER_PATH=.*other.model has sha256",
    ):
        tg.read_manifest(hparams(small_data, TOKENIZER_PATH=other), tg.file_sha256(str(other)))


def test_loader_splits_ranks_and_wraps(tmp_path):
    files = [
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", range(i * 100, i * 100 + 100)) for i in range(3)
    ]
    # one process, 8 micro-batches of 16 tokens (+1 for the shifted target) per step
    single = tg.TrainLoader(files, cpu_runtime())
    steps = [single.next_batch(128, 16) for _ in range(8)]
    for x, y in steps:
        assert torch.equal(x[:, 1:], y[:, :-1])
    # two processes see the same spans, rank r taking the r-th slice of each
    pair = [tg.TrainLoader(files, cpu_runtime(r, 2)) for r in range(2)]
    for k in range(4):
        for r, loader in enumerate(pair):
            x, y = loader.next_batch(128, 16)
            assert torch.equal(x, steps[2 * k + r][0]) and torch.equal(y, steps[2 * k + r][1])
    # the stream runs over shard boundaries and wraps to the first shard (8 * 17 = 136 tokens per call)
    seen = np.concatenate([single.take(100) for _ in range(3)])
    assert seen[0] == 136 and (np.diff(seen.astype(np.int64)) % 300 == 1).all()
    state = single.state()
    a = single.take(50)
    single.restore(state)
    assert (single.take(50) == a).all()


def test_script_names_a_corrupt_shard(tmp_path, small_data):
    write_shard(tmp_path / "fineweb_train_000000.bin", range(5000), magic=7)
    write_shard(tmp_path / "fineweb_val_000000.bin", range(5000))
    proc = run_script(make_env(small_data, DATA_PATH=tmp_path), tmp_path)
    assert proc.returncode != 0 and "fineweb_train_000000.bin: magic/version 7/1" in proc.stderr
    assert "model_params" not in proc.stdout  # failed before building anything
