"""The real corpora at small scale: sampling for the tokenizer, memory that does not grow with the
input, and the per-epoch index of the sampler (tests/scale_check.py is the full-size version)."""
import json
import os

import pytest
import torch
from torch.utils.data import DistributedSampler

from conftest import SENTENCES, write_jsonl
from scale_check import TextMaker, make_belle, make_seq_monkey, python, run_step


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("src") / "source.jsonl", [{"text": s} for s in SENTENCES])


def numbered_corpus(path, n_lines):
    """Line i says which line it is, so a sample shows where in the file it was taken."""
    return write_jsonl(path, [{"text": f"第{i:06d}行，今天天气很好。"} for i in range(n_lines)])


def line_numbers(texts):
    return [int(t[1:7]) for t in texts]


def test_sample_is_spread_over_the_whole_file(tmp_path, capsys):
    from train_tokenizer import sample_texts_from_jsonl
    path = numbered_corpus(tmp_path / "c.jsonl", 20_000)  # 20,000 lines of 16 characters
    texts = list(sample_texts_from_jsonl(path, max_chars=16 * 1000, n_spans=100))
    numbers = line_numbers(texts)
    # about max_chars: each of the 100 places gives its share, at most one line more
    assert all(len(t) == 16 for t in texts) and 1000 <= len(texts) <= 1100
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)  # whole lines, each once
    # ten lines from each hundredth of the file: the start, the middle and the end are all there
    per_hundredth = [sum(1 for n in numbers if k * 200 <= n < (k + 1) * 200) for k in range(100)]
    assert min(per_hundredth) >= 9 and max(per_hundredth) <= 11
    assert "spread over" in capsys.readouterr().out


def test_small_corpus_is_read_whole_and_in_order(tmp_path):
    from train_tokenizer import texts_for_training
    a = numbered_corpus(tmp_path / "a.jsonl", 50)
    b = write_jsonl(tmp_path / "b.jsonl", [[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]])
    texts = list(texts_for_training([a, b], max_chars=os.path.getsize(a) + os.path.getsize(b)))
    assert line_numbers(texts[:-1]) == list(range(50)) and texts[-1] == "你好\n你好！"


def test_sample_shares_follow_file_sizes_and_skip_bad_lines(tmp_path, capsys):
    from train_tokenizer import texts_for_training
    big = numbered_corpus(tmp_path / "big.jsonl", 3000)
    small = write_jsonl(tmp_path / "small.jsonl", ['{"text": "坏行', *[{"text": "小文件的一行。"}] * 1000])
    texts = list(texts_for_training([big, small], max_chars=9000))
    from_small = sum(len(t) for t in texts if t.startswith("小"))
    share_small = os.path.getsize(small) / (os.path.getsize(big) + os.path.getsize(small))
    assert abs(from_small / sum(map(len, texts)) - share_small) < 0.05
    assert "skipped 1 unusable line" in capsys.readouterr().out


def test_max_chars_flag_is_checked():
    import subprocess
    import sys
    done = subprocess.run(python("train_tokenizer.py", "--max_chars", "-1"), capture_output=True, text=True)
    assert done.returncode == 2 and "--max_chars must be >= 0" in done.stderr


