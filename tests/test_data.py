"""Tokenizer, datasets (PretrainDataset, SFTDataset) and their cached index, jsonl reading, deal_dataset,
and the token ids pretokenize.py writes."""
import errno
import itertools
import json
import os
import re

import numpy as np
import pytest
import torch

from conftest import SENTENCES, write_jsonl
import dataset
import jsonl
from dataset import PretrainDataset, SFTDataset, pack_chats, trim_padding
from jsonl import DataChangedError, JsonlError
from k_model import IGNORE_INDEX, Transformer
import deal_dataset
from train_tokenizer import SYSTEM_PROMPT

SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4}


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- tokenizer

def test_special_token_ids(tokenizer):
    for token, expected in SPECIALS.items():
        assert tokenizer.convert_tokens_to_ids(token) == expected, token
    assert tokenizer.unk_token_id == 0
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == 2


def test_pad_token_is_not_an_end_token(tokenizer):
    assert tokenizer.pad_token_id == 0
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id != tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_special_tokens_in_text_are_single_ids(tokenizer):
    encoded = ids(tokenizer, "<|im_start|>user\n你好<|im_end|>\n")
    assert encoded[0] == SPECIALS["<|im_start|>"]
    assert encoded.count(SPECIALS["<|im_end|>"]) == 1
    # no <s> is added automatically (PretrainDataset adds it itself)
    assert tokenizer("你好")["input_ids"] == ids(tokenizer, "你好")
    assert SPECIALS["<s>"] not in tokenizer("你好")["input_ids"]


