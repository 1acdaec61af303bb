"""训练第 5.2 节「训练分词器」的字节级 BPE 分词器，并保存成 AutoTokenizer 能直接加载的格式。

    python code/train_tokenizer.py --data_path data/demo_pretrain.jsonl --save_dir tokenizer_k --vocab_size 6144

读取 jsonl：每行是带 "text" 字段的预训练文本，或一段对话（由 {"role", "content"} 消息组成的列表，
即 deal_dataset.py 写出的格式）；--data_path 可以给多个文件。
语料超过 --max_chars 时进行抽样：在每个文件上按字节偏移均匀分布的 SAMPLE_SPANS 处读取整行（流式读取），
这样内存有上限，样本也覆盖整个语料，而不只是开头几行。
这里定义的特殊 token 和对话模板，也是 5.3 的 SFT 数据和 5.6 的推理所用的格式。
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

# ---- 超参数（命令行参数可覆盖）----
DATA_PATH = "data/demo_pretrain.jsonl"
SAVE_DIR = "tokenizer_k"
VOCAB_SIZE = 6144  # 词表大小：太大则嵌入层和输出层参数多，太小则一句话要切成更多 token
MIN_FREQUENCY = 2  # 一个相邻对至少出现 2 次才会被合并
# BPE 训练器会把每个不同的预分词“词”都留在内存里，而中文里几乎每个分句都是一个这样的“词”，所以内存随读入的
# 文本增长：全是新分句时约每百万字符 0.25 GB（tests/scale_check.py）。1000 万字符（约 30 MB 中文）用不到 3 GB、
# 几分钟就能训完，而且每个常用字都已出现上千次。
MAX_CHARS = 10_000_000
SAMPLE_SPANS = 1000  # 在每个文件上均匀分布的这么多处读取样本

# 特殊 token 及其必须得到的 id（训练后检查）：训练器按列表顺序把 0..4 分给它们。
# <unk> 未知词，<s>/</s> 一段文本的开始/结束，<|im_start|>/<|im_end|> 对话中一条消息的开始/结束。
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
UNK, BOS, EOS, IM_START, IM_END = SPECIAL_TOKENS
# 字节级 BPE 永远不会产生 <unk>，所以它可以空出来当填充（pad）；pad 不能是 eos 或 <|im_end|>，
# 否则忽略填充的损失也会把每个回答的结尾一起忽略掉。
PAD = UNK

# 训练数据和推理共用同一个系统提示词：对话里没有 system 消息时由对话模板插入
# （章节训练和采样时用的是不同的系统提示词）。
SYSTEM_PROMPT = "你是一个AI助手"

# ChatML 对话模板：每一轮都写成 <|im_start|>role\ncontent<|im_end|>\n。
# 第一条不是 system 时先补上系统提示词；add_generation_prompt 为真时末尾留出 assistant 的开头，让模型接着写回答。
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
    """要学习的文本：预训练行取其 "text"，对话行取各条消息的内容（用换行连接）。"""
    if isinstance(record, dict):
        return text_of(record)
    # 对话只取内容，不含角色名和特殊 token：特殊 token 由训练器单独加入词表
    if isinstance(record, list) and record and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                   for m in record):
        return "\n".join(m["content"] for m in record)
    raise ValueError('expected {"text": ...} or a list of {"role", "content"} messages')


def read_texts_from_jsonl(data_path: str) -> Iterator[str]:
    """逐个产出整个文件中每个可用行的文本（生成器，不必把文件整个读进内存）。"""
    yield from read_jsonl(data_path, text_of_line)


def sample_texts_from_jsonl(data_path: str, max_chars: int, n_spans: int = SAMPLE_SPANS) -> Iterator[str]:
    """从分布在整个文件上的整行里取约 max_chars 个字符的文本：文件切成 n_spans 段等长的字节区间，
    每段从它的第一个完整行开始取自己那一份。内存里最多只放一行。不可用的行跳过并计数。"""
    size = os.path.getsize(data_path)
    n_spans = max(1, min(n_spans, max_chars // 100))  # 每处至少取几行
    share = max_chars / n_spans  # 每处分到的字符数
    n_chars = n_lines = n_bad = 0
    t0 = time.time()
    with open(data_path, "rb") as f:
        for span in range(n_spans):
            start, end = size * span // n_spans, size * (span + 1) // n_spans
            f.seek(start)
            if start:
                f.readline()  # 从上一段开始的那一行已在上一段读过，跳过它
            taken = 0
            while f.tell() < end and taken < share:
                raw = f.readline()
                if not raw:
                    break
                if not raw.strip():  # 空行
                    continue
                try:
                    text = text_of_line(json.loads(raw))
                except (ValueError, KeyError, TypeError):  # 坏行：计数后跳过
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
    """文件合起来不大时（字节数 <= max_chars 就意味着字符数 <= max_chars）每个文件整份读取；
    否则每个文件都抽样，按文件大小的比例分得 max_chars 中的一份。"""
    sizes = [os.path.getsize(path) if os.path.isfile(path) else 0 for path in data_paths]
    for path, size in zip(data_paths, sizes):
        if not max_chars or sum(sizes) <= max_chars or not size:
            yield from read_texts_from_jsonl(path)  # 文件不存在时抛出 JsonlError
        else:
            yield from sample_texts_from_jsonl(path, max(1, max_chars * size // sum(sizes)))


def build_tokenizer(split_cjk: bool = False) -> Tokenizer:
    # BPE 模型：从单个字节出发，反复把最常见的相邻对合并成新 token
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # 用 NFC 而不是章节的 NFKC：NFKC 会把全角的中文标点和数字折成 ASCII（，？！１ -> ,?!1），
    # 那样 decode(encode(text)) 就还原不出普通的中文了。
    tokenizer.normalizer = normalizers.NFC()
    # 字节级预分词：按 GPT-2 的规则粗切成“词”，再用 UTF-8 字节表示，任何字符都能编码，不会遇到未登录词（OOV）
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_cjk:
        # 每个汉字单独成为一个“词”：合并只发生在一个字的内部，所以一个 token 就是一个字（明月 = 明 + 月），
        # 小模型也能数出一句诗的 5 个或 7 个字。没有合并会跨过一个字，所以 GPT-2 更粗的切分（llama.cpp）
        # 会得到同样的 token。
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()  # 解码时把字节级符号拼回 UTF-8 文本
    return tokenizer


def train_tokenizer(data_paths: List[str], save_dir: str, vocab_size: int = VOCAB_SIZE,
                    min_frequency: int = MIN_FREQUENCY, max_chars: int = MAX_CHARS, split_cjk: bool = False) -> None:
    """训练并保存分词器（tokenizer.json + tokenizer_config.json + special_tokens_map.json）。"""
    if isinstance(data_paths, str):  # 也接受单个路径
        data_paths = [data_paths]
    tokenizer = build_tokenizer(split_cjk)
    # BPE 训练器：不断合并最频繁的相邻对，直到词表达到 vocab_size；特殊 token 先占住最前面的 id
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        min_frequency=min_frequency,
        show_progress=sys.stderr.isatty(),  # 只在终端里显示进度条，不污染日志文件
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # 256 个字节符号全部进词表，保证什么文本都能编码
    )
    print(f"Training tokenizer on {', '.join(data_paths)}")
    t0 = time.time()
    # 以迭代器流式喂入文本（大语料时是抽样），不必整份读进内存
    tokenizer.train_from_iterator(texts_for_training(data_paths, max_chars), trainer=trainer)
    print(f"trained in {time.time() - t0:.0f} s, peak memory {peak_rss_gb():.2f} GB")

    # 验证特殊 token 的 id 与 SPECIAL_TOKENS 的顺序一致：ModelConfig 和数据集都按这些 id 工作
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual = tokenizer.token_to_id(token)
        assert actual == expected_id, f"{token} got id {actual}, expected {expected_id}"

    # 保存 tokenizer.json，再写配置文件，让 AutoTokenizer 能直接加载
    os.makedirs(save_dir, exist_ok=True)
    tokenizer.save(os.path.join(save_dir, "tokenizer.json"))
    create_tokenizer_config(save_dir)
    print(f"Tokenizer saved to {save_dir}")


def peak_rss_gb() -> float:
    """本进程到目前为止的峰值常驻内存（包括训练器在 Rust 里用的内存）。"""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # macOS 上单位是字节，Linux 上是 kB


def create_tokenizer_config(save_dir: str) -> None:
    """写出 tokenizer_config.json（特殊 token、对话模板）和 special_tokens_map.json，
    使 AutoTokenizer.from_pretrained(save_dir) 加载出一个带我们对话格式的 fast tokenizer。"""
    # 各特殊 token 的角色；<|im_start|>/<|im_end|> 作为额外的特殊 token，decode 时可用 skip_special_tokens 去掉
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
               "additional_special_tokens": [IM_START, IM_END]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        # 五个特殊 token 登记为整体、不再切分的特殊 token，id 与训练结果一致
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False}
                                 for i, t in enumerate(SPECIAL_TOKENS)},
        "add_bos_token": False,  # PretrainDataset 自己加 <s>；SFT 文本以 <|im_start|> 开头
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # 不改动解码出的空格，保证编码再解码能原样还原
        "model_max_length": 1_000_000,  # 长度由模型的 max_seq_len 限制，而不是分词器
        "chat_template": CHAT_TEMPLATE,
    }
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(save_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False, indent=2)


def load_tokenizer(path: str):
    """加载 `path` 里保存的分词器（tokenizer_k/，或自带分词器的模型目录）。"""
    from transformers import PreTrainedTokenizerFast
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"{path}: no tokenizer here (no tokenizer.json); run code/train_tokenizer.py first")
    # 按类名加载而不用 AutoTokenizer：在模型目录里 AutoTokenizer 会读 config.json，
    # 并警告它不认识 'Tiny-K' 这种模型类型
    return PreTrainedTokenizerFast.from_pretrained(path)


def eval_tokenizer(save_dir: str) -> None:
    """像训练脚本那样加载保存好的分词器，并展示它的效果（对应 5.2.4 使用训练好的分词器）。"""
    tokenizer = load_tokenizer(save_dir)
    print(f"vocab size: {len(tokenizer)}")
    print("special tokens:", {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS})
    # 对话模板渲染出的完整对话，以及推理时用的提示（末尾留出 assistant 的开头）
    messages = [{"role": "user", "content": "你好，今天天气怎么样？"},
                {"role": "assistant", "content": "今天是晴天。"}]
    print("chat template:\n" + tokenizer.apply_chat_template(messages, tokenize=False))
    print("generation prompt:\n" + tokenizer.apply_chat_template(messages[:1], tokenize=False,
                                                                  add_generation_prompt=True))
    # 全角数字、中文标点与英文混排：检查编码再解码能否原样还原（NFKC 会在这里失败）
    text = "１９９８年，新年好！Hello, world 123."
    ids = tokenizer(text)["input_ids"]
    decoded = tokenizer.decode(ids)
    print(f"round trip: {text!r} -> {len(ids)} tokens -> {decoded!r} ({'same' if decoded == text else 'DIFFERENT'})")


# 命令行入口：训练、保存，然后展示分词效果
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
