"""第 5.3 节的数据集：PretrainDataset（纯文本，5.3.1）和 SFTDataset（对话，5.3.2）。

每个样本是长度为 max_length 的 (X, Y, loss_mask)：X 是输入 token，Y 是同一序列错开一位
（要预测的下一个 token），loss_mask 在 Y 参与训练的位置为 1。loss_mask 为 0 的位置，Y 都是
IGNORE_INDEX，于是模型算损失时跳过这些位置。构建数据集时只记下每行的字节偏移，取样本时再按需
读取，所以比内存还大的语料也能用。这份偏移（索引）存在数据文件旁边（sft.jsonl.index.npz，
jsonl.load_index），下次启动时文件没变就直接读它，不必再逐行解析几 GB 的 jsonl。
章节之外还有：PreferenceDataset（DPO 用的偏好对）、PackedDataset（打包的预训练窗口）、
组批函数 trim_padding / pack_chats，以及给每个进程分数据的 ShardSampler。
"""
import os

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from jsonl import changed_while_training, line_number_at, load_index, read_line_at, text_of
from k_model import IGNORE_INDEX

ROLES = ("system", "user", "assistant")  # 对话模板认识的角色


def parse_chat_record(record) -> None:
    """检查一行 SFT 数据：非空的消息列表，角色合法，content 是字符串，且至少有一条 assistant 回答
    （没有回答就没有要训练的 token）。不合格时抛出异常，iter_jsonl 会跳过这一行。"""
    if not isinstance(record, list) or not record:
        raise TypeError("expected a non-empty list of messages")
    for message in record:
        if message["role"] not in ROLES:
            raise ValueError(f"unknown role {message['role']!r}")
        if not isinstance(message["content"], str):
            raise TypeError("'content' is not a string")
    if not any(m["role"] == "assistant" for m in record):
        raise ValueError("no assistant message")


def size_or_zero(path: str) -> int:
    """文件的字节数；文件已不存在时为 0。"""
    return os.path.getsize(path) if os.path.isfile(path) else 0


class JsonlDataset(Dataset):
    """按字节偏移索引 jsonl 文件里可用的行；每取一个样本读一行。
    PretrainDataset 和 SFTDataset 的共同基类（章节用 readlines() 把整个文件读进内存）。"""

    def __init__(self, data_path, tokenizer, max_length, parse):
        super().__init__()
        self.data_path = data_path
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # 填充用的 token id
        # 可用行的起始字节偏移（坏行跳过并警告）；文件没变时从上次存下的索引读出，不再逐行解析
        self.offsets = load_index(data_path, parse)
        self.size = os.path.getsize(data_path)  # 用来区分“训练期间文件被改了”和“这一行本身坏了”
        self._file, self._file_pid = None, None

    def __len__(self):
        return len(self.offsets)

    def read(self, index: int):
        """读出第 index 个可用行，解码成 JSON 对象。"""
        if self._file_pid != os.getpid():  # 每个 DataLoader 工作进程各开一个文件句柄
            self._file, self._file_pid = open(self.data_path, "rb"), os.getpid()
        offset = int(self.offsets[index])
        try:
            return read_line_at(self._file, offset)
        except ValueError as e:  # 构建数据集时每一行都读得通
            # 所以现在读不通，说明文件在训练期间变了：报出行号（文件已变短时报字节位置）
            where = (f"line {line_number_at(self.data_path, offset)}" if offset < size_or_zero(self.data_path)
                     else f"the line at byte {offset:,}")
            raise changed_while_training(self.data_path, where, self.size) from e

    def to_example(self, input_id, loss_mask):
        """截断到 max_length + 1，填充，再错开一位：得到长度为 max_length 的 (X, Y, loss_mask)。"""
        # 多留一个 token：错开一位之后 X 和 Y 正好各 max_length 个
        input_id = input_id[: self.max_length + 1]
        loss_mask = loss_mask[: self.max_length + 1]
        # 填充：短序列补 pad 到固定长度，补上的位置损失掩码为 0，不计损失
        padding_len = self.max_length + 1 - len(input_id)
        input_id = np.array(input_id + [self.padding] * padding_len, dtype=np.int64)
        loss_mask = np.array(loss_mask + [0] * padding_len, dtype=np.int64)
        X = input_id[:-1]  # 输入：去掉最后一个 token
        loss_mask = loss_mask[1:]  # 掩码的每一项属于被预测的那个 token
        # 标签：去掉第一个 token，即每个位置的下一个 token；掩码为 0 处换成 IGNORE_INDEX，交叉熵会跳过
        Y = np.where(loss_mask == 1, input_id[1:], IGNORE_INDEX)
        return torch.from_numpy(X), torch.from_numpy(Y), torch.from_numpy(loss_mask)


