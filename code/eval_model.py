"""Measure the poetry demo: bits per character on held-out poems, and requests a script can check.

    python code/eval_model.py --checkpoint output/sft                       # beside output/pretrain
    python code/eval_model.py --checkpoint output/pretrain --mode pretrain  # a model without chat

Prints a table and writes CHECKPOINT/eval.json. The data are what deal_dataset.py --demo
writes from the held-out poems (poetry.py): --eval_data, one request per line with what to
check, and --bpc_data, their pretraining text.

bits per character   summed next-token loss over "<s> text </s>", in bits, divided by the
                     characters of the texts: models with different tokenizers compare
form accuracy        the answer has exactly the lines, and characters per line, asked for
stop rate            the answer ended with <|im_end|> (</s> for a model without chat)
keyword rate         the answer holds the character asked for (keyword requests)
acrostic accuracy    the lines begin with the characters asked for, no line more or less
first-line rate      the answer begins with the line it was given (continue requests)
rhyme rate           the even lines end in one rhyme group (rhymes())
mean score           per answer, the share of the checks it was asked for that it passes
header form / title  the answer's first line names the form asked for, and the title (无题
                     when the request names none): does the answer answer this request?
distinct share       distinct poem bodies / answers: a collapsed model writes one poem for all
repeat rate          answers with a character twice in a row (不不); real poems do it too (青青)
reuse rate           answers using one character more than twice (不是...不知...不可): a formula
                     the checkers cannot see; 3.5% of the held-out poems do it

Columns: the model, greedy and sampled; the pretrained-only model (--baseline), given the
same request as plain text; the real held-out poems (ceiling: form, keyword, acrostic and
first line are 1 by construction, rhyme shows what the rhyme rule lets through); random
lines (floor: the asked-for number of lines of the right length, each from another poem,
so form is 1 by construction and rhyme, keyword and acrostic are chance).
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch

from cli import HelpFormatter
from jsonl import JsonlError, read_jsonl, text_of
from poetry import CJK_LINE, FORMS, SHORT_NAMES, header_title, poem_body

# ---- hyperparameters (CLI flags override) ----
CHECKPOINT = "output/sft"
BASELINE = "output/pretrain"               # the pretrained-only model beside an SFT model
EVAL_DATA = "data/demo_eval.jsonl"
BPC_DATA = "data/demo_pretrain_val.jsonl"
N = 200                                    # eval requests (the file's first N; any prefix is balanced)
MAX_NEW_TOKENS = 100                       # a 七律 is 64 characters and ~70 tokens of the demo tokenizer
BATCH_SIZE = 100
TEMPERATURE = 0.7                          # the sampled run; the greedy run uses 0
TOP_P = 0.9
SEED = 42
N_EXAMPLES = 8                             # (request, answer) pairs kept in eval.json
REUSE_LIMIT = 2                            # reuse rate: answers using one character more often (real poems 3.5%)

HEADER = re.compile(r"^\s*[^\n《]{0,6}《[^》\n]*》[ \t]*\n")  # "五言绝句《题》": the answer's first line, not the poem's
LINE_BREAKS = re.compile(r"[，。？！；：、,.?!;:\n]+")

# 十三辙, the thirteen rhyme groups of northern folk song and opera: pinyin finals that rhyme.
# The medial i/u/ü does not matter (ang iang uang), nor does -n against -ng after i/e (人辰, 中东).
RHYME_GROUPS = {
    "发花": "a ia ua", "梭波": "o e uo", "乜斜": "ie ve", "怀来": "ai uai", "灰堆": "ei uei",
    "遥条": "ao iao", "油求": "ou iou", "言前": "an ian uan van", "人辰": "en in uen vn",
    "江阳": "ang iang uang", "中东": "eng ing ong iong ueng", "一七": "i v er", "姑苏": "u",
}
RHYME_GROUP = {final: group for group, finals in RHYME_GROUPS.items() for final in finals.split()}
# ei/uei rhymed with i (微: 归 衣 飞) and with ai (灰: 回 来 开) in Tang verse; Mandarin split them
ALSO_RHYMES = {"灰堆": {"一七", "怀来"}}


# ---------------------------------------------------------------- the checkers

def parse_answer_lines(text: str) -> List[str]:
    """The lines of an answer's poem: the header line ("七言绝句《题》") dropped, then cut at Chinese
    or ASCII punctuation and line breaks, spaces removed."""
    text = HEADER.sub("", text, count=1)
    return [piece for piece in (re.sub(r"\s+", "", p) for p in LINE_BREAKS.split(text)) if piece]


def check_form(text: str, form: str) -> bool:
    """Exactly the lines the form asks for (绝句 4, 律诗 8), each of exactly 5 (五言) or 7
    (七言) CJK characters. Which mark ends a line does not matter."""
    n_lines, n_chars = FORMS[form]
    lines = parse_answer_lines(text)
    return len(lines) == n_lines and all(len(line) == n_chars and CJK_LINE.fullmatch(line) for line in lines)


def rhyme_groups(char: str) -> set:
    """The rhyme groups of a character, one per reading (看 kàn/kān, 行 xíng/háng both count)."""
    from pypinyin import Style, pinyin
    if not CJK_LINE.fullmatch(char):
        return set()
    groups = {RHYME_GROUP.get(final, final) for final in pinyin(char, style=Style.FINALS, heteronym=True)[0]}
    return groups.union(*(ALSO_RHYMES.get(g, set()) for g in groups))


def rhymes(lines: List[str]) -> bool:
    """Do the even lines (2nd, 4th, ...) end in one rhyme group? At least two even lines needed.

    Modern readings, grouped by 十三辙 (RHYME_GROUPS, ALSO_RHYMES). Tang rhymes follow Middle
    Chinese, so some real poems fail, mostly on old entering-tone characters. Measured on
    3,000 random poems: real ones pass 92% (绝句 91-95%, 律诗 88-91%), random lines of the
    same shape 7% (绝句 15%, 律诗 1%); the 200 held-out poems 97% vs 8-10%. 十三辙 without
    ALSO_RHYMES: 81% vs 5%; the same final only: 32% vs 3%; the same final after dropping
    the medial: 59% vs 4%.
    """
    ends = [line[-1] for line in lines[1::2]]
    if len(ends) < 2:
        return False
    return bool(set.intersection(*(rhyme_groups(c) for c in ends)))


def keyword_ok(text: str, keyword: str) -> bool:
    return keyword in "".join(parse_answer_lines(text))


def acrostic_ok(text: str, heads: str) -> bool:
    """One line per head character, each beginning with it, in order."""
    lines = parse_answer_lines(text)
    return len(lines) == len(heads) and all(line[0] == head for line, head in zip(lines, heads))


def first_line_ok(text: str, first_line: str) -> bool:
    lines = parse_answer_lines(text)
    return bool(lines) and lines[0] == first_line


HEADER_PARTS = re.compile(r"^\s*([^\n《]{0,6})《([^》\n]*)》[ \t]*\n")


def header_of(text: str) -> Tuple[Optional[str], Optional[str]]:
    """(form, title) that an answer's header line names ("七言绝句《春望》"), (None, None) without one."""
    match = HEADER_PARTS.match(text)
    return (match.group(1).strip(), match.group(2)) if match else (None, None)