def corpora(tmp_path, source, mb):
    maker = TextMaker(source, seed=0)
    make_seq_monkey(maker, str(tmp_path / "raw.jsonl"), mb << 20)
    make_belle(maker, str(tmp_path / "belle.json"), (mb << 20) // 4)
    return str(tmp_path / "raw.jsonl"), str(tmp_path / "belle.json")


@pytest.fixture(scope="module")
def small_and_large(tmp_path_factory, source):
    """The same kind of corpus at 3 MB and at 12 MB, converted by deal_dataset.py (memory measured)."""
    out = {}
    for mb in (3, 12):
        d = tmp_path_factory.mktemp(f"c{mb}")
        raw, belle = corpora(d, source, mb)
        _, pretrain_peak, _ = run_step(python("deal_dataset.py", "--pretrain_src", raw, "--pretrain_out", d / "pretrain.jsonl"))
        _, sft_peak, _ = run_step(python("deal_dataset.py", "--sft_src", belle, "--sft_out", d / "sft.jsonl"))
        out[mb] = dict(dir=d, pretrain=str(d / "pretrain.jsonl"), deal_pretrain=pretrain_peak, deal_sft=sft_peak)
    return out


def assert_flat(small, large, what):
    """Four times the input may not cost more than 10% (+30 MB for noise) more memory."""
    assert large <= small * 1.10 + (30 << 20), f"{what}: {small / 2**20:.0f} MB -> {large / 2**20:.0f} MB"


def test_synthetic_corpora_have_the_real_shapes(small_and_large):
    with open(small_and_large[3]["pretrain"], encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    assert len(docs) > 500 and max(map(len, docs)) <= 512  # cut to --chunk_size
    assert len(set(docs)) > 0.99 * len(docs)  # new text throughout, as in a real corpus
    with open(small_and_large[3]["dir"] / "sft.jsonl", encoding="utf-8") as f:
        chat = json.loads(f.readline())
    assert chat[0]["role"] == "system" and chat[1]["role"] == "user" and chat[2]["role"] == "assistant"


def test_conversion_memory_does_not_grow_with_the_input(small_and_large):
    small, large = small_and_large[3], small_and_large[12]
    assert_flat(small["deal_pretrain"], large["deal_pretrain"], "deal_dataset --pretrain_src")
    assert_flat(small["deal_sft"], large["deal_sft"], "deal_dataset --sft_src")


def test_tokenizer_memory_is_bounded_by_max_chars(small_and_large, tmp_path):
    peaks = {}
    for mb, c in small_and_large.items():
        _, peaks[mb], _ = run_step(python("train_tokenizer.py", "--data_path", c["pretrain"], "--save_dir",
                                          tmp_path / f"tok{mb}", "--vocab_size", 600, "--max_chars", 300_000))
    assert_flat(peaks[3], peaks[12], "train_tokenizer --max_chars 300000")
    assert os.path.isfile(tmp_path / "tok12" / "tokenizer.json")


def test_pretokenize_memory_does_not_grow_with_the_input(small_and_large, tokenizer_dir, tmp_path):
    peaks = {}
    for mb, c in small_and_large.items():
        _, peaks[mb], _ = run_step(python("pretokenize.py", "--data_path", c["pretrain"], "--tokenizer_path", tokenizer_dir,
                                          "--out_path", tmp_path / f"{mb}.bin", "--num_proc", 1))
    assert_flat(peaks[3], peaks[12], "pretokenize")
    assert os.path.getsize(tmp_path / "12.bin") > 3 * os.path.getsize(tmp_path / "3.bin")


# ---------------------------------------------------------------- the sampler's index

@pytest.mark.parametrize("n,world_size", [(10, 3), (9, 3), (101, 4), (7, 1)])
def test_shard_sampler_gives_distributed_samplers_order(n, world_size):
    from dataset import ShardSampler
    for rank in range(world_size):
        for epoch in (0, 3):
            reference = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=7, drop_last=True)
            reference.set_epoch(epoch)
            assert list(ShardSampler(n, world_size, rank, seed=7, epoch=epoch)) == list(reference)
            assert list(ShardSampler(n, world_size, rank, seed=7, epoch=epoch, start=2)) == list(reference)[2:]


def test_shard_sampler_holds_eight_bytes_per_index_of_its_shard():
    from dataset import ShardSampler
    sampler = ShardSampler(1_000_003, world_size=4, rank=1, seed=0)
    assert len(sampler) == 250_000 and sampler.indices.dtype == torch.int64
    assert sampler.indices.untyped_storage().nbytes() == 8 * 250_000  # the shard only, not the whole permutation
