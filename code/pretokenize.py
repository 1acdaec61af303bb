"""Pre-tokenize a pretraining jsonl into one flat token file, for packed training.

    python code/pretokenize.py --data_path data/demo_pretrain.jsonl --tokenizer_path tokenizer_k
    # -> data/demo_pretrain.bin (the tokens) + data/demo_pretrain.bin.json (what they are)

Every document becomes <s> text </s>, and the documents are concatenated, so the model sees
where one ends and the next begins. Tokens are uint16 when the vocabulary fits (it does for
6144). Worker processes tokenize batches of lines while the main process streams the
results to disk, so a corpus larger than memory works. ddp_pretrain.py trains on the .bin
file with PackedDataset: fixed-length windows, no padding.
"""
import argparse
import hashlib
import itertools
import json
import os
import sys
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

from cli import HelpFormatter
from jsonl import JsonlError, read_jsonl, text_of

# ---- hyperparameters (CLI flags override) ----
TOKENIZER_PATH = "tokenizer_k"
NUM_PROC = os.cpu_count() or 1
LINES_PER_TASK = 1000   # lines one worker tokenizes at a time
TASKS_IN_FLIGHT = 4     # per worker: bounds memory while keeping every worker busy


def tokenizer_fingerprint(tokenizer_path: str) -> str:
    """sha256 of tokenizer.json: the same file means the same token ids."""
    with open(os.path.join(tokenizer_path, "tokenizer.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def meta_path(bin_path: str) -> str:
    return bin_path + ".json"


def read_meta(bin_path: str) -> dict:
    path = meta_path(bin_path)
    if not os.path.isfile(bin_path) or not os.path.isfile(path):
        raise FileNotFoundError(f"{bin_path}: token file or its {os.path.basename(path)} not found; "
                                "run code/pretokenize.py first")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    expected = meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
    if os.path.getsize(bin_path) != expected:
        raise ValueError(f"{bin_path}: {os.path.getsize(bin_path)} bytes, but {path} promises {expected}; "
                         "the file is truncated or from another run")
    return meta


_tokenizer = _bos = _eos = None


def _init_worker(tokenizer_path):
    global _tokenizer, _bos, _eos
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    from train_tokenizer import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_path)
    # The Rust tokenizer under the transformers wrapper. tokenizer(texts) runs its encode_batch, which
    # also works out every token's character offsets, then copies each result into Python dicts;
    # encode_batch_fast on the Rust tokenizer gives the same ids in 2/3 of the time
    _tokenizer, _bos, _eos = tokenizer.backend_tokenizer, tokenizer.bos_token_id, tokenizer.eos_token_id


def encode_documents(texts):
    """<s> text </s> for each text, concatenated into one array."""
    docs = _tokenizer.encode_batch_fast(texts, add_special_tokens=False)  # the ids, no character offsets
    return np.fromiter(itertools.chain.from_iterable([_bos, *doc.ids, _eos] for doc in docs), dtype=np.int64)


def batched(iterable, n):
    it = iter(iterable)
    while batch := list(itertools.islice(it, n)):
        yield batch


def pretokenize(data_path: str, tokenizer_path: str, out_path: str, num_proc: int = NUM_PROC) -> dict:
    """Write out_path (tokens) and out_path.json (dtype, vocab_size, n_tokens, n_docs, tokenizer sha256)."""
    from train_tokenizer import load_tokenizer
    vocab_size = len(load_tokenizer(tokenizer_path))
    dtype = token_dtype(vocab_size)
    tasks = batched(read_jsonl(data_path, text_of), LINES_PER_TASK)
    tmp = f"{out_path}.tmp{os.getpid()}"
    n_tokens = n_docs = 0
    try:
        with open(tmp, "wb") as out, Pool(num_proc, _init_worker, (tokenizer_path,)) as pool, \
                tqdm(total=os.path.getsize(data_path), unit="B", unit_scale=True, desc="pretokenize",
                     file=sys.stderr, disable=None) as progress:
            # Pool.imap would read the whole input ahead: feed it a bounded slice at a time
            for window in batched(tasks, num_proc * TASKS_IN_FLIGHT):
                for texts, tokens in zip(window, pool.imap(encode_documents, window)):
                    out.write(tokens.astype(dtype).tobytes())
                    n_tokens += len(tokens)
                    n_docs += len(texts)
                    progress.update(sum(len(t.encode("utf-8")) + 13 for t in texts))  # ~ line bytes
        meta = {"dtype": np.dtype(dtype).name, "vocab_size": vocab_size, "n_tokens": n_tokens, "n_docs": n_docs,
                "tokenizer_sha256": tokenizer_fingerprint(tokenizer_path), "source": os.path.abspath(data_path)}
        with open(meta_path(out_path) + ".tmp", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, out_path)
        os.replace(meta_path(out_path) + ".tmp", meta_path(out_path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {n_tokens:,} tokens of {n_docs:,} documents to {out_path} ({meta['dtype']})")
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_path", nargs="+", required=True, help="pretraining jsonl file(s)")
    parser.add_argument("--tokenizer_path", default=TOKENIZER_PATH, help="directory of the tokenizer (train_tokenizer.py)")
    parser.add_argument("--out_path", help="default: the data path with .bin instead of .jsonl (one input only)")
    parser.add_argument("--num_proc", type=int, default=NUM_PROC, help="tokenizing worker processes (default: all cores)")
    args = parser.parse_args(argv)
    if args.out_path and len(args.data_path) > 1:
        parser.error("--out_path takes one --data_path")
    if not os.path.isfile(os.path.join(args.tokenizer_path, "tokenizer.json")):
        sys.exit(f"error: {args.tokenizer_path}: no tokenizer here (no tokenizer.json); run code/train_tokenizer.py first")
    for path in args.data_path:
        if not os.path.isfile(path):
            sys.exit(f"error: {path}: file not found")
    try:
        for path in args.data_path:
            pretokenize(path, args.tokenizer_path, args.out_path or os.path.splitext(path)[0] + ".bin", args.num_proc)
    except JsonlError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