def header_form_ok(text: str, form: str) -> bool:
    """The header names the form asked for (its full or short name)."""
    return header_of(text)[0] in (form, SHORT_NAMES[form])


def asked_title(record: dict) -> str:
    """The title the answer's header should name: the request's 《title》, else 无题 (poetry.header_title)."""
    return header_title(record["messages"][-1]["content"], record["meta"]["title"])


def has_repeat(text: str) -> bool:
    """A character written twice in a row inside a line (不不). Real poems do it too (青青,
    萧萧): compare with the ceiling column, not with 0."""
    return any(a == b for line in parse_answer_lines(text) for a, b in zip(line, line[1:]))


def most_uses(text: str) -> int:
    """How often the poem's most used character appears (its lines, the header line dropped)."""
    return max(Counter("".join(parse_answer_lines(text))).values(), default=0)


def answer_body(text: str) -> str:
    """The poem without its header line, spaces removed: two answers that differ only in the
    header (the title copied from the request) have the same body."""
    return re.sub(r"\s+", "", HEADER.sub("", text, count=1))


def score_answer(answer: str, meta: dict) -> Dict[str, Optional[bool]]:
    """Every check of an answer against its request's meta (poetry.make_instruction); None
    where the request did not ask for it."""
    lines = parse_answer_lines(answer)
    return {
        "form": check_form(answer, meta["form"]),
        "rhyme": rhymes(lines),
        "keyword": keyword_ok(answer, meta["keyword"]) if meta.get("keyword") else None,
        "acrostic": acrostic_ok(answer, meta["acrostic"]) if meta.get("acrostic") else None,
        "first_line": first_line_ok(answer, meta["first_line"]) if meta.get("first_line") else None,
    }