class PretrainDataset(JsonlDataset):
    """{"text": ...} 的行 -> <s> 文本 </s>，每个真实 token 都计算损失（5.3.1）。"""

    def __init__(self, data_path, tokenizer, max_length=512):
        super().__init__(data_path, tokenizer, max_length, text_of)

    def __getitem__(self, index: int):
        sample = self.read(index)  # 按需读取这一行
        # 每篇文档都以 </s> 收尾，模型因此学会一段文本在哪里结束（章节没有结束符）
        input_id = ([self.tokenizer.bos_token_id]
                    + self.tokenizer(sample["text"], add_special_tokens=False)["input_ids"]
                    + [self.tokenizer.eos_token_id])
        # 预训练：所有真实 token 都参与损失（掩码全为 1），填充部分由 to_example 置 0
        return self.to_example(input_id, [1] * len(input_id))


class SFTDataset(JsonlDataset):
    """每行一段对话 -> ChatML 文本，只对 assistant 的回答及其 <|im_end|> 计算损失（5.3.2）。"""

    def __init__(self, data_path, tokenizer, max_length=512, parse=parse_chat_record):
        super().__init__(data_path, tokenizer, max_length, parse)
        # "<|im_start|>assistant\n" 在每段回答开头被分词器编码成的 token 序列；章节找的是单个
        # "assistant" token 和一个单独的 "\n"，而字节级 BPE 从不会产生它们
        self.assistant_header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.assistant_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")  # 一轮回答的结束符

    def __getitem__(self, index: int):
        return self.chat_example(self.read(index))

    def chat_example(self, messages):
        """一段对话 -> (X, Y, loss_mask)：套用对话模板、分词、生成损失掩码。"""
        # 对话模板：把消息列表排成 <|im_start|>角色\n内容<|im_end|> 的文本；训练时不加生成提示
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        input_id = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_length + 1]
        return self.to_example(input_id, self.generate_loss_mask(input_id))

    def generate_loss_mask(self, input_ids):
        """每个 assistant 回答的 token 及其收尾的 <|im_end|> 处为 1，其余为 0。"""
        mask = [0] * len(input_ids)  # 先全为 0：系统提示和用户输入都不计损失
        header, n = self.assistant_header, len(input_ids)
        i = 0
        while i < n:
            if input_ids[i:i + len(header)] == header:  # 找到一段回答的开头
                start = i + len(header)  # 回答内容从 header 之后开始
                end = start
                while end < n and input_ids[end] != self.assistant_end_id:  # 向后找这段回答的 <|im_end|>
                    end += 1
                end = min(end + 1, n)  # 包括 <|im_end|>：模型必须学会结束自己这一轮
                mask[start:end] = [1] * (end - start)
                i = end
            else:
                i += 1
        return mask


def parse_preference_record(record) -> None:
    """检查一行偏好数据：prompt 加上 chosen 回答要是合格的对话，rejected 是字符串，prompt 以用户消息结尾。"""
    if not isinstance(record, dict):
        raise TypeError('expected {"prompt": [...], "chosen": "...", "rejected": "..."}')
    parse_chat_record(record["prompt"] + [{"role": "assistant", "content": record["chosen"]}])
    if not isinstance(record["rejected"], str) or record["prompt"][-1]["role"] != "user":
        raise ValueError("'rejected' is not a string, or the prompt does not end with the user")


