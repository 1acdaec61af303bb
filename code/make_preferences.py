"""Preference pairs for DPO from the SFT model's own answers, scored by the eval's checkers.

    python code/make_preferences.py --checkpoint output/sft    # -> data/demo_dpo.jsonl, data/demo_dpo_val.jsonl

For every request of --prompts (requests from training poems, written by deal_dataset.py --demo;
never the held-out eval requests), the model samples --k answers, in batches with the KV cache.
Each answer gets eval_model.py's score: the share of its request's checks it passes (form, rhyme,
and the keyword, acrostic or first line asked for), and 0 if it never stopped. The best and the
worst answer of a request become a pair (chosen, rejected) when their scores differ; a request
whose answers all score the same gives none.

Both answers of a pair are the model's own samples, never the real poems: DPO then compares two
answers the reference could have written, which is what its loss assumes, and the logged KL
estimate stays meaningful. With 4 samples most requests have a better and a worse answer.
"""
import argparse
import json
import random
import sys
import time

from tqdm import tqdm

from cli import HelpFormatter
from deal_dataset import val_path_for, write_split
from eval_model import (FORMS, MAX_NEW_TOKENS, TEMPERATURE, TOP_P, answer_score, generate_batch, prompt_ids,
                        read_eval_records, score_answer)
from jsonl import JsonlError

# ---- hyperparameters (CLI flags override) ----
CHECKPOINT = "output/sft"
PROMPTS = "data/demo_dpo_prompts.jsonl"
OUT = "data/demo_dpo.jsonl"        # and its _val file beside it
K = 4                              # answers sampled per request
# TEMPERATURE, TOP_P: eval_model's sampled run. At temperature 1.0, top_p 1.0 the demo model's answers
# scored half as well (mean 0.10 against 0.20 on 48 requests x 8): the chosen answers would be worse examples
BATCH_SIZE = 96                    # rows generated together (k answers of batch_size / k requests)
VAL_EVERY = 10                     # one pair in VAL_EVERY goes to the validation file
SEED = 0


def score(answer: str, stopped: bool, meta: dict) -> float:
    """eval_model's score of an answer; an answer that never ended scores 0."""
    return answer_score(score_answer(answer, meta)) if stopped else 0.0


def best_and_worst(answers, stopped, meta):
    """(chosen, rejected, their scores) of one request's answers, or None if all score the same."""
    scores = [score(a, s, meta) for a, s in zip(answers, stopped)]
    best = max(range(len(answers)), key=scores.__getitem__)
    worst = min(range(len(answers)), key=scores.__getitem__)
    if scores[best] == scores[worst] or answers[best] == answers[worst]:
        return None
    return answers[best], answers[worst], scores[best], scores[worst]


def make_pairs(generator, records, args):
    """Sample k answers for every record and keep the pairs; shows progress per batch."""
    # shortest forms first: a batch runs until its longest answer ends
    records = sorted(records, key=lambda r: FORMS[r["meta"]["form"]])
    per_batch = max(1, args.batch_size // args.k)
    pairs, all_scores = [], []
    for b in tqdm(range(0, len(records), per_batch), desc="sampling", unit="batch", file=sys.stderr, disable=None):
        batch = records[b:b + per_batch]
        prompts = [ids for r in batch for ids in [prompt_ids(generator, r, chat=True)] * args.k]
        answers, stopped = generate_batch(generator, prompts, generator.im_end_id, args.max_new_tokens,
                                          args.temperature, args.top_p, args.seed + b, batch_size=len(prompts))
        for i, record in enumerate(batch):
            rows = slice(i * args.k, (i + 1) * args.k)
            all_scores += [score(a, s, record["meta"]) for a, s in zip(answers[rows], stopped[rows])]
            pair = best_and_worst(answers[rows], stopped[rows], record["meta"])
            if pair:
                chosen, rejected, chosen_score, rejected_score = pair
                pairs.append({"prompt": record["messages"], "chosen": chosen, "rejected": rejected,
                              "chosen_score": chosen_score, "rejected_score": rejected_score, "meta": record["meta"]})
    return pairs, all_scores


def write_pairs(pairs, out, val_every):
    """Shuffled (the pairs come sorted by form), then split as deal_dataset.py splits its corpora."""
    random.Random(0).shuffle(pairs)
    write_split(pairs, out, val_path_for(out), val_every)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="the SFT model that writes the answers")
    parser.add_argument("--prompts", default=PROMPTS, help="requests with what to check (poetry.eval_records format)")
    parser.add_argument("--out", default=OUT, help="pairs to write; the validation pairs go to its _val file")
    parser.add_argument("--n", type=int, default=0, help="use the first N requests only; 0 = all")
    parser.add_argument("--k", type=int, default=K, help="answers sampled per request")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE, help="sampling temperature")
    parser.add_argument("--top_p", type=float, default=TOP_P, help="nucleus sampling; 1.0 = off")
    parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS, help="answer length limit")
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="answers generated together")
    parser.add_argument("--val_every", type=int, default=VAL_EVERY, help="one pair in this many is held out; 0 = none")
    parser.add_argument("--seed", type=int, default=SEED, help="of the sampling")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    args = parser.parse_args(argv)
    if args.k < 2:
        parser.error("--k must be at least 2: a pair needs two answers")
    if args.temperature <= 0:
        parser.error("--temperature must be > 0: greedy answers would all be the same")
    from model_sample import TextGenerator
    try:
        records = read_eval_records(args.prompts)
        generator = TextGenerator(args.checkpoint, device=args.device)
    except (JsonlError, FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    records = records[:args.n] if args.n > 0 else records
    start = time.time()
    pairs, scores = make_pairs(generator, records, args)
    if not pairs:
        sys.exit(f"error: no request of {args.prompts} had answers of different scores; raise --k or --temperature")
    try:
        write_pairs(pairs, args.out, args.val_every)
    except JsonlError as e:
        sys.exit(f"error: {e}")
    mean = lambda xs: sum(xs) / len(xs)
    print(f"{len(records)} requests x {args.k} answers in {time.time() - start:.0f} s: mean score {mean(scores):.3f}; "
          f"{len(pairs)} pairs (chosen {mean([p['chosen_score'] for p in pairs]):.3f}, "
          f"rejected {mean([p['rejected_score'] for p in pairs]):.3f})")
    print("example pair:\n" + json.dumps(pairs[0], ensure_ascii=False, indent=1)[:800])


if __name__ == "__main__":
    main()