def answer_score(checks: Dict[str, Optional[bool]]) -> float:
    """One number in [0, 1] for an answer: the share of its applicable checks it passes
    (a reward for preference tuning, say)."""
    passed = [bool(v) for v in checks.values() if v is not None]
    return sum(passed) / len(passed)


# ---------------------------------------------------------------- bits per character

def bits_per_char_from_nats(total_nats: float, n_chars: int) -> float:
    """A summed loss in nats over texts of n_chars characters, as bits per character."""
    return total_nats / math.log(2) / n_chars


@torch.no_grad()
def text_nats(model, tokenizer, texts: List[str], device="cpu", batch_size=BATCH_SIZE) -> Tuple[float, int]:
    """(summed next-token loss in nats, predicted tokens) over the texts, each read the way
    pretraining reads it: <s> text </s>. A text longer than the model's context is scored in
    consecutive windows (each starting afresh), so nothing is left out."""
    from k_model import IGNORE_INDEX
    window = model.config.max_seq_len
    pieces = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
        pieces += [ids[s:s + window + 1] for s in range(0, len(ids) - 1, window)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, n_tokens = 0.0, 0
    for b in range(0, len(pieces), batch_size):
        batch = pieces[b:b + batch_size]
        width = max(len(p) for p in batch) - 1
        x = torch.tensor([p[:-1] + [pad] * (width + 1 - len(p)) for p in batch], device=device)
        y = torch.tensor([p[1:] + [IGNORE_INDEX] * (width + 1 - len(p)) for p in batch], device=device)
        n = int((y != IGNORE_INDEX).sum())
        # the mean loss over the batch's tokens (fp32); right padding: causal attention keeps it out
        total += model(x, targets=y).loss.item() * n
        n_tokens += n
    return total, n_tokens


def bits_per_char(model, tokenizer, texts: List[str], device="cpu", batch_size=BATCH_SIZE) -> float:
    """Loss x tokens / characters, in bits: </s> is predicted too, but only the text's characters count."""
    total, _ = text_nats(model, tokenizer, texts, device, batch_size)
    return bits_per_char_from_nats(total, sum(len(t) for t in texts))


# ---------------------------------------------------------------- generating

def generate_batch(generator, prompts: List[List[int]], stop_id: int, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int, batch_size: int = BATCH_SIZE) -> Tuple[List[str], List[bool]]:
    """(answer, stopped) for every prompt (token ids), batch_size prompts at a time
    (TextGenerator.generate_batch)."""
    answers, stopped = [], []
    for b in range(0, len(prompts), batch_size):
        texts, stops = generator.generate_batch(prompts[b:b + batch_size], stop_id, max_new_tokens=max_new_tokens,
                                                temperature=temperature, top_p=top_p, seed=seed + b)
        answers += texts
        stopped += stops
    return answers, stopped


def prompt_ids(generator, record: dict, chat: bool, plain_prompt: str = "request") -> List[int]:
    """A record's prompt: its chat through the template (chat), or as plain text after <s>."""
    if chat:
        messages = record["messages"]
        return generator.chat_prompt_ids(messages[-1]["content"], messages[:-1])
    text = record["plain_prompt" if plain_prompt == "request" else "header_prompt"]
    return [generator.tokenizer.bos_token_id] + generator.tokenizer(text, add_special_tokens=False)["input_ids"]


def run_model(generator, records: List[dict], chat: bool, args) -> Dict[str, Tuple[List[str], List[bool]]]:
    """{"greedy": (answers, stopped), "sampled": (...)} of one model on the records."""
    # shortest forms first: a batch runs until its longest answer ends, so 绝句 are best batched apart
    order = sorted(range(len(records)), key=lambda i: FORMS[records[i]["meta"]["form"]])
    prompts = [prompt_ids(generator, records[i], chat, args.plain_prompt) for i in order]
    stop_id = generator.im_end_id if chat else generator.tokenizer.eos_token_id
    runs = {}
    # the sampled run once per seed (--seeds): their spread tells a real difference from luck
    settings = [("greedy", 0.0, args.seed)] + [(f"sampled_{k}", args.temperature, args.seed + k) for k in range(args.seeds)]
    for name, temperature, seed in settings:
        answers, stopped = generate_batch(generator, prompts, stop_id, args.max_new_tokens, temperature,
                                          args.top_p, seed, args.batch_size)
        in_order = [None] * len(records)  # back to the records' order
        for k, i in enumerate(order):
            in_order[i] = (answers[k], stopped[k])
        runs[name] = ([a for a, _ in in_order], [s for _, s in in_order])
    return runs


def mean_and_sd(summaries: List[dict]) -> Tuple[dict, dict]:
    """The mean of several summarize() results (the sampled runs of several seeds), and the
    standard deviation of each metric across them."""
    def stats(values):
        if any(v is None for v in values):
            return None, None
        mean = sum(values) / len(values)
        return round(mean, 4), round((sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5, 4)
    mean, sd = {}, {}
    for key in summaries[0]:
        if key == "form_accuracy_by_form":
            mean[key] = {form: stats([s[key][form] for s in summaries])[0] for form in summaries[0][key]}
        else:
            mean[key], sd[key] = stats([s[key] for s in summaries])
    return mean, sd


# ---------------------------------------------------------------- scoring

def random_lines(records: List[dict], seed: int = SEED) -> List[str]:
    """The floor: for each record, its form's number of lines of its form's length, each drawn
    from the reference poem of another record, set out like a poem."""
    rng = random.Random(seed)
    pool = [(i, line) for i, r in enumerate(records) for line in parse_answer_lines(r["reference"])]
    answers = []
    for i, record in enumerate(records):
        n_lines, n_chars = FORMS[record["meta"]["form"]]
        candidates = [line for j, line in pool if j != i and len(line) == n_chars]
        lines = [rng.choice(candidates) for _ in range(n_lines)]
        answers.append(poem_body(lines))
    return answers


def summarize(answers: List[str], records: List[dict], stopped: Optional[List[bool]] = None) -> dict:
    """The metrics of a column: shares of answers passing each check, over the requests that
    ask for it (None where no request does); stop rate only for generated answers."""
    checks = [score_answer(a, r["meta"]) for a, r in zip(answers, records)]

    def rate(values):
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 4) if values else None

    by_form = {form: rate([c["form"] for c, r in zip(checks, records) if r["meta"]["form"] == form])
               for form in FORMS}
    titles = [asked_title(r) for r in records]
    return {"form_accuracy": rate([c["form"] for c in checks]),
            "header_form_rate": rate([header_form_ok(a, r["meta"]["form"]) for a, r in zip(answers, records)]),
            "header_title_rate": rate([header_of(a)[1] == t for a, t in zip(answers, titles)]),
            "distinct_share": round(len({answer_body(a) for a in answers}) / len(answers), 4) if answers else None,
            "repeat_rate": rate([has_repeat(a) for a in answers]),
            "reuse_rate": rate([most_uses(a) > REUSE_LIMIT for a in answers]),
            "stop_rate": rate(stopped) if stopped is not None else None,
            "keyword_rate": rate([c["keyword"] for c in checks]),
            "acrostic_accuracy": rate([c["acrostic"] for c in checks]),
            "first_line_rate": rate([c["first_line"] for c in checks]),
            "rhyme_rate": rate([c["rhyme"] for c in checks]),
            "mean_score": rate([answer_score(c) for c in checks]),
            "form_accuracy_by_form": by_form}


METRICS = ("form_accuracy", "stop_rate", "keyword_rate", "acrostic_accuracy", "first_line_rate", "rhyme_rate",
           "mean_score", "header_form_rate", "header_title_rate", "distinct_share", "repeat_rate", "reuse_rate")


def format_table(metrics: Dict[str, dict]) -> str:
    """Metrics down, columns across; form accuracy also by form (does the model write only one?)."""
    def row(label, cells):
        # a CJK character takes two columns of a terminal
        pad = 20 - len(label) - sum(ord(c) > 0x2E80 for c in label)
        return label + " " * pad + "".join(f"{'-' if v is None else f'{v:.3f}':>17}" for v in cells)

    columns = list(metrics)
    lines = [" " * 20 + "".join(f"{c:>17}" for c in columns)]
    for name in METRICS:
        lines.append(row(name, [metrics[c][name] for c in columns]))
        if name == "form_accuracy":
            lines += [row(f"  {form}", [metrics[c]["form_accuracy_by_form"][form] for c in columns])
                      for form in FORMS]
    return "\n".join(lines)


def summarize_runs(paths: List[str]) -> str:
    """Several eval.json files (one a training seed, say) as one table: per metric and column,
    the mean and [min, max] over the runs. One run is one draw; this is the recipe."""
    results = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            results.append(json.load(f))
    columns = [c for c in results[0]["metrics"] if all(c in r["metrics"] for r in results)]
    lines = [f"{len(results)} runs: mean [min, max]", " " * 20 + "".join(f"{c:>22}" for c in columns)]

    def cell(values):
        values = [v for v in values if v is not None]
        return f"{'-':>22}" if not values else f"{sum(values) / len(values):.3f} [{min(values):.2f}, {max(values):.2f}]".rjust(22)
    bpc_names = [k for k in results[0]["bits_per_char"] if k not in ("n_texts", "n_chars")]
    for name in bpc_names:
        lines.append(f"bits/char {name}".ljust(20) + cell([r["bits_per_char"].get(name) for r in results]))
    for name in METRICS:
        lines.append(name.ljust(20) + "".join(cell([r["metrics"][c][name] for r in results]) for c in columns))
    return "\n".join(lines)


# ---------------------------------------------------------------- the eval

def read_eval_records(path: str) -> List[dict]:
    def parse(record):
        if not isinstance(record, dict) or not isinstance(record["messages"], list):
            raise TypeError("expected an eval record of poetry.eval_records")
        if record["meta"]["form"] not in FORMS:
            raise ValueError(f"unknown form {record['meta']['form']!r}")
        for key in ("plain_prompt", "header_prompt", "reference"):
            if not isinstance(record[key], str):
                raise TypeError(f"'{key}' is not a string")
        return record
    return list(read_jsonl(path, parse))


def evaluate(args) -> dict:
    from model_sample import TextGenerator
    start = time.time()
    records = read_eval_records(args.eval_data)[:args.n]
    texts = list(read_jsonl(args.bpc_data, text_of))
    chat = args.mode == "chat"
    models = [("model", args.checkpoint, chat)]
    for path in args.compare or []:  # other chat models, as columns beside this one (SFT beside DPO, say)
        models.append((os.path.basename(os.path.normpath(path)), path, True))
    if chat and args.baseline:
        if os.path.isdir(args.baseline):
            models.append(("pretrain", args.baseline, False))
        else:
            print(f"note: no baseline: {args.baseline} is not a directory")

    with_baseline = any(name == "pretrain" for name, _, _ in models)
    result = {"checkpoint": args.checkpoint, "mode": args.mode, "baseline": args.baseline if with_baseline else None,
              "compare": args.compare or [],
              "eval_data": args.eval_data, "bpc_data": args.bpc_data, "n": len(records),
              "plain_prompt": args.plain_prompt,
              "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                           "top_p": args.top_p, "seed": args.seed, "seeds": args.seeds},
              "bits_per_char": {"n_texts": len(texts), "n_chars": sum(len(t) for t in texts)}, "metrics": {}}
    outputs = {}
    for name, path, as_chat in models:
        generator = TextGenerator(path, device=args.device)
        result["bits_per_char"][name] = round(bits_per_char(generator.model, generator.tokenizer, texts,
                                                            generator.device, args.batch_size), 4)
        runs = run_model(generator, records, as_chat, args)
        greedy, sampled = runs.pop("greedy"), [summarize(answers, records, stopped) for answers, stopped in runs.values()]
        prefix = "" if name == "model" else f"{name}_"
        outputs[prefix + "greedy"], outputs[prefix + "sampled"] = greedy[0], runs["sampled_0"][0]
        result["metrics"][prefix + "greedy"] = summarize(greedy[0], records, greedy[1])
        result["metrics"][prefix + "sampled"], sd = mean_and_sd(sampled)
        if args.seeds > 1:
            result.setdefault("sampled_sd", {})[prefix + "sampled"] = sd
    result["metrics"]["ceiling"] = summarize([r["reference"] for r in records], records)
    result["metrics"]["floor"] = summarize(random_lines(records, args.seed), records)
    result["examples"] = [{"request": r["messages"][-1]["content"], "meta": r["meta"],
                           **{column: answers[i] for column, answers in outputs.items()},
                           "checks": score_answer(outputs["greedy"][i], r["meta"])}
                          for i, r in enumerate(records[:N_EXAMPLES])]
    result["seconds"] = round(time.time() - start, 1)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="the model directory to evaluate")
    parser.add_argument("--mode", choices=["chat", "pretrain"], default="chat",
                        help="chat: requests through the chat template; pretrain: as plain text after <s>")
    parser.add_argument("--baseline", default=BASELINE,
                        help="in chat mode, a pretrained-only model given the requests as plain text ('' = none)")
    parser.add_argument("--plain_prompt", choices=["request", "header"], default="request",
                        help="plain text for a model without chat: the request, or the pretraining header 五言绝句《题》")
    parser.add_argument("--eval_data", default=EVAL_DATA, help="eval requests (poetry.eval_records)")
    parser.add_argument("--bpc_data", default=BPC_DATA, help='held-out {"text": ...} lines for bits per character')
    parser.add_argument("--n", type=int, default=N, help="how many requests of --eval_data (its first N)")
    parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS, help="answer length limit")
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="requests (or texts) per batch")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE, help="of the sampled run")
    parser.add_argument("--top_p", type=float, default=TOP_P, help="of the sampled run; 1.0 = off")
    parser.add_argument("--seed", type=int, default=SEED, help="of the sampled run and the random lines")
    parser.add_argument("--seeds", type=int, default=1, help="sampled runs, with seeds SEED, SEED+1, ...: the table shows their mean, eval.json their spread")
    parser.add_argument("--compare", nargs="+", help="other chat models evaluated beside --checkpoint, as columns named by their directory (default: none)")
    parser.add_argument("--out", default=None, help="the JSON file to write (default: CHECKPOINT/eval.json)")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    parser.add_argument("--summarize", nargs="+", metavar="EVAL_JSON",
                        help="only print the mean and range of these eval.json files (runs of several seeds)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.summarize:
        try:
            print(summarize_runs(args.summarize))
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"error: {e}")
        return
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    names = [os.path.basename(os.path.normpath(path)) for path in args.compare or []]
    if len(set(names)) < len(names) or {"model", "pretrain"} & set(names):
        parser.error("--compare: the directories name the columns, so they need distinct names other than model and pretrain")
    try:
        result = evaluate(args)
    except (JsonlError, FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    out = args.out or os.path.join(args.checkpoint, "eval.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=2)

    bpc = result["bits_per_char"]
    print(f"bits per character on {bpc['n_texts']} held-out texts ({bpc['n_chars']:,} characters): "
          + ", ".join(f"{name} {value:.3f}" for name, value in bpc.items() if name not in ("n_texts", "n_chars")))
    print(f"\n{result['n']} requests ({args.checkpoint}, {args.mode} mode)\n" + format_table(result["metrics"]))
    for column, sd in result.get("sampled_sd", {}).items():
        print(f"{column}: mean of {args.seeds} seeds; sd across them: "
              + ", ".join(f"{k} {v:.3f}" for k, v in sd.items() if v is not None))
    print("\nceiling = the real held-out poems, floor = random lines of the right shape; "
          f"written to {out} ({result['seconds']}s)")


if __name__ == "__main__":
    main()
