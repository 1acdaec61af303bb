"""Tang poems from the npm package chinese-poetry, as pretraining text, instructions and eval prompts.

    python code/poetry.py               # fetch the package into data/ (once) and show what it holds

The package (MIT licence) carries the complete Tang poems in traditional characters:
package/dist/quantangshi/poet.tang.*.json, 58 files, 57,607 poems of {"author", "title",
"paragraphs"}. They are read straight from the tarball, converted to simplified characters
with OpenCC, and the poems of the four strict forms (FORMS) are kept:

    pretraining text   五言绝句《静夜思》\\n床前明月光，疑是地上霜。\\n举头望明月，低头思故乡。
    an instruction     [system, user: 以“春江花月”为藏头，作一首七绝。, assistant: a real poem]
    an eval record     the request, its plain-text forms and the real poem, with what to check

The poems are split once, by a seed: the held-out poems behind the eval prompts (and the
held-out text for bits per character) never appear in pretraining or SFT data.
"""
import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from typing import Dict, Iterator, List, Optional, Tuple

from cli import HelpFormatter
from train_tokenizer import SYSTEM_PROMPT

# ---- hyperparameters (CLI flags override) ----
DATA_DIR = "data"      # where the tarball is kept
SPLIT_SEED = 42        # fixes the held-out poems and their eval requests: every run is tested alike
SEED = 42              # the training poems' order, the SFT instructions and the DPO requests (--seed)
N_EVAL = 200           # held-out poems, the same number of each form; each gives one eval prompt
N_PER_CELL = 200       # SFT instructions per (task, form): 4 tasks x 4 forms x 200 = 3,200 chats
N_PREFERENCE = 800     # training requests for DPO's preference pairs (make_preferences.py)
MAX_TITLE = 12         # longer titles are cut (94% of the cleaned titles are no longer)

PACKAGE = "chinese-poetry@2.0.1"
TARBALL = "chinese-poetry-2.0.1.tgz"
SHA256 = "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86"  # of `npm pack chinese-poetry@2.0.1`
MEMBER = re.compile(r"package/dist/quantangshi/poet\.tang\.(\d+)\.json")

# form name -> (lines, characters per line). Poems of chinese-poetry 2.0.1 by poem_form (and
# those load_poems keeps, without repeated lines): 五言绝句 3,902 (3,435), 七言绝句 10,491 (9,830),
# 五言律诗 14,357 (13,293), 七言律诗 7,876 (7,602); 36,626 of 57,607 poems (34,160 kept).
# Reading and converting them takes 3 s on one core.
FORMS = {"五言绝句": (4, 5), "七言绝句": (4, 7), "五言律诗": (8, 5), "七言律诗": (8, 7)}
SHORT_NAMES = {"五言绝句": "五绝", "七言绝句": "七绝", "五言律诗": "五律", "七言律诗": "七律"}
TASKS = ("form", "keyword", "acrostic", "continue")

# Every character of a kept line is a CJK ideograph (the basic block, extension A, the
# compatibility block, extensions B and later): no [ ] of editors, no □ or 囗 for lost characters.
CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
CJK_LINE = re.compile(f"[{CJK}]+")
LOST = "囗"  # a CJK character, but this corpus writes it for a lost one
NUMERAL = re.compile(r"[一二三四五六七八九十百千〇零]+")
# The 40 most frequent characters of the strict poems (不 1.0% of all characters ... 得 0.3%):
# never a keyword, or random lines would hold it by chance too often for the check to mean much.
COMMON_CHARS = set("不人山风一无日云花来春水月有何上时中天年归知相秋长自生心夜去白江君为见是处行此得")


class PoetryError(RuntimeError):
    """The corpus cannot be fetched or read: the message says what to do."""


# ---------------------------------------------------------------- fetching

