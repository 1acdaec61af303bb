"""Train the byte-level BPE tokenizer of chapter 5.2 and save it for AutoTokenizer.

    python code/train_tokenizer.py --data_path data/demo_pretrain.jsonl --save_dir tokenizer_k --vocab_size 6144

Reads jsonl lines with a "text" field (pretraining) or a chat (a list of {"role", "content"}
messages, as deal_dataset.py writes them); several --data_path files may be given.
A corpus larger than --max_chars is sampled: whole lines read at SAMPLE_SPANS places spread
evenly over each file (by byte offset, streaming), so memory stays bounded and the sample
covers the whole corpus, not just its first lines.
"""
import argparse
import json
import os
import sys
import time
from typing import Iterator, List

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from cli import HelpFormatter
from jsonl import JsonlError, read_jsonl, text_of

# ---- hyperparameters (CLI flags override) ----
DATA_PATH = "data/demo_pretrain.jsonl"
SAVE_DIR = "tokenizer_k"
VOCAB_SIZE = 6144
MIN_FREQUENCY = 2  # a pair must occur at least twice to be merged
# The BPE trainer keeps every distinct pre-tokenized "word" in memory, and in Chinese almost every
# clause is one, so its memory grows with the text it reads: ~0.25 GB per million characters of
# all-new clauses (tests/scale_check.py). 10M characters (~30 MB of Chinese) train in < 3 GB and
# a few minutes, and already hold thousands of occurrences of every common character.
MAX_CHARS = 10_000_000
SAMPLE_SPANS = 1000  # the sample is read at this many places spread over each file

# Special tokens and the ids they must get (checked after training).
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
UNK, BOS, EOS, IM_START, IM_END = SPECIAL_TOKENS
# Byte-level BPE never produces <unk>, so it is free to serve as padding; pad must not be
# eos or <|im_end|>, or a loss that ignores padding would also ignore the end of every answer.
PAD = UNK

# One system prompt for training data and inference alike: the chat template inserts it
# when a conversation has none (the chapter trained and sampled with different ones).
SYSTEM_PROMPT = "你是一个AI助手"

# ChatML: <|im_start|>role\ncontent<|im_end|>\n for every turn.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def text_of_line(record) -> str:
    """The text to learn from: "text" of a pretraining line, the contents of a chat."""
    if isinstance(record, dict):
        return text_of(record)
    if isinstance(record, list) and record and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                   for m in record):
        return "\n".join(m["content"] for m in record)
    raise ValueError('expected {"text": ...} or a list of {"role", "content"} messages')


def read_texts_from_jsonl(data_path: str) -> Iterator[str]:
    """Yield the text of each usable line of the whole file."""
    yield from read_jsonl(data_path, text_of_line)


