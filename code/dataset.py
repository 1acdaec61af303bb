"""Datasets of chapter 5.3: PretrainDataset (plain text) and SFTDataset (chats).

Each item is (X, Y, loss_mask) of length max_length: X the input tokens, Y the same
sequence shifted by one (the next token to predict), loss_mask 1 where Y is trained on.
Y holds IGNORE_INDEX wherever loss_mask is 0, so the model's loss skips those positions.
Lines are located by byte offset when the dataset is built and read on demand, so a
corpus larger than memory works.
"""
import os

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from jsonl import changed_while_training, iter_jsonl, line_number_at, read_line_at, text_of
from k_model import IGNORE_INDEX

ROLES = ("system", "user", "assistant")


def parse_chat_record(record) -> None:
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
    return os.path.getsize(path) if os.path.isfile(path) else 0


class JsonlDataset(Dataset):
    """Indexes the usable lines of a jsonl file by byte offset; reads one line per item."""

    def __init__(self, data_path, tokenizer, max_length, parse):
        super().__init__()
        self.data_path = data_path
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.offsets = np.fromiter((offset for offset, _ in iter_jsonl(data_path, parse)), dtype=np.int64)
        self.size = os.path.getsize(data_path)  # to tell a file changed under the run from a bad line
        self._file, self._file_pid = None, None

    def __len__(self):
        return len(self.offsets)

    def read(self, index: int):
        if self._file_pid != os.getpid():  # one handle per DataLoader worker process
            self._file, self._file_pid = open(self.data_path, "rb"), os.getpid()
        offset = int(self.offsets[index])
        try:
            return read_line_at(self._file, offset)
        except ValueError as e:  # every line read well when the dataset was built
            where = (f"line {line_number_at(self.data_path, offset)}" if offset < size_or_zero(self.data_path)
                     else f"the line at byte {offset:,}")
            raise changed_while_training(self.data_path, where, self.size) from e

    def to_example(self, input_id, loss_mask):
        """Truncate to max_length + 1, pad, shift by one: (X, Y, loss_mask) of length max_length."""
        input_id = input_id[: self.max_length + 1]
        loss_mask = loss_mask[: self.max_length + 1]
        padding_len = self.max_length + 1 - len(input_id)
        input_id = np.array(input_id + [self.padding] * padding_len, dtype=np.int64)
        loss_mask = np.array(loss_mask + [0] * padding_len, dtype=np.int64)
        X = input_id[:-1]
        loss_mask = loss_mask[1:]  # a mask entry belongs to the token being predicted
        Y = np.where(loss_mask == 1, input_id[1:], IGNORE_INDEX)
        return torch.from_numpy(X), torch.from_numpy(Y), torch.from_numpy(loss_mask)


class PretrainDataset(JsonlDataset):
    """{"text": ...} lines -> <s> text </s>, loss on every real token."""

    def __init__(self, data_path, tokenizer, max_length=512):
        super().__init__(data_path, tokenizer, max_length, text_of)

    def __getitem__(self, index: int):
        sample = self.read(index)
        # </s> closes every document, so the model learns where a text ends (the chapter has no end token)
        input_id = ([self.tokenizer.bos_token_id]
                    + self.tokenizer(sample["text"], add_special_tokens=False)["input_ids"]
                    + [self.tokenizer.eos_token_id])
        return self.to_example(input_id, [1] * len(input_id))


class SFTDataset(JsonlDataset):
    """One chat per line -> ChatML text, loss only on the assistant's answers and their <|im_end|>."""

    def __init__(self, data_path, tokenizer, max_length=512, parse=parse_chat_record):
        super().__init__(data_path, tokenizer, max_length, parse)
        # "<|im_start|>assistant\n" as the tokenizer encodes it at the start of every answer; the
        # chapter looked for a single "assistant" token and a raw "\n", which byte-level BPE never yields
        self.assistant_header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.assistant_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __getitem__(self, index: int):
        return self.chat_example(self.read(index))

    def chat_example(self, messages):
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        input_id = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_length + 1]
        return self.to_example(input_id, self.generate_loss_mask(input_id))

    def generate_loss_mask(self, input_ids):
        """1 on every assistant answer token and its closing <|im_end|>, 0 elsewhere."""
        mask = [0] * len(input_ids)
        header, n = self.assistant_header, len(input_ids)
        i = 0
        while i < n:
            if input_ids[i:i + len(header)] == header:
                start = i + len(header)
                end = start
                while end < n and input_ids[end] != self.assistant_end_id:
                    end += 1
                end = min(end + 1, n)  # include <|im_end|>: the model must learn to end its turn
                mask[start:end] = [1] * (end - start)
                i = end
            else:
                i += 1
        return mask


def parse_preference_record(record) -> None:
    if not isinstance(record, dict):
        raise TypeError('expected {"prompt": [...], "chosen": "...", "rejected": "..."}')
    parse_chat_record(record["prompt"] + [{"role": "assistant", "content": record["chosen"]}])
    if not isinstance(record["rejected"], str) or record["prompt"][-1]["role"] != "user":
        raise ValueError("'rejected' is not a string, or the prompt does not end with the user")


class PreferenceDataset(SFTDataset):
    """{"prompt": messages, "chosen": answer, "rejected": answer} lines (make_preferences.py) ->
    two SFT examples, the prompt answered by the chosen and by the rejected answer; loss_mask
    marks the answer tokens (and <|im_end|>), whose log-probabilities DPO compares."""

    def __init__(self, data_path, tokenizer, max_length=512):
        super().__init__(data_path, tokenizer, max_length, parse_preference_record)

    def __getitem__(self, index: int):
        record = self.read(index)
        return tuple(self.chat_example(record["prompt"] + [{"role": "assistant", "content": record[key]}])
                     for key in ("chosen", "rejected"))

    @staticmethod
    def collate(pairs, multiple: int = 1):
        """A batch of B pairs as 2B rows: the B chosen answers, then the B rejected ones."""
        return trim_padding([chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs], multiple)