class PreferenceDataset(SFTDataset):
    """{"prompt": 消息列表, "chosen": 回答, "rejected": 回答} 的行（make_preferences.py）->
    两个 SFT 样本：同一个 prompt 分别配上 chosen 回答和 rejected 回答；loss_mask 标出回答的
    token（以及 <|im_end|>），DPO 比较的就是它们的对数概率。"""

    def __init__(self, data_path, tokenizer, max_length=512):
        super().__init__(data_path, tokenizer, max_length, parse_preference_record)

    def __getitem__(self, index: int):
        record = self.read(index)
        return tuple(self.chat_example(record["prompt"] + [{"role": "assistant", "content": record[key]}])
                     for key in ("chosen", "rejected"))

    @staticmethod
    def collate(pairs, multiple: int = 1):
        """把 B 对样本组成 2B 行的一批：前 B 行是 chosen 回答，后 B 行是 rejected 回答。"""
        return trim_padding([chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs], multiple)


class PackedDataset(Dataset):
    """在预先分好词的 token 流（pretokenize.py）上切固定长度的窗口：打包，没有填充，每个 token
    都参与训练。同一窗口里的文档之间以 </s><s> 分隔。

    第 i 个窗口覆盖 token [i*max_length, (i+1)*max_length]：X 取前 max_length 个，Y 取后
    max_length 个，所以相邻窗口只共享边界上的那一个 token。
    """

    def __init__(self, bin_path, max_length=512, tokenizer_path=None):
        super().__init__()
        from pretokenize import read_meta, tokenizer_fingerprint
        meta = read_meta(bin_path)
        # .bin 里的 token id 只对当初分词用的那个分词器有意义
        if tokenizer_path and meta["tokenizer_sha256"] != tokenizer_fingerprint(tokenizer_path):
            raise ValueError(f"{bin_path} was tokenized with another tokenizer than {tokenizer_path}; "
                             "run code/pretokenize.py again")
        self.bin_path, self.dtype, self.max_length = bin_path, meta["dtype"], max_length
        self.n_windows = (meta["n_tokens"] - 1) // max_length  # 每个窗口要 max_length + 1 个 token
        if self.n_windows < 1:
            raise ValueError(f"{bin_path}: {meta['n_tokens']} tokens, fewer than one window of {max_length + 1}")
        self.itemsize = np.dtype(self.dtype).itemsize  # 每个 token 在文件里占的字节数
        self.n_bytes = meta["n_tokens"] * self.itemsize  # 训练开始时文件应有的大小（报错时用）
        self._file, self._file_pid = None, None

    def __len__(self):
        return self.n_windows

    def __getitem__(self, index: int):
        # 用 read 而不是 numpy.memmap：memmap 碰过的窗口都一直映射着，长时间训练下，
        # 每个 DataLoader 工作进程的常驻内存会朝文件大小增长（到第 4,000 批时 +143%）
        if self._file_pid != os.getpid():  # 每个进程一个文件句柄（包括 DataLoader 工作进程）
            self._file, self._file_pid = open(self.bin_path, "rb"), os.getpid()
        self._file.seek(index * self.max_length * self.itemsize)
        data = self._file.read((self.max_length + 1) * self.itemsize)
        if len(data) < (self.max_length + 1) * self.itemsize:  # 读不满：文件在训练期间变短了
            raise changed_while_training(self.bin_path, f"window {index}", self.n_bytes)
        chunk = torch.from_numpy(np.frombuffer(data, dtype=self.dtype).astype(np.int64))
        # X、Y 错开一位；损失掩码全为 1：没有填充，每个位置都训练
        return chunk[:-1], chunk[1:], torch.ones(self.max_length, dtype=torch.int64)