def sample_texts_from_jsonl(data_path: str, max_chars: int, n_spans: int = SAMPLE_SPANS) -> Iterator[str]:
    """About max_chars characters of text from whole lines spread over the file: the file is cut
    into n_spans equal byte ranges, and each range gives its share from its first full line on.
    Never holds more than one line in memory. Unusable lines are skipped and counted."""
    size = os.path.getsize(data_path)
    n_spans = max(1, min(n_spans, max_chars // 100))  # a few lines at least from each place
    share = max_chars / n_spans
    n_chars = n_lines = n_bad = 0
    t0 = time.time()
    with open(data_path, "rb") as f:
        for span in range(n_spans):
            start, end = size * span // n_spans, size * (span + 1) // n_spans
            f.seek(start)
            if start:
                f.readline()  # a line that begins in the previous range was read there
            taken = 0
            while f.tell() < end and taken < share:
                raw = f.readline()
                if not raw:
                    break
                if not raw.strip():
                    continue
                try:
                    text = text_of_line(json.loads(raw))
                except (ValueError, KeyError, TypeError):
                    n_bad += 1
                    continue
                taken += len(text)
                n_lines += 1
                yield text
            n_chars += taken
    print(f"sampled {n_chars / 1e6:.1f}M characters ({n_lines:,} lines) at {n_spans} places spread over "
          f"{data_path} ({size / 1e9:.2f} GB) in {time.time() - t0:.0f} s"
          + (f"; skipped {n_bad} unusable line(s)" if n_bad else ""))
    if n_lines == 0:
        raise JsonlError(f"{data_path}: no usable line in the sample (expected one JSON record per line)")


def texts_for_training(data_paths: List[str], max_chars: int = MAX_CHARS) -> Iterator[str]:
    """Every file whole if together they are small (bytes <= max_chars means chars <= max_chars),
    else a sample of each, its share of max_chars in proportion to its size."""
    sizes = [os.path.getsize(path) if os.path.isfile(path) else 0 for path in data_paths]
    for path, size in zip(data_paths, sizes):
        if not max_chars or sum(sizes) <= max_chars or not size:
            yield from read_texts_from_jsonl(path)  # raises JsonlError for a missing file
        else:
            yield from sample_texts_from_jsonl(path, max(1, max_chars * size // sum(sizes)))


def build_tokenizer(split_cjk: bool = False) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # NFC, not the chapter's NFKC: NFKC folds full-width Chinese punctuation and digits to
    # ASCII (，？！１ -> ,?!1), so decode(encode(text)) would not give ordinary Chinese back.
    tokenizer.normalizer = normalizers.NFC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_cjk:
        # every Chinese character a word of its own: merges stay inside one character, so a token
        # is one character (明月 is 明 + 月) and a small model can count the 5 or 7 of a line.
        # No merge crosses a character, so GPT-2's coarser split (llama.cpp) gives the same tokens.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(data_paths: List[str], save_dir: str, vocab_size: int = VOCAB_SIZE,
                    min_frequency: int = MIN_FREQUENCY, max_chars: int = MAX_CHARS, split_cjk: bool = False) -> None:
    """Train and save the tokenizer (tokenizer.json + tokenizer_config.json + special_tokens_map.json)."""
    if isinstance(data_paths, str):
        data_paths = [data_paths]
    tokenizer = build_tokenizer(split_cjk)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        min_frequency=min_frequency,
        show_progress=sys.stderr.isatty(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    print(f"Training tokenizer on {', '.join(data_paths)}")
    t0 = time.time()
    tokenizer.train_from_iterator(texts_for_training(data_paths, max_chars), trainer=trainer)
    print(f"trained in {time.time() - t0:.0f} s, peak memory {peak_rss_gb():.2f} GB")

    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual = tokenizer.token_to_id(token)
        assert actual == expected_id, f"{token} got id {actual}, expected {expected_id}"

    os.makedirs(save_dir, exist_ok=True)
    tokenizer.save(os.path.join(save_dir, "tokenizer.json"))
    create_tokenizer_config(save_dir)
    print(f"Tokenizer saved to {save_dir}")


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (the trainer's Rust memory included)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, kB on Linux


def create_tokenizer_config(save_dir: str) -> None:
    """Write tokenizer_config.json (special tokens, chat template) and special_tokens_map.json,
    so AutoTokenizer.from_pretrained(save_dir) loads a fast tokenizer with our chat format."""
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
               "additional_special_tokens": [IM_START, IM_END]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False}
                                 for i, t in enumerate(SPECIAL_TOKENS)},
        "add_bos_token": False,  # PretrainDataset adds <s> itself; SFT text starts with <|im_start|>
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,  # the model's max_seq_len, not the tokenizer, limits length
        "chat_template": CHAT_TEMPLATE,
    }
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(save_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False, indent=2)


def load_tokenizer(path: str):
    """The tokenizer saved in `path` (tokenizer_k/, or a model directory that carries one)."""
    from transformers import PreTrainedTokenizerFast
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"{path}: no tokenizer here (no tokenizer.json); run code/train_tokenizer.py first")
    # the class by name, not AutoTokenizer: in a model directory AutoTokenizer reads config.json
    # and warns that model type 'Tiny-K' is unknown to it
    return PreTrainedTokenizerFast.from_pretrained(path)


def eval_tokenizer(save_dir: str) -> None:
    """Load the saved tokenizer the way the trainers do and show what it does."""
    tokenizer = load_tokenizer(save_dir)
    print(f"vocab size: {len(tokenizer)}")
    print("special tokens:", {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS})
    messages = [{"role": "user", "content": "你好，今天天气怎么样？"},
                {"role": "assistant", "content": "今天是晴天。"}]
    print("chat template:\n" + tokenizer.apply_chat_template(messages, tokenize=False))
    print("generation prompt:\n" + tokenizer.apply_chat_template(messages[:1], tokenize=False,
                                                                  add_generation_prompt=True))
    text = "１９９８年，新年好！Hello, world 123."
    ids = tokenizer(text)["input_ids"]
    decoded = tokenizer.decode(ids)
    print(f"round trip: {text!r} -> {len(ids)} tokens -> {decoded!r} ({'same' if decoded == text else 'DIFFERENT'})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_path", nargs="+", default=[DATA_PATH], help="jsonl file(s) to train on")
    parser.add_argument("--save_dir", default=SAVE_DIR, help="where tokenizer.json and its config go")
    parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE, help="tokens in the vocabulary, the 5 special ones included")
    parser.add_argument("--min_frequency", type=int, default=MIN_FREQUENCY, help="a pair must occur this often to be merged")
    parser.add_argument("--max_chars", type=int, default=MAX_CHARS,
                        help="larger corpora are sampled at places spread over each file, bounding memory; 0 = read everything")
    parser.add_argument("--split_cjk", action="store_true",
                        help="one token per Chinese character (no merges across characters), as the poem demo uses")
    args = parser.parse_args(argv)
    if args.max_chars < 0:
        parser.error("--max_chars must be >= 0")
    try:
        train_tokenizer(args.data_path, args.save_dir, args.vocab_size, args.min_frequency, args.max_chars,
                        args.split_cjk)
    except JsonlError as e:
        sys.exit(f"error: {e}")
    eval_tokenizer(args.save_dir)


if __name__ == "__main__":
    main()