def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_poetry(data_dir: str = DATA_DIR) -> str:
    """The path of the verified tarball in data_dir, fetched with `npm pack` unless it is there."""
    path = os.path.join(data_dir, TARBALL)
    if not os.path.isfile(path):
        npm = shutil.which("npm")
        if npm is None:
            raise PoetryError("npm not found: install Node.js and npm (Debian/Ubuntu: apt-get install npm; "
                              "or https://nodejs.org), then run again")
        os.makedirs(data_dir, exist_ok=True)
        print(f"fetching {PACKAGE} (85 MB) with npm pack into {data_dir}/")
        result = subprocess.run([npm, "pack", PACKAGE, "--pack-destination", data_dir],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0 or not os.path.isfile(path):
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise PoetryError(f"npm pack {PACKAGE} failed ({last}); check the network or the npm registry")
    digest = sha256_of(path)
    if digest != SHA256:
        # not deleted: it may be a file the user put there; they decide what to do with it
        raise PoetryError(f"{path}: sha256 {digest} is not the expected {SHA256}; "
                          "remove the file and run again to fetch it anew")
    return path


# ---------------------------------------------------------------- reading and parsing

def read_tang_poems(tarball: str) -> Iterator[dict]:
    """Yield {"author", "title", "paragraphs"} of every Tang poem, in simplified characters,
    file by file in the order of their numbers (poet.tang.0, 1000, 2000, ...)."""
    import opencc
    files = {}
    with tarfile.open(tarball, "r:gz") as tar:  # streamed member by member: nothing lands on disk
        for member in tar:
            match = MEMBER.fullmatch(member.name)
            if match and member.isfile():
                files[int(match.group(1))] = tar.extractfile(member).read().decode("utf-8")
    if not files:
        raise PoetryError(f"{tarball}: no package/dist/quantangshi/poet.tang.*.json inside")
    converter = opencc.OpenCC("t2s")
    for number in sorted(files):
        # converting a file's JSON text at once is twice as fast as string by string, and the same:
        # the keys are ASCII and the characters are written as themselves, not \\u escapes
        for poem in json.loads(converter.convert(files[number])):
            yield {"author": poem.get("author") or "", "title": poem.get("title") or "",
                   "paragraphs": list(poem.get("paragraphs") or [])}


def poem_form(paragraphs: List[str]) -> Tuple[Optional[str], List[str]]:
    """(form name, lines) of a poem of a strict form, else (None, the pieces it was cut into).

    The rule: the text is cut into lines after each ， and 。 (any other punctuation, or text
    after the last mark, disqualifies it); the marks alternate ，。，。; there are 4 lines
    (绝句) or 8 (律诗); every line has 5 characters (五言) or every line 7 (七言), CJK
    ideographs only, none of them lost.
    """
    text = "".join(p.strip() for p in paragraphs)
    pieces = re.findall(r"([^，。]*)([，。])", text)
    lines = [line for line, _ in pieces]
    if "".join(line + mark for line, mark in pieces) != text:
        return None, lines
    if len(lines) not in (4, 8) or [mark for _, mark in pieces] != ["，", "。"] * (len(lines) // 2):
        return None, lines
    if not all(CJK_LINE.fullmatch(line) and LOST not in line for line in lines) or len({len(l) for l in lines}) != 1:
        return None, lines
    for name, shape in FORMS.items():
        if shape == (len(lines), len(lines[0])):
            return name, lines
    return None, lines


def clean_title(title: str) -> str:
    """A short plain title: '帝京篇十首 一' -> '帝京篇', '相和歌辞 乌栖曲' -> '乌栖曲'.

    Editors' notes in brackets go; of the space-separated parts the last one that is not a
    series number is the poem's own title; '...十首' loses its count; only CJK characters
    stay, at most MAX_TITLE of them; nothing left gives 无题.
    """
    title = re.sub(r"（[^）]*）|\([^)]*\)", "", title)
    parts = [p for p in title.split() if not NUMERAL.fullmatch(p)]
    title = "".join(CJK_LINE.findall(parts[-1])) if parts else ""
    title = re.sub(r"[一二三四五六七八九十百]+首$", "", title)
    return title[:MAX_TITLE] or "无题"


def load_poems(tarball: str) -> List[dict]:
    """The poems of a strict form, as {"author", "title", "form", "lines"}.

    A poem that repeats a line of a poem kept before it is dropped: the Quan Tang Shi holds
    some poems twice, under two authors or in two variants, and no line of a held-out poem
    may appear in the training data.
    """
    poems, seen = [], set()
    for poem in read_tang_poems(tarball):
        form, lines = poem_form(poem["paragraphs"])
        if form is None or seen.intersection(lines):
            continue
        seen.update(lines)
        poems.append({"author": poem["author"], "title": clean_title(poem["title"]), "form": form, "lines": lines})
    return poems


def split_poems(poems: List[dict], seed: int = SPLIT_SEED, n_eval: int = N_EVAL) -> Tuple[List[dict], List[dict]]:
    """(train, held out), by poem: n_eval // 4 held-out poems of each form, drawn by the seed;
    the training poems are shuffled by the same seed (a corpus in file order is grouped by poet)."""
    rng = random.Random(seed)
    by_form = defaultdict(list)
    for i, poem in enumerate(poems):
        by_form[poem["form"]].append(i)
    held = set()
    for form in FORMS:
        if len(by_form[form]) < n_eval // len(FORMS) + 1:
            raise PoetryError(f"only {len(by_form[form])} poems of {form}: too few to hold out {n_eval // len(FORMS)}")
        held.update(rng.sample(by_form[form], n_eval // len(FORMS)))
    train = [p for i, p in enumerate(poems) if i not in held]
    rng.shuffle(train)
    return train, [poems[i] for i in sorted(held)]


# ---------------------------------------------------------------- text

def poem_body(lines: List[str]) -> str:
    """One couplet a line: '床前明月光，疑是地上霜。\\n举头望明月，低头思故乡。'.

    A couplet is the unit of the form: its two lines are parallel, and the rhyme falls at
    its end, so a line break before each couplet shows the model where a rhyme is due.
    """
    return "\n".join(f"{lines[i]}，{lines[i + 1]}。" for i in range(0, len(lines) - 1, 2))


def poem_header(form: str, title: str) -> str:
    # the form's name before the title: the pretraining probe lifted form accuracy 0.38 -> 0.55
    return f"{form}《{title}》"


def poem_text(poem: dict) -> str:
    """The pretraining text of a poem: its header, then its body."""
    return poem_header(poem["form"], poem["title"]) + "\n" + poem_body(poem["lines"])


# ---------------------------------------------------------------- instructions

# Several wordings per task, so that SFT teaches the request and not one string.
REQUESTS = {
    "form": [
        "写一首{form}，题目是《{title}》。",
        "以《{title}》为题，作一首{form}。",
        "请按{form}的格式写一首诗，题为《{title}》。",
        "能帮我写首{form}吗？题目叫《{title}》。",
        "题目：《{title}》。体裁：{form}。请作诗一首。",
        "来一首{form}吧，就写《{title}》。",
    ],
    "keyword": [
        "写一首{form}，题为《{title}》，诗中要用到“{keyword}”字。",
        "以《{title}》为题作一首{form}，诗里须有“{keyword}”字。",
        "请写一首含有“{keyword}”字的{form}，题目是《{title}》。",
        "用上“{keyword}”这个字，写首{form}，就叫《{title}》。",
        "我想要一首带“{keyword}”字的{form}，题目就叫《{title}》。",
        "作{form}一首，要求出现“{keyword}”字，题目自拟。",
    ],
    "acrostic": [
        "写一首藏头{form}《{title}》，藏“{heads}”{count}字。",
        "以“{heads}”为藏头，作一首{form}，题为《{title}》。",
        "请写一首{form}，题目是《{title}》，每句的第一个字依次是：{head_list}。",
        "帮我写首藏头诗，用{form}的体裁，各句开头连起来是“{heads}”。",
        "藏头诗一首：{form}，题为《{title}》，句首依次为“{heads}”。",
        "把“{heads}”藏在每句开头，写一首{form}，题目叫《{title}》。",
    ],
    "continue": [
        "以“{first}”为首句，写一首{form}，题为《{title}》。",
        "首句是“{first}”，请续成一首{form}，写出全诗。",
        "接着“{first}”往下写，凑成一首完整的{form}《{title}》。",
        "{form}《{title}》的第一句是“{first}”，请写出全诗。",
        "给你一句“{first}”，以它开头写一首{form}，题目是《{title}》。",
        "请对下去：“{first}”——续成{form}《{title}》，连这一句一并写出。",
    ],
}
COUNTS = {4: "四", 8: "八"}
# the header title of an answer to a request that names no title: the header is then always
# what the request says, and the model learns to copy the title (with the poem's real title
# there, it learnt to make titles up, and greedy answers fell on one memorised poem)
UNTITLED = "无题"


def header_title(request: str, title: str) -> str:
    """The title an answer's header names: the request's 《title》, else UNTITLED."""
    return title if f"《{title}》" in request else UNTITLED


def pick_keyword(lines: List[str], rng: random.Random) -> str:
    """A character of the poem that is not one of the most common (COMMON_CHARS)."""
    chars = sorted({c for line in lines for c in line} - COMMON_CHARS)
    return rng.choice(chars or sorted({c for line in lines for c in line}))


def make_instruction(poem: dict, task: str, rng: random.Random) -> Tuple[List[dict], dict]:
    """(chat, meta): a request for `task` that `poem` answers, and what a checker needs.

    Every request names the form (full or short name), so every answer's form is checkable.
    The answer is the poem as pretraining wrote it, header and body: the model first names the
    form and title (copied from the request; UNTITLED when the request names none), and then
    writes the body after a header, as it learnt to in pretraining. For "continue" too, the given first line included, so that all
    answers are whole poems. meta: {"task", "form", "title", "keyword", "acrostic",
    "first_line"}, None where the task has no such field.
    """
    lines = poem["lines"]
    meta = {"task": task, "form": poem["form"], "title": poem["title"], "keyword": None, "acrostic": None,
            "first_line": None}
    if task == "keyword":
        meta["keyword"] = pick_keyword(lines, rng)
    elif task == "acrostic":
        meta["acrostic"] = "".join(line[0] for line in lines)
    elif task == "continue":
        meta["first_line"] = lines[0]
    elif task != "form":
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    heads = meta["acrostic"] or ""
    request = rng.choice(REQUESTS[task]).format(
        form=rng.choice([poem["form"], SHORT_NAMES[poem["form"]]]), title=poem["title"], keyword=meta["keyword"],
        heads=heads, head_list="、".join(heads), count=COUNTS.get(len(heads), ""), first=meta["first_line"])
    answer = poem_header(poem["form"], header_title(request, poem["title"])) + "\n" + poem_body(lines)
    chat = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": request},
            {"role": "assistant", "content": answer}]
    return chat, meta


def build_instructions(poems: List[dict], rng: random.Random, n_per_cell: int = N_PER_CELL
                       ) -> List[Tuple[List[dict], dict]]:
    """SFT chats with their meta, balanced: n_per_cell of every (task, form), shuffled.

    A form with fewer poems than n_per_cell repeats some; the tasks draw their poems apart,
    so one poem may answer two requests.
    """
    by_form = defaultdict(list)
    for poem in poems:
        by_form[poem["form"]].append(poem)
    out = []
    for task in TASKS:
        for form in FORMS:
            pool = by_form[form]
            if not pool:
                raise PoetryError(f"no poems of {form} to build instructions from")
            chosen = rng.sample(pool, n_per_cell) if n_per_cell <= len(pool) else rng.choices(pool, k=n_per_cell)
            out += [make_instruction(poem, task, rng) for poem in chosen]
    rng.shuffle(out)
    return out


def eval_records(poems: List[dict], rng: random.Random) -> List[dict]:
    """One eval record per held-out poem; the tasks take turns within each form, so tasks and
    forms are balanced and the first records already cover every (task, form).

    A record: {"messages": [system, user], "plain_prompt": the request + newline (for a model
    that only saw pretraining text), "header_prompt": the pretraining header + newline,
    "reference": the real poem's body, "meta": as make_instruction}.
    """
    by_form = defaultdict(list)
    for poem in poems:
        by_form[poem["form"]].append(poem)
    records = []
    # the i-th poem of form f gets task (i + f) % 4: each run of 4 records has every form and every task
    for i in range(max(len(v) for v in by_form.values())):
        for f, form in enumerate(FORMS):
            if i >= len(by_form[form]):
                continue
            chat, meta = make_instruction(by_form[form][i], TASKS[(i + f) % len(TASKS)], rng)
            records.append({"messages": chat[:2], "plain_prompt": chat[1]["content"] + "\n",
                            "header_prompt": poem_header(meta["form"], meta["title"]) + "\n",
                            "reference": chat[2]["content"], "meta": meta})
    return records


def preference_records(poems: List[dict], rng: random.Random, n: int = N_PREFERENCE) -> List[dict]:
    """Requests for preference tuning (make_preferences.py), as eval_records: from n training
    poems, a quarter of each form, so the held-out eval requests stay unseen."""
    by_form = defaultdict(list)
    for poem in poems:
        by_form[poem["form"]].append(poem)
    per_form = {form: min(n // len(FORMS), len(by_form[form])) for form in FORMS}  # a small corpus gives what it has
    return eval_records([p for form in FORMS for p in rng.sample(by_form[form], per_form[form])], rng)


def build_demo_data(tarball: str, seed: int = SEED, n_eval: int = N_EVAL, n_per_cell: int = N_PER_CELL,
                    split_seed: int = SPLIT_SEED) -> Dict[str, list]:
    """Everything the demo needs from the corpus, as lists of jsonl records:

    pretrain      {"text": poem_text} of every training poem, in an order drawn by `seed`
    pretrain_val  {"text": poem_text} of the held-out poems (bits per character)
    sft           chats (system, user, assistant) from training poems, balanced over tasks and forms
    eval          eval_records of the held-out poems
    preference    requests from training poems for make_preferences.py (DPO)

    The held-out poems and their requests depend on split_seed only, so runs of any seed are
    measured on the same test; `seed` draws everything a run trains on.
    """
    poems = load_poems(tarball)
    train, held_out = split_poems(poems, split_seed, n_eval)
    rng = random.Random(seed)
    rng.shuffle(train)
    data = {"pretrain": [{"text": poem_text(p)} for p in train],
            "pretrain_val": [{"text": poem_text(p)} for p in held_out],
            "sft": [chat for chat, _ in build_instructions(train, rng, n_per_cell)],
            "eval": eval_records(held_out, random.Random(split_seed))}
    data["preference"] = preference_records(train, rng)
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_dir", default=DATA_DIR, help="where the npm tarball is kept")
    parser.add_argument("--seed", type=int, default=SEED, help="the training poems' order and the instructions (the held-out split stays)")
    parser.add_argument("--n_eval", type=int, default=N_EVAL, help="held-out poems (a quarter of each form)")
    parser.add_argument("--n_per_cell", type=int, default=N_PER_CELL, help="SFT instructions per (task, form)")
    args = parser.parse_args(argv)
    try:
        tarball = fetch_poetry(args.data_dir)
        start = time.time()
        data = build_demo_data(tarball, args.seed, args.n_eval, args.n_per_cell)
    except PoetryError as e:
        sys.exit(f"error: {e}")
    print(f"read, converted and built in {time.time() - start:.1f}s")
    forms = Counter(text["text"].split("《")[0] for text in data["pretrain"] + data["pretrain_val"])
    print("strict poems kept: " + ", ".join(f"{form} {forms[form]:,}" for form in FORMS)
          + f"; {len(data['pretrain']):,} for training, {len(data['pretrain_val'])} held out")
    print(f"{len(data['sft']):,} SFT chats, {len(data['eval'])} eval records\n\nexample pretraining text:\n"
          + data["pretrain"][0]["text"] + "\n\nexample instructions:")
    for record in data["eval"][:8]:
        print(f"  [{record['meta']['task']}] {record['messages'][1]['content']}")


if __name__ == "__main__":
    main()
