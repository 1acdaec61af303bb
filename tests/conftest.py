"""Shared fixtures: code/ on the import path, a small tokenizer trained once per session."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = os.path.join(ROOT, "code")
sys.path.insert(0, CODE)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# A little Chinese and English text, enough for a byte-level BPE of a few hundred tokens.
SENTENCES = [
    "今天天气很好，我们去公园散步。", "新华社北京１月１日电，新年好！", "人工智能是计算机科学的一个分支。",
    "你好，很高兴见到你。", "我喜欢读书和音乐。", "中国经济持续发展，人民生活水平不断提高。",
    "Hello, how are you today?", "I like reading books and listening to music.",
    "The quick brown fox jumps over the lazy dog.", "What is your name? My name is Tiny-K.",
]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from train_tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(d / "corpus.jsonl", [{"text": s} for s in SENTENCES * 20])
    train_tokenizer([corpus], str(d / "tokenizer"), vocab_size=400, min_frequency=2)
    return str(d / "tokenizer")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def tiny_config(tokenizer):
    from k_model import ModelConfig
    return ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(tokenizer), max_seq_len=64)