def test_tokenizer_files_written(tokenizer_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.isfile(os.path.join(tokenizer_dir, name)), name
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        assert "chat_template" in json.load(f)


def test_chat_template_inserts_default_system_prompt(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == ("<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
                    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    assert text == ("<|im_start|>system\n你是一个AI助手<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_chat_template_uses_explicit_system_message(tokenizer):
    messages = [{"role": "system", "content": "你是一只猫"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "喵"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert text == ("<|im_start|>system\n你是一只猫<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                    "<|im_start|>assistant\n喵<|im_end|>\n")
    assert SYSTEM_PROMPT not in text


@pytest.mark.parametrize("text", [
    "１９９８年，你好！（测试）？",
    "新华社北京１月１日电：“新年好”。",
    "Hello, world 123. 混合 English 文本！  two  spaces\nand a newline",
    "  leading spaces, a\ttab and emoji 😀 café",
])
def test_decode_encode_round_trip(tokenizer, text):
    encoded = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in encoded
    assert tokenizer.decode(encoded) == text


# ---------------------------------------------------------------- PretrainDataset

def test_pretrain_dataset_short_text(tmp_path, tokenizer):
    text = "你好，很高兴见到你。Hello!"
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": text}])
    max_length = 40
    ds = PretrainDataset(path, tokenizer, max_length=max_length)
    assert len(ds) == 1
    X, Y, mask = ds[0]
    body = ids(tokenizer, text)
    n = len(body) + 1  # <s> + text
    assert n + 1 < max_length, "test text must leave room for padding"
    assert X.shape == Y.shape == mask.shape == (max_length,)
    assert X.dtype == torch.long and Y.dtype == torch.long

    assert X[:n].tolist() == [tokenizer.bos_token_id] + body
    assert X[0].item() == tokenizer.bos_token_id
    assert X[n].item() == tokenizer.eos_token_id  # the document ends with </s>
    # mask 1 on every prediction of a real token: the text's tokens and the closing </s>
    assert mask.tolist() == [1] * n + [0] * (max_length - n)
    for t in range(max_length - 1):
        if mask[t]:
            assert Y[t].item() == X[t + 1].item()
    assert Y[n - 1].item() == tokenizer.eos_token_id
    # padding
    assert (X[n + 1:] == tokenizer.pad_token_id).all()
    assert (Y[mask == 0] == IGNORE_INDEX).all()
    assert tokenizer.decode(X[1:n].tolist()) == text


def test_pretrain_dataset_truncates_long_text(tmp_path, tokenizer):
    text = "中国经济持续发展，人民生活水平不断提高。" * 10
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": text}])
    max_length = 16
    full = [tokenizer.bos_token_id] + ids(tokenizer, text) + [tokenizer.eos_token_id]
    assert len(full) > max_length + 1
    X, Y, mask = PretrainDataset(path, tokenizer, max_length=max_length)[0]
    assert X.tolist() == full[:max_length]
    assert Y.tolist() == full[1:max_length + 1]
    assert mask.tolist() == [1] * max_length


@pytest.mark.parametrize("extra", [-3, -1, 0, 1, 2])
def test_pretrain_dataset_length_boundaries(tmp_path, tokenizer, extra):
    """<s> text </s> of length L against max_length around L - 1 (the shift eats one token)."""
    text = "我喜欢读书和音乐。"
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": text}])
    full = [tokenizer.bos_token_id] + ids(tokenizer, text) + [tokenizer.eos_token_id]
    max_length = len(full) - 1 + extra
    X, Y, mask = PretrainDataset(path, tokenizer, max_length=max_length)[0]
    n_real = min(len(full), max_length + 1)
    padded = full[:n_real] + [tokenizer.pad_token_id] * (max_length + 1 - n_real)
    exp_mask = [1] * (n_real - 1) + [0] * (max_length + 1 - n_real)
    assert X.tolist() == padded[:max_length]
    assert mask.tolist() == exp_mask
    assert Y.tolist() == [padded[t + 1] if exp_mask[t] else IGNORE_INDEX for t in range(max_length)]
    assert (tokenizer.eos_token_id in Y.tolist()) == (extra >= 0)


def test_pretrain_dataset_reads_each_line(tmp_path, tokenizer):
    texts = ["今天天气很好。", "I like music.", "人工智能是计算机科学的一个分支。"]
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    ds = PretrainDataset(path, tokenizer, max_length=64)
    assert len(ds) == 3
    for i in (2, 0, 1):  # random access by offset
        X, _, mask = ds[i]
        n = int(mask.sum())
        assert tokenizer.decode(X[1:n].tolist()) == texts[i]


# ---------------------------------------------------------------- SFTDataset

def expected_token_mask(tokenizer, messages):
    """Token ids of the chat and the mask built independently: one piece of the template at a time."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] + messages
    token_ids, mask = [], []
    for m in messages:
        header = ids(tokenizer, f"<|im_start|>{m['role']}\n")
        content = ids(tokenizer, m["content"])
        end = ids(tokenizer, "<|im_end|>")
        newline = ids(tokenizer, "\n")
        is_answer = int(m["role"] == "assistant")
        token_ids += header + content + end + newline
        mask += [0] * len(header) + [is_answer] * (len(content) + len(end)) + [0] * len(newline)
    return token_ids, mask


CHATS = [
    [{"role": "system", "content": "你是一个AI助手"}, {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "你好，很高兴见到你。"}],
    [{"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "My name is Tiny-K."},
     {"role": "user", "content": "今天天气怎么样？"}, {"role": "assistant", "content": "今天天气很好。"}],
    [{"role": "system", "content": "你是一只猫"}, {"role": "user", "content": "喵？"},
     {"role": "assistant", "content": "喵喵。"}, {"role": "user", "content": "I like music."},
     {"role": "assistant", "content": "我喜欢读书和音乐。"}],
]


@pytest.mark.parametrize("chat", CHATS)
def test_sft_mask_is_exactly_the_assistant_answers(tmp_path, tokenizer, chat):
    path = write_jsonl(tmp_path / "sft.jsonl", [chat])
    max_length = 128
    ds = SFTDataset(path, tokenizer, max_length=max_length)
    X, Y, mask = ds[0]
    token_ids, token_mask = expected_token_mask(tokenizer, chat)
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert token_ids == ids(tokenizer, text), "piecewise tokenization must equal the whole"
    assert len(token_ids) < max_length

    pad = tokenizer.pad_token_id
    padded = token_ids + [pad] * (max_length + 1 - len(token_ids))
    exp_mask = (token_mask + [0] * (max_length + 1))[1:max_length + 1]
    assert X.tolist() == padded[:max_length]
    assert mask.tolist() == exp_mask
    assert Y.tolist() == [padded[t + 1] if exp_mask[t] else IGNORE_INDEX for t in range(max_length)]

    # decoding the trained targets gives back each answer followed by <|im_end|>
    runs = [list(g) for k, g in itertools.groupby(zip(mask.tolist(), Y.tolist()), key=lambda p: p[0]) if k]
    answers = [tokenizer.decode([y for _, y in run]) for run in runs]
    assert answers == [m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant"]
    # the "\n" after each assistant <|im_end|> is not trained on
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for t in range(max_length - 1):
        if mask[t] and Y[t] == im_end:
            assert mask[t + 1] == 0


def test_sft_truncation_inside_and_before_the_answer(tmp_path, tokenizer):
    chat = CHATS[1]
    path = write_jsonl(tmp_path / "sft.jsonl", [chat])
    token_ids, token_mask = expected_token_mask(tokenizer, chat)
    first_answer = token_mask.index(1)
    for max_length in (first_answer + 2, first_answer - 1, first_answer - 4, len(token_ids) - 2):
        X, Y, mask = SFTDataset(path, tokenizer, max_length=max_length)[0]
        assert X.tolist() == token_ids[:max_length]
        assert mask.tolist() == token_mask[1:max_length + 1], max_length


def test_sft_chat_truncated_before_the_answer_has_zero_mask_and_finite_loss(tmp_path, tokenizer, tiny_config):
    chat = [{"role": "user", "content": "人工智能是计算机科学的一个分支。" * 4},
            {"role": "assistant", "content": "是的。"}]
    path = write_jsonl(tmp_path / "sft.jsonl", [chat])
    _, token_mask = expected_token_mask(tokenizer, chat)
    max_length = token_mask.index(1) - 3  # cut inside the user turn / header
    X, Y, mask = SFTDataset(path, tokenizer, max_length=max_length)[0]
    assert mask.sum().item() == 0
    assert (Y == IGNORE_INDEX).all()
    tiny_config.max_seq_len = max(tiny_config.max_seq_len, max_length)
    torch.manual_seed(0)
    model = Transformer(tiny_config)
    loss = model(X[None], Y[None]).loss
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_sft_dataset_skips_unusable_chats(tmp_path, tokenizer, capsys):
    good = CHATS[0]
    lines = [
        good,                                                                     # 1
        [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}],  # 2 unknown role
        [{"role": "user", "content": "no answer"}],                              # 3 no assistant
        {"role": "user", "content": "not a list"},                               # 4
        [{"role": "user"}, {"role": "assistant", "content": "x"}],               # 5 no content
        [],                                                                       # 6 empty chat
        CHATS[1],                                                                 # 7
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", lines)
    ds = SFTDataset(path, tokenizer, max_length=96)
    assert len(ds) == 2
    assert ds[0][0].tolist()[:10] == expected_token_mask(tokenizer, CHATS[0])[0][:10]
    assert ds[1][0].tolist()[:10] == expected_token_mask(tokenizer, CHATS[1])[0][:10]
    err = capsys.readouterr().err
    assert path in err and re.search(r"\b5\b", err.replace(path, ""))


# ---------------------------------------------------------------- the index cache beside the data

def count_index_builds(monkeypatch):
    """Count how often dataset.py indexes a file line by line (rather than reading its cached index)."""
    calls, build = [], jsonl.build_index

    def counted(*args):
        calls.append(args)
        return build(*args)
    monkeypatch.setattr(jsonl, "build_index", counted)
    return calls


def test_a_second_start_reads_the_cached_index(tmp_path, tokenizer, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "sft.jsonl", [CHATS[0], "not json", CHATS[1], CHATS[2]])
    builds = count_index_builds(monkeypatch)
    first = SFTDataset(path, tokenizer, max_length=96)
    assert len(builds) == 1 and os.path.isfile(jsonl.index_path(path))
    assert "skipped 1 unusable line(s); first at line 2" in capsys.readouterr().err

    monkeypatch.setattr(jsonl, "iter_jsonl", lambda *a: pytest.fail("the file was parsed again"))
    second = SFTDataset(path, tokenizer, max_length=96)
    assert len(builds) == 1
    assert second.offsets.tolist() == first.offsets.tolist() and len(second) == 3
    for i in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first[i], second[i]))
    # the skipped line is reported at every start, cached or not
    err = capsys.readouterr().err
    assert path in err and "skipped 1 unusable line(s); first at line 2" in err
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


@pytest.mark.parametrize("change", ["append", "same size, new mtime"])
def test_a_changed_file_rebuilds_its_index(tmp_path, tokenizer, monkeypatch, change):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "今天天气很好。"}, {"text": "你好。"}])
    builds = count_index_builds(monkeypatch)
    assert len(PretrainDataset(path, tokenizer, max_length=32)) == 2
    stat = os.stat(path)
    if change == "append":
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"text": "我喜欢读书。"}, ensure_ascii=False) + "\n")
        expected = ["今天天气很好。", "你好。", "我喜欢读书。"]
    else:  # rewritten in place: same length, another text in it
        write_jsonl(path, [{"text": "今天天气很好。"}, {"text": "再见。"}])
        assert os.path.getsize(path) == stat.st_size
        expected = ["今天天气很好。", "再见。"]
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new mtime even on a coarse clock
    ds = PretrainDataset(path, tokenizer, max_length=32)
    assert len(builds) == 2 and len(ds) == len(expected)
    for i, text in enumerate(expected):
        X, _, mask = ds[i]
        assert tokenizer.decode(X[1:int(mask.sum())].tolist()) == text
    PretrainDataset(path, tokenizer, max_length=32)
    assert len(builds) == 2  # the rebuilt index is cached in turn


def test_a_file_truncated_after_a_cached_start_is_still_named_with_its_line(tmp_path, tokenizer, monkeypatch):
    texts = [f"{s} {i}" for i, s in enumerate(SENTENCES)]
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    PretrainDataset(path, tokenizer, max_length=32)
    builds = count_index_builds(monkeypatch)
    ds = PretrainDataset(path, tokenizer, max_length=32)  # from the cached index
    assert len(builds) == 0
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 + 3)  # mid-line
    with pytest.raises(DataChangedError, match=re.escape(path) + r": line \d+ cannot be read: the file changed"):
        for i in range(len(ds)):
            ds[i]
    # the next start sees another size: it indexes the file again and keeps only the whole lines
    assert 0 < len(PretrainDataset(path, tokenizer, max_length=32)) < len(texts) and len(builds) == 1


def test_a_read_only_data_directory_still_works(tmp_path, tokenizer, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    path = write_jsonl(data / "sft.jsonl", [CHATS[0], CHATS[1]])
    data.chmod(0o555)
    try:
        if os.access(data, os.W_OK):  # root writes anyway: make the write fail as a read-only directory would
            def read_only(*args, **kwargs):
                raise PermissionError(errno.EACCES, "Permission denied")
            monkeypatch.setattr(jsonl.tempfile, "mkstemp", read_only)
        builds = count_index_builds(monkeypatch)
        for start in (1, 2):
            ds = SFTDataset(path, tokenizer, max_length=96)
            assert len(ds) == 2 and ds[1][0].tolist()[:10] == expected_token_mask(tokenizer, CHATS[1])[0][:10]
            warnings = [line for line in capsys.readouterr().err.splitlines() if "index" in line]
            assert len(warnings) == 1 and jsonl.index_path(path) in warnings[0], warnings
            assert len(builds) == start  # indexed in memory at every start
        assert sorted(os.listdir(data)) == ["sft.jsonl"]
    finally:
        data.chmod(0o755)


def test_a_failed_or_torn_index_write_is_never_read(tmp_path, tokenizer, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "今天天气很好。"}, {"text": "你好。"}])
    cache = jsonl.index_path(path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(jsonl.np, "savez", disk_full)
        assert len(PretrainDataset(path, tokenizer, max_length=32)) == 2
    assert sorted(os.listdir(tmp_path)) == ["p.jsonl"]  # no index, no temporary file left behind
    assert "No space left on device" in capsys.readouterr().err
    # an index cut short (e.g. copied half-way) is rebuilt, not read
    PretrainDataset(path, tokenizer, max_length=32)
    with open(cache, "r+b") as f:
        f.truncate(os.path.getsize(cache) // 2)
    builds = count_index_builds(monkeypatch)
    assert len(PretrainDataset(path, tokenizer, max_length=32)) == 2 and len(builds) == 1
    assert len(PretrainDataset(path, tokenizer, max_length=32)) == 2 and len(builds) == 1


# ---------------------------------------------------------------- bad input

def test_dataset_skips_bad_lines_with_one_warning(tmp_path, tokenizer, capsys):
    path = tmp_path / "bad.jsonl"
    good = ["今天天气很好。", "你好。", "I like music.", "我喜欢读书。"]
    write_jsonl(path, [
        {"text": good[0]},          # 1
        '{"text": "unterminated',   # 2 malformed JSON
        {"text": good[1]},          # 3
        {"content": "no text"},     # 4 missing "text"
        {"text": good[2]},          # 5
        {"text": "   "},            # 6 empty text
        {"text": good[3]},          # 7
        "",                          # 8 blank: ignored silently
    ])
    path = str(path)
    capsys.readouterr()
    ds = PretrainDataset(path, tokenizer, max_length=32)
    assert len(ds) == len(good)
    for i, text in enumerate(good):
        X, _, mask = ds[i]
        assert tokenizer.decode(X[1:int(mask.sum())].tolist()) == text

    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if path in line]
    assert len(warnings) == 1, err
    rest = warnings[0].replace(path, "")
    assert re.search(r"\b3\b", rest), rest  # the count
    for lineno in (2, 4, 6):
        assert re.search(rf"\b{lineno}\b", rest), (lineno, rest)
    # good and blank lines are not named (exception details in parentheses aside)
    listed = re.sub(r"\((?:[^()]|\([^()]*\))*\)", "", rest)
    for lineno in (1, 5, 7, 8):
        assert not re.search(rf"\b{lineno}\b", listed), (lineno, listed)


def test_dataset_reads_crlf_lines_and_skips_invalid_utf8(tmp_path, tokenizer, capsys):
    path = tmp_path / "crlf.jsonl"
    texts = ["今天天气很好。", "I like music."]
    with open(path, "wb") as f:
        f.write(json.dumps({"text": texts[0]}, ensure_ascii=False).encode("utf-8") + b"\r\n")
        f.write(b'{"text": "\xff\xfe broken"}\r\n')
        f.write(json.dumps({"text": texts[1]}).encode("utf-8") + b"\r\n")
    ds = PretrainDataset(str(path), tokenizer, max_length=32)
    assert len(ds) == 2
    for i in (1, 0):
        X, _, mask = ds[i]
        assert tokenizer.decode(X[1:int(mask.sum())].tolist()) == texts[i]
    err = capsys.readouterr().err
    assert str(path) in err and re.search(r"\b2\b", err.replace(str(path), ""))


def test_dataset_file_without_usable_lines_raises(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "empty.jsonl", ['{"oops"', {"text": ""}, {"nottext": 1}])
    with pytest.raises(JsonlError, match=re.escape(path)):
        PretrainDataset(path, tokenizer, max_length=16)
    empty = write_jsonl(tmp_path / "really_empty.jsonl", [])
    with pytest.raises(JsonlError, match=re.escape(empty)):
        SFTDataset(empty, tokenizer, max_length=16)


def test_dataset_missing_file_raises(tmp_path, tokenizer):
    path = str(tmp_path / "does_not_exist.jsonl")
    with pytest.raises(JsonlError, match=re.escape(path)):
        PretrainDataset(path, tokenizer, max_length=16)
    with pytest.raises(JsonlError, match=re.escape(path)):
        SFTDataset(path, tokenizer, max_length=16)


# ---------------------------------------------------------------- deal_dataset helpers

def test_belle_to_chat():
    record = {"conversations": [{"from": "human", "value": " 你好 "}, {"from": "assistant", "value": "你好！"},
                                {"from": "human", "value": "再见"}, {"from": "assistant", "value": "再见。"}]}
    assert deal_dataset.belle_to_chat(record) == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "再见"}, {"role": "assistant", "content": "再见。"},
    ]


def test_belle_to_chat_rejects_unknown_role_and_missing_answer():
    with pytest.raises(ValueError, match="robot"):
        deal_dataset.belle_to_chat({"conversations": [{"from": "robot", "value": "x"},
                                                      {"from": "assistant", "value": "y"}]})
    with pytest.raises(ValueError):
        deal_dataset.belle_to_chat({"conversations": [{"from": "human", "value": "x"}]})


# ---------------------------------------------------------------- deal_dataset main

def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def interleave(train, val, val_every):
    """Undo write_split: record i went to val when i % val_every == val_every - 1."""
    out, t, v = [], iter(train), iter(val)
    for i in range(len(train) + len(val)):
        out.append(next(v) if i % val_every == val_every - 1 else next(t))
    return out


def test_main_pretrain_writes_chunked_train_and_val(tmp_path, capsys):
    long_text = "".join(chr(0x4E00 + (i * 13) % 800) for i in range(1200))
    short = "今天天气很好。"
    src = write_jsonl(tmp_path / "seq_monkey.jsonl", [{"text": long_text}, "{broken", {"text": short}])
    out = str(tmp_path / "out" / "pretrain.jsonl")
    deal_dataset.main(["--pretrain_src", src, "--pretrain_out", out, "--val_every", "3"])
    val = str(tmp_path / "out" / "pretrain_val.jsonl")
    assert os.path.isfile(out) and os.path.isfile(val)
    train_texts = [r["text"] for r in read_lines(out)]
    val_texts = [r["text"] for r in read_lines(val)]
    assert all(len(t) <= 512 for t in train_texts + val_texts)
    assert len(val_texts) >= 1
    expected = [long_text[:512], long_text[512:1024], long_text[1024:], short]
    assert interleave(train_texts, val_texts, 3) == expected
    assert sorted(os.listdir(tmp_path / "out")) == ["pretrain.jsonl", "pretrain_val.jsonl"]
    assert src in capsys.readouterr().err  # the broken line was reported


def test_main_pretrain_without_usable_line_exits_and_keeps_output(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", ["{broken", {"text": ""}])
    out = tmp_path / "pretrain.jsonl"
    out.write_text("old content\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        deal_dataset.main(["--pretrain_src", src, "--pretrain_out", str(out), "--val_every", "3"])
    assert src in str(exc.value.code)
    assert out.read_text(encoding="utf-8") == "old content\n"
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "pretrain.jsonl"]


def test_main_pretrain_missing_source_exits(tmp_path):
    src = str(tmp_path / "missing.jsonl")
    out = tmp_path / "pretrain.jsonl"
    with pytest.raises(SystemExit) as exc:
        deal_dataset.main(["--pretrain_src", src, "--pretrain_out", str(out)])
    assert src in str(exc.value.code)
    assert not out.exists()


def test_main_pretrain_val_every_zero_puts_everything_in_train(tmp_path):
    texts = ["今天天气很好。", "你好。", "I like music."]
    src = write_jsonl(tmp_path / "src.jsonl", [{"text": t} for t in texts])
    out = str(tmp_path / "pretrain.jsonl")
    deal_dataset.main(["--pretrain_src", src, "--pretrain_out", out, "--val_every", "0"])
    assert [r["text"] for r in read_lines(out)] == texts
    assert not (tmp_path / "pretrain_val.jsonl").exists()


BELLE = [
    {"conversations": [{"from": "human", "value": "你好"}, {"from": "assistant", "value": "你好！"}]},
    {"conversations": [{"from": "human", "value": "1+1=?"}, {"from": "assistant", "value": "2"},
                       {"from": "human", "value": "2+2=?"}, {"from": "assistant", "value": "4"}]},
    {"conversations": [{"from": "robot", "value": "?"}, {"from": "assistant", "value": "!"}]},
    {"conversations": [{"from": "human", "value": "今天天气怎么样？"}, {"from": "assistant", "value": "很好。"}]},
    {"conversations": [{"from": "human", "value": "再见"}, {"from": "assistant", "value": "再见。"}]},
]


def test_main_sft_writes_chats_with_system_prompt(tmp_path):
    src = write_jsonl(tmp_path / "belle.json", BELLE + ["not json"])
    out = str(tmp_path / "sft.jsonl")
    deal_dataset.main(["--sft_src", src, "--sft_out", out, "--val_every", "3"])
    train, val = read_lines(out), read_lines(str(tmp_path / "sft_val.jsonl"))
    role = {"human": "user", "assistant": "assistant"}
    expected = [[{"role": "system", "content": SYSTEM_PROMPT}]
                + [{"role": role[t["from"]], "content": t["value"]} for t in r["conversations"]]
                for r in BELLE if r["conversations"][0]["from"] != "robot"]
    assert len(val) == 1
    assert interleave(train, val, 3) == expected


def test_main_sft_without_usable_line_exits_and_keeps_output(tmp_path):
    src = write_jsonl(tmp_path / "belle.json", [BELLE[2], "not json"])
    out = tmp_path / "sft.jsonl"
    val = tmp_path / "sft_val.jsonl"
    out.write_text("old sft\n", encoding="utf-8")
    val.write_text("old val\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        deal_dataset.main(["--sft_src", src, "--sft_out", str(out), "--val_every", "3"])
    assert src in str(exc.value.code)
    assert out.read_text(encoding="utf-8") == "old sft\n"
    assert val.read_text(encoding="utf-8") == "old val\n"
    assert sorted(os.listdir(tmp_path)) == ["belle.json", "sft.jsonl", "sft_val.jsonl"]


# ---------------------------------------------------------------- demo corpora

def test_chatterbot_records_alternate_user_and_assistant():
    records = list(deal_dataset.chatterbot_records())
    assert records
    for chat in records:
        assert chat[0] == {"role": "system", "content": SYSTEM_PROMPT}
        turns = chat[1:]
        assert turns and len(turns) % 2 == 0
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert all(isinstance(m["content"], str) and m["content"].strip() == m["content"] != ""
                   for m in turns)


# ---------------------------------------------------------------- packed SFT batches

def test_pack_chats_keeps_every_chat_whole_in_fewer_tokens(tmp_path, tokenizer):
    # one long chat and five short ones: padding makes six rows as long as the long one
    chats = [[{"role": "system", "content": ""}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [(" ".join(SENTENCES[:5]), "是的。"), ("你好", "你好。"), ("Hi", "Hello."), ("我喜欢读书。", "我也是。"),
                          ("Name?", "Tiny-K."), ("好", "好。")]]
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", chats), tokenizer, max_length=200)
    batch = [ds[i] for i in range(len(ds))]
    lengths = [int((y != IGNORE_INDEX).nonzero().max()) + 1 for _, y, _ in batch]
    assert lengths[0] > 100 and sum(lengths[1:]) <= 200, lengths
    X, Y, mask = pack_chats(batch, max_length=200)
    assert X.shape == Y.shape == mask.shape and X.shape[0] == 2 and X.shape[1] <= 200
    assert X.numel() < trim_padding(batch)[0].numel() / 2
    # every chat's trained (input, label) pairs sit in one row, contiguous and in order
    for x, y, m in batch:
        last = int((y != IGNORE_INDEX).nonzero().max()) + 1
        found = [r for r in range(len(X)) for s in range(X.shape[1] - last + 1)
                 if X[r, s:s + last].tolist() == x[:last].tolist() and Y[r, s:s + last].tolist() == y[:last].tolist()]
        assert found, "a chat was split or changed"
    assert int((Y != IGNORE_INDEX).sum()) == sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in batch)
    assert int(mask.sum()) == sum(int(m.sum()) for _, _, m in batch)


def test_split_cjk_tokenizer_gives_one_token_per_chinese_character(tmp_path):
    from train_tokenizer import load_tokenizer, train_tokenizer
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "明月几时有，明月光。明月。Hello world, hello."}] * 50)
    for split, merged in ((False, True), (True, False)):
        out = str(tmp_path / f"tok{split}")
        train_tokenizer([corpus], out, vocab_size=300, min_frequency=2, split_cjk=split)
        tok = load_tokenizer(out)
        pieces = [tok.decode([i]) for i in ids(tok, "明月光 hello")]
        assert any(len(p) > 1 and "\u4e00" <= p[0] <= "\u9fff" for p in pieces) == merged, pieces
        if split:
            assert pieces[:3] == ["明", "月", "光"] and tok.decode(ids(tok, "明月光 hello")) == "明月光 hello"
            # English still merges: only Chinese characters are kept apart
            assert len(ids(tok, "hello")) < len("hello")
            # no merge crosses a character, so GPT-2's coarser split (llama.cpp's for the GGUF
            # export) gives the same tokens
            from tokenizers import Tokenizer, pre_tokenizers
            gpt2 = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
            gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            for text in ["明月几时有，明月光。", "Hello world, 明月 hello!", *SENTENCES]:
                assert gpt2.encode(text).ids == ids(tok, text), text


# ---------------------------------------------------------------- pretokenize: the token file

# texts where a tokenizer's normalizer, special tokens or whitespace handling could tell two encoders apart
TRICKY = ["e\u0301t\u00e9 \u212b \uff11\uff19\uff19\uff18\u5e74", "\u4f60\u597d<|im_end|>\u4e16\u754c<s></s>",
          "  two  spaces\tand a tab\r\nCRLF inside 😀 café", "x" * 3000 + "\u4e2d\u6587" * 700, "\n\n  x  \n"]


@pytest.mark.parametrize("split_cjk", [False, True])
def test_pretokenize_writes_the_tokenizers_own_ids(tokenizer_dir, tmp_path, split_cjk):
    """The token file is <s> ids </s> per document, each with exactly the ids tokenizer(text) gives."""
    from pretokenize import pretokenize
    from train_tokenizer import load_tokenizer, train_tokenizer
    if split_cjk:
        corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": s} for s in SENTENCES * 20])
        tokenizer_dir = str(tmp_path / "tokenizer_cjk")
        train_tokenizer([corpus], tokenizer_dir, vocab_size=400, min_frequency=2, split_cjk=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    texts = (SENTENCES + TRICKY) * 150  # more than one batch of LINES_PER_TASK, so the order across tasks counts
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts[:700]] + ["{broken", ""]
                      + [{"text": t} for t in texts[700:]])
    meta = pretokenize(src, tokenizer_dir, str(tmp_path / "docs.bin"), num_proc=2)
    expected = [i for t in texts for i in [tokenizer.bos_token_id, *ids(tokenizer, t), tokenizer.eos_token_id]]
    assert np.fromfile(tmp_path / "docs.bin", dtype=np.uint16).tolist() == expected
    assert meta["n_docs"] == len(texts) and meta["n_tokens"] == len(expected)