class PackedDataset(Dataset):
    """Fixed-length windows over a pre-tokenized stream (pretokenize.py): no padding, every
    token is trained on. Documents inside a window are separated by </s><s>.

    Window i covers tokens [i*max_length, (i+1)*max_length]: X the first max_length, Y the
    last max_length, so consecutive windows share only the boundary token.
    """

    def __init__(self, bin_path, max_length=512, tokenizer_path=None):
        super().__init__()
        from pretokenize import read_meta, tokenizer_fingerprint
        meta = read_meta(bin_path)
        if tokenizer_path and meta["tokenizer_sha256"] != tokenizer_fingerprint(tokenizer_path):
            raise ValueError(f"{bin_path} was tokenized with another tokenizer than {tokenizer_path}; "
                             "run code/pretokenize.py again")
        self.bin_path, self.dtype, self.max_length = bin_path, meta["dtype"], max_length
        self.n_windows = (meta["n_tokens"] - 1) // max_length
        if self.n_windows < 1:
            raise ValueError(f"{bin_path}: {meta['n_tokens']} tokens, fewer than one window of {max_length + 1}")
        self.itemsize = np.dtype(self.dtype).itemsize
        self.n_bytes = meta["n_tokens"] * self.itemsize
        self._file, self._file_pid = None, None

    def __len__(self):
        return self.n_windows

    def __getitem__(self, index: int):
        # read, not numpy.memmap: every window a memmap touches stays mapped, so over a long run
        # each DataLoader worker's resident memory grew toward the file's size (+143% by batch 4,000)
        if self._file_pid != os.getpid():  # one handle per process (DataLoader workers included)
            self._file, self._file_pid = open(self.bin_path, "rb"), os.getpid()
        self._file.seek(index * self.max_length * self.itemsize)
        data = self._file.read((self.max_length + 1) * self.itemsize)
        if len(data) < (self.max_length + 1) * self.itemsize:
            raise changed_while_training(self.bin_path, f"window {index}", self.n_bytes)
        chunk = torch.from_numpy(np.frombuffer(data, dtype=self.dtype).astype(np.int64))
        return chunk[:-1], chunk[1:], torch.ones(self.max_length, dtype=torch.int64)


def trim_padding(batch, multiple: int = 1):
    """Collate (X, Y, loss_mask) samples and drop the columns after the last trained position:
    a causal model's earlier outputs do not depend on them, so the loss is unchanged. The length
    is rounded up to a multiple of `multiple` (a compiled model then meets only a few shapes)."""
    X, Y, loss_mask = (torch.stack(column) for column in zip(*batch))
    trained = (Y != IGNORE_INDEX).any(dim=0).nonzero()
    length = int(trained.max()) + 1 if len(trained) else 1
    length = min(-(-length // multiple) * multiple, X.shape[1])
    return X[:, :length], Y[:, :length], loss_mask[:, :length]


def pack_chats(batch, max_length: int):
    """Collate (X, Y, loss_mask) chats into as few rows of at most max_length tokens as they fit
    (first fit, longest first), each chat cut after its last trained token: about half of a
    random batch of demo chats is padding, and a packed batch holds the same answers in half
    the tokens. Chats in one row see each other, as documents do in PackedDataset's windows;
    every label is the same next token as unpacked, so the loss averages the same answers."""
    pieces = []
    for X, Y, loss_mask in batch:
        trained = (Y != IGNORE_INDEX).nonzero()
        length = int(trained.max()) + 1 if len(trained) else 1
        pieces.append((X[:length], Y[:length], loss_mask[:length]))
    rows = []  # each row: a list of pieces, their lengths summing to at most max_length
    for piece in sorted(pieces, key=lambda p: -len(p[0])):
        row = next((r for r in rows if sum(len(q[0]) for q in r) + len(piece[0]) <= max_length), None)
        if row is None:
            rows.append([piece])
        else:
            row.append(piece)
    width = max(sum(len(q[0]) for q in row) for row in rows)
    out = []
    for column, fill in ((0, 0), (1, IGNORE_INDEX), (2, 0)):
        out.append(torch.stack([torch.nn.functional.pad(torch.cat([q[column] for q in row]),
                                                        (0, width - sum(len(q[0]) for q in row)), value=fill)
                                for row in rows]))
    return tuple(out)


class ShardSampler(Sampler):
    """This rank's indices of one epoch: the same order as DistributedSampler(shuffle=True,
    drop_last=True, seed) after set_epoch(epoch), from batch `start` on.

    DistributedSampler builds each epoch a Python list of every index, and the loader copied its
    shard into another (461 MiB per rank for 10M windows, tests/scale_check.py). Here one epoch is
    an int64 tensor of this rank's share only (8 bytes an index), handed out in small pieces."""

    def __init__(self, n, world_size=1, rank=0, seed=0, epoch=0, start=0):
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        per_rank = n // world_size  # the last n % world_size samples are dropped, never repeated
        order = torch.randperm(n, generator=generator)[:per_rank * world_size]
        self.indices = order[rank::world_size][start:].clone()  # clone: keep the shard, free the rest

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        for piece in self.indices.split(4096):
            yield from piece.tolist()
