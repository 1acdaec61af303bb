"""Fast training data: the token file, packed windows, length-grouped SFT batches, the
benchmark's smoke run, and a 2-node torchrun job on 127.0.0.1."""
import argparse
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import SENTENCES, write_jsonl

DOCS = [s * (i % 3 + 1) for i, s in enumerate(SENTENCES)]


@pytest.fixture
def token_file(tokenizer_dir, tmp_path):
    from pretokenize import pretokenize
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS] + ["{broken"])
    out = str(tmp_path / "docs.bin")
    meta = pretokenize(src, tokenizer_dir, out, num_proc=2)
    return out, meta


def test_token_file_round_trips_to_the_documents(token_file, tokenizer):
    path, meta = token_file
    tokens = np.fromfile(path, dtype=np.uint16)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tokenizer)
    assert meta["n_tokens"] == len(tokens) and meta["n_docs"] == len(DOCS)
    # documents are <s> text </s>, back to back
    ends = np.flatnonzero(tokens == tokenizer.eos_token_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert len(ends) == len(DOCS) and ends[-1] == len(tokens) - 1
    assert all(tokens[s] == tokenizer.bos_token_id for s in starts)
    decoded = [tokenizer.decode(tokens[s + 1:e].tolist()) for s, e in zip(starts, ends)]
    assert decoded == DOCS


def test_pretokenize_refuses_unusable_input_and_keeps_the_old_file(tokenizer_dir, tmp_path):
    import pretokenize
    src = write_jsonl(tmp_path / "bad.jsonl", ["{broken", {"text": ""}])
    out = tmp_path / "bad.bin"
    out.write_bytes(b"old")
    with pytest.raises(SystemExit) as info:
        pretokenize.main(["--data_path", src, "--tokenizer_path", tokenizer_dir, "--out_path", str(out)])
    assert src in str(info.value.code)
    assert out.read_bytes() == b"old" and not list(tmp_path.glob("*.tmp*"))


def test_pretokenize_names_a_missing_file(tokenizer_dir, tmp_path):
    import pretokenize
    with pytest.raises(SystemExit) as info:
        pretokenize.main(["--data_path", str(tmp_path / "nope.jsonl"), "--tokenizer_path", tokenizer_dir])
    assert info.value.code == f"error: {tmp_path / 'nope.jsonl'}: file not found"


def test_packed_windows_cover_the_stream_once_and_split_across_ranks(token_file, tokenizer_dir):
    from dataset import PackedDataset
    path, meta = token_file
    tokens = np.fromfile(path, dtype=np.uint16).astype(np.int64)
    ds = PackedDataset(path, max_length=16, tokenizer_path=tokenizer_dir)
    assert len(ds) == (meta["n_tokens"] - 1) // 16
    X = torch.cat([ds[i][0] for i in range(len(ds))])
    Y = torch.cat([ds[i][1] for i in range(len(ds))])
    assert X.tolist() == tokens[:len(ds) * 16].tolist()   # each token once as input, no overlap
    assert Y.tolist() == tokens[1:len(ds) * 16 + 1].tolist()
    assert all(bool(ds[i][2].all()) for i in range(len(ds)))  # no padding: every position trained

    # the trainer's sampler: each rank its own windows, the same ones for the same seed
    from harness import make_loader
    args = argparse.Namespace(num_workers=0, batch_size=1, seed=3)
    def shard(rank):
        _, epoch_loader = make_loader(ds, args, SimpleNamespace(rank=rank, world_size=2, device_type="cpu"), False)
        return list(epoch_loader(0).sampler)
    shards = [shard(0), shard(1)]
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == len(ds) // 2 * 2  # an odd window out is dropped, not repeated
    assert shards[0] == shard(0)


def test_packed_dataset_refuses_other_tokenizer_and_truncated_file(token_file, tmp_path, tokenizer_dir):
    from dataset import PackedDataset
    path, _ = token_file
    other = tmp_path / "other_tok"
    other.mkdir()
    (other / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="another tokenizer"):
        PackedDataset(path, 16, tokenizer_path=str(other))
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="truncated"):
        PackedDataset(path, 16, tokenizer_path=tokenizer_dir)


def test_padded_and_packed_paths_give_the_same_loss_without_padding(tokenizer, tokenizer_dir, tmp_path):
    from dataset import PackedDataset, PretrainDataset
    from k_model import ModelConfig, Transformer
    from pretokenize import pretokenize
    text = "".join(SENTENCES)  # long enough to fill a window: the padded path has no padding
    src = write_jsonl(tmp_path / "long.jsonl", [{"text": text}])
    pretokenize(src, tokenizer_dir, str(tmp_path / "long.bin"), num_proc=1)
    padded = PretrainDataset(src, tokenizer, max_length=32)[0]
    packed = PackedDataset(str(tmp_path / "long.bin"), max_length=32)[0]
    assert bool(padded[2].all())
    for a, b in zip(padded, packed):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(tokenizer),
                                    max_seq_len=32))
    loss_padded = model(padded[0][None], padded[1][None]).loss
    loss_packed = model(packed[0][None], packed[1][None]).loss
    assert torch.equal(loss_padded, loss_packed)


def test_trimmed_sft_batch_has_the_same_loss(tokenizer, tmp_path):
    from dataset import SFTDataset, trim_padding
    from k_model import ModelConfig, Transformer
    chats = [[{"role": "user", "content": s}, {"role": "assistant", "content": s[::-1]}] for s in SENTENCES[:4]]
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", chats), tokenizer, max_length=120)
    batch = [ds[i] for i in range(len(ds))]
    X, Y, mask = trim_padding(batch)
    full = [torch.stack(c) for c in zip(*batch)]
    assert X.shape[1] < full[0].shape[1]
    assert int(mask.sum()) == int(full[2].sum())
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(tokenizer),
                                    max_seq_len=120))
    torch.testing.assert_close(model(X, Y).loss, model(full[0], full[1]).loss)


def test_bench_smoke_prints_the_three_tables(tokenizer_dir, tmp_path, capsys):
    import bench_train
    src = write_jsonl(tmp_path / "corpus.jsonl", [{"text": s} for s in SENTENCES * 8])
    bench_train.main(["--smoke", "--data_path", src, "--tokenizer_path", tokenizer_dir, "--device", "cpu"])
    out = capsys.readouterr().out
    for title in ("1. real tokens/s", "2. train step", "3. model FLOP/s"):
        assert title in out
    ratio_lines = [line for line in out.splitlines() if line.rstrip().endswith("x")]
    assert len(ratio_lines) >= 3 + 4  # three data paths, four model rows
    assert any(line.strip().endswith("%") and "float32" in line for line in out.splitlines())
