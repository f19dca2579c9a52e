"""The byte rule behind val_bpb, checked against decoded text exactly."""

import math

import sentencepiece as spm
import torch

from conftest import cpu_runtime, hparams, tg


def lut_bytes_per_doc(data: dict):
    h = hparams(data, VAL_MAX_TOKENS=0)
    sp = tg.load_tokenizer(h)
    luts = tg.build_byte_luts(sp, "cpu")
    tokens = tg.load_val_tokens(h, cpu_runtime()).long()
    per_target = tg.target_bytes(tokens[:-1], tokens[1:], luts)
    starts = (tokens == tg.BOS_ID).nonzero().squeeze(1).tolist()
    assert starts[0] == 0
    docs = []
    for a, b in zip(starts, starts[1:] + [len(tokens)]):
        # the targets of a document are its tokens after BOS; the next BOS target adds 0 bytes
        docs.append(
            (
                tokens[a + 1 : b].tolist(),
                int(per_target[a : b - 1].sum()),
                int(per_target[b - 1 : b].sum()) if b < len(tokens) else 0,
            )
        )
    return sp, docs, int(per_target.sum())


def check_oracle(data: dict):
    sp, docs, total = lut_bytes_per_doc(data)
    for ids, lut, bos_bytes in docs:
        assert lut == len(sp.decode(ids).encode("utf-8"))
        assert bos_bytes == 0
    assert total == sum(len(sp.decode(ids).encode("utf-8")) for ids, _, _ in docs)
    return len(docs), total


def test_bpb_oracle_on_the_embedded_val_split(embedded_data):
    n_docs, total = check_oracle(embedded_data)
    assert n_docs == 500 and total > 1_000_000


def test_bpb_oracle_with_another_vocab_size(small_data):
    n_docs, _ = check_oracle(small_data)
    assert n_docs == 100


def test_byte_rule_on_hard_text(small_data):
    """Byte fallback (emoji, CJK), repeated spaces, leading/trailing space, digits: LUT sum == decoded bytes."""
    sp = spm.SentencePieceProcessor(model_file=small_data["TOKENIZER_PATH"])
    luts = tg.build_byte_luts(sp, "cpu")
    for text in [
        "naïve café — 東京 🚀🚀",
        "  two  spaces\tand\ttabs ",
        "x" * 50,
        "12345 678",
        "▁ literal",
        "é",
    ]:
        ids = [tg.BOS_ID] + sp.encode(text)
        t = torch.tensor(ids)
        assert int(tg.target_bytes(t[:-1], t[1:], luts).sum()) == len(sp.decode(ids[1:]).encode("utf-8")), (
            text
        )
    assert sp.is_byte(sp.piece_to_id("<0xF0>")) and int(luts[0][sp.piece_to_id("<0xF0>")]) == 1


def test_uniform_model_gives_log2_vocab_bits_per_token(small_data):
    h = hparams(small_data)
    rt = cpu_runtime()
    sp = tg.load_tokenizer(h)
    luts = tg.build_byte_luts(sp, "cpu")
    tokens = tg.load_val_tokens(h, rt)

    def uniform(x, y):
        return torch.full(x.shape, math.log(h.model.vocab_size))

    totals = tg.evaluate(uniform, tokens, 64, 64, 8, luts, rt)
    loss, bpb = tg.loss_and_bpb(totals)
    n = tokens.numel() - 1
    nbytes = int(tg.target_bytes(tokens[:-1].long(), tokens[1:].long(), luts).sum())
    assert int(totals[2]) == n and int(totals[1]) == nbytes
    assert math.isclose(bpb, math.log2(h.model.vocab_size) * n / nbytes, rel_tol=1e-6)  # float32 ln V