def trim_padding(batch, multiple: int = 1):
    """把 (X, Y, loss_mask) 样本组成一批，并去掉最后一个训练位置之后的列：因果模型前面位置的输出
    不依赖它们，所以损失不变。长度向上取整到 `multiple` 的倍数（编译过的模型因此只会遇到少数几种形状）。"""
    X, Y, loss_mask = (torch.stack(column) for column in zip(*batch))
    trained = (Y != IGNORE_INDEX).any(dim=0).nonzero()  # 至少有一行要训练的列
    length = int(trained.max()) + 1 if len(trained) else 1
    length = min(-(-length // multiple) * multiple, X.shape[1])  # -(-a // b)：向上取整的整数除法
    return X[:, :length], Y[:, :length], loss_mask[:, :length]


def pack_chats(batch, max_length: int):
    """把 (X, Y, loss_mask) 对话打包进尽量少的行，每行至多 max_length 个 token（首次适应，长的先放），
    每段对话截到它最后一个训练 token 之后：随机的一批 demo 对话里大约一半是填充，打包后同样的回答
    只占一半 token。同一行里的对话彼此可见，就像 PackedDataset 窗口里的文档一样；每个标签都和不打包时
    一样是同一个下一个 token，所以损失平均的是同样的回答。"""
    pieces = []
    for X, Y, loss_mask in batch:
        trained = (Y != IGNORE_INDEX).nonzero()
        length = int(trained.max()) + 1 if len(trained) else 1  # 去掉结尾的填充
        pieces.append((X[:length], Y[:length], loss_mask[:length]))
    rows = []  # 每行是一组片段，它们的长度之和不超过 max_length
    for piece in sorted(pieces, key=lambda p: -len(p[0])):
        # 首次适应：放进第一个还装得下的行，都装不下就另起一行
        row = next((r for r in rows if sum(len(q[0]) for q in r) + len(piece[0]) <= max_length), None)
        if row is None:
            rows.append([piece])
        else:
            row.append(piece)
    width = max(sum(len(q[0]) for q in row) for row in rows)  # 这一批的宽度：最长的那一行
    out = []
    # 各行拼接后补齐到 width：X 补 0，Y 补 IGNORE_INDEX（不计损失），loss_mask 补 0
    for column, fill in ((0, 0), (1, IGNORE_INDEX), (2, 0)):
        out.append(torch.stack([torch.nn.functional.pad(torch.cat([q[column] for q in row]),
                                                        (0, width - sum(len(q[0]) for q in row)), value=fill)
                                for row in rows]))
    return tuple(out)


class ShardSampler(Sampler):
    """本进程（rank）在一个 epoch 里的样本下标：顺序与 DistributedSampler(shuffle=True,
    drop_last=True, seed) 调用 set_epoch(epoch) 之后相同，从位置 `start` 起（以样本计：起始批号 x batch_size）。

    DistributedSampler 每个 epoch 都建一个包含全部下标的 Python 列表，加载器又把本进程的那份复制进
    另一个列表（1000 万个窗口时每个 rank 461 MiB，tests/scale_check.py）。这里一个 epoch 只是本进程
    那一份的 int64 张量（每个下标 8 字节），分成小块交出去。"""

    def __init__(self, n, world_size=1, rank=0, seed=0, epoch=0, start=0):
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)  # 同一种子、同一 epoch：每个进程打乱出同一个顺序
        per_rank = n // world_size  # 最后 n % world_size 个样本被丢掉，从不重复
        order = torch.randperm(n, generator=generator)[:per_rank * world_size]
        # 分布式数据并行的分片：隔 world_size 取一个，各进程互不重叠；start 跳过续训前已训练过的样本
        self.indices = order[rank::world_size][start:].clone()  # clone：只留下本进程这份，其余释放

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        for piece in self.indices.split(4096):  # 每次只把 4096 个下标转成 Python 整数
            yield from piece.tolist()
