r"""Reinforcement learning from checkable rewards (GRPO): the SFT model writes poems, the eval's
checkers score them, and the model learns from its own best and worst attempts, on-policy.

    python code/ddp_grpo.py --preset demo                        # output/sft -> output/grpo
    torchrun --nproc_per_node 2 code/ddp_grpo.py --preset demo

Each step takes --batch_size requests (training poems' requests, never the eval's) and samples
--group_size answers to each from the current model. eval_model.score_answer checks every answer
against its own request (form, rhyme, and the keyword, acrostic or first line asked for; the
rhyme with different characters, see reward_checks; --max_char_uses adds one: no character used
too often); the reward is the share of checks passed, 0 for an answer that never ends. The
policy is the model at the sampling temperature T, p_policy = softmax(logits / T). Within a group:

    advantage  = reward - mean(group's rewards)          (/ std(group's rewards) with --scale_rewards)
    ratio      = p_policy(token) / p_sampling(token)     (1 here, but its gradient is d log p_policy)
    token loss = -min(ratio * advantage, clip(ratio, 1 - clip, 1 + clip) * advantage)
                 + beta * (r - log r - 1),  r = p_reference(token) / p_policy(token)
    loss       = mean over answers of (mean over the answer's tokens)
                 + sft_coef * (SFT loss on --sft_rows chats of the SFT file)

An answer better than its group's others becomes more likely, a worse one less, and a group
whose answers all score the same teaches nothing (its advantages are 0). The reference is a
frozen copy of the starting model; beta (0 allowed) holds the policy near it. DPO (ddp_dpo.py)
learns from pairs sampled once before training; here every step samples from the model as it
is now. The loop is ddp_pretrain's train_epoch (DDP under torchrun: each rank samples its own
requests, the gradients are averaged) with this loss in place of model(X, Y).loss, one
optimizer step per sampled batch (so the ratio is 1 and the clip never binds).

Logged per step: reward, signal (share of groups whose rewards differ), the pass rate of each
check among the answers it applies to (form, rhyme, keyword, ..., varied), kl (the estimate
above, per token), sft, answer_tokens, stopped, and sample_s / train_s (seconds per micro-batch
sampling vs everything else).
"""
import argparse
import sys
import time

import torch
from torch.utils.data import Dataset

import ddp_sft
from ddp_dpo import load_reference, token_logps
from dataset import SFTDataset
from ddp_pretrain import run_training
from eval_model import MAX_NEW_TOKENS, answer_score, most_uses, parse_answer_lines, read_eval_records, score_answer
from harness import Dist, add_stats, build_parser, parse_args, set_seed, tokenizer_for_run
from jsonl import JsonlError
from k_model import IGNORE_INDEX

# ---- hyperparameters: edit here; a preset overrides these, CLI flags override both ----
DEFAULTS = dict(
    ddp_sft.DEFAULTS,
    data_path="data/demo_dpo_prompts.jsonl",  # requests from training poems with what to check (deal_dataset.py --demo)
    val_data_path=None,
    pretrained_path="output/sft",       # the SFT model: the policy's start and the frozen reference
    out_dir="output/grpo",
    epochs=1,
    max_steps=-1,
    batch_size=8,                       # requests per micro-batch per process; x group_size answers
    learning_rate=1e-5,
    warmup_iters=10,
    group_size=8,                       # answers sampled per request
    beta=0.04,                          # KL to the reference; 0 = none
    clip=0.2,                           # PPO's clip range on the probability ratio
    scale_rewards=False,                # divide advantages by the group's reward std (GRPO's paper does)
    temperature=1.0,                    # T: the answers are sampled from softmax(logits / T), the policy trained
    max_new_tokens=MAX_NEW_TOKENS,      # an answer still going after this many tokens scores 0
    sft_coef=0.0,                       # weight of the SFT loss on SFT chats kept on beside the reward; 0 = none
    sft_data="data/demo_sft.jsonl",     # those chats (ddp_sft.py's training file)
    sft_rows=8,                         # chats per micro-batch, in the same forward as the answers
    max_char_uses=0,                    # > 0: one more check, no character of the poem used more often than this
)
PRESETS = {
    # 120 steps of 8 requests x 8 answers (1.2 passes over the 800 requests): 6-8 minutes on 2 AVX2 cores.
    # Measured on the demo SFT model (README): temperature 0.7, the eval's, is what made rhyme move (at 1.0
    # the groups spent their signal on form, which the eval at 0.7 already had); sft_coef 0 raised bits
    # per character by 0.63; lr 5e-5 or 2e-4, unscaled advantages or beta 0.1 moved little
    "demo": dict(ddp_sft.PRESETS["demo"], data_path="data/demo_dpo_prompts.jsonl", val_data_path=None,
                 pack_chats=False, batch_size=8, learning_rate=1e-3, warmup_iters=10, epochs=1, max_steps=120,
                 scale_rewards=True, beta=0.04, temperature=0.7, sft_coef=0.1, log_interval=10, eval_interval=1000,
                 save_interval=50),
}
CHECKS = ("form", "rhyme", "keyword", "acrostic", "first_line")


class RequestDataset(Dataset):
    """The requests: each item its prompt's token ids (the chat template, ready for the answer)."""

    def __init__(self, path, tokenizer):
        self.records = read_eval_records(path)
        self.tokenizer = tokenizer

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        messages = self.records[index]["messages"]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"], index

    def collate(self, items, multiple: int = 1):
        """(prompts left-padded with pad_token_id, the requests' indices, the prompts' mask)."""
        width = max(len(ids) for ids, _ in items)
        width = -(-width // multiple) * multiple
        pad = self.tokenizer.pad_token_id
        X = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in items])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in items])
        return X, torch.tensor([index for _, index in items]), mask


def group_advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    """(requests, group) rewards -> advantages: each answer's reward minus its group's mean."""
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + 1e-4)
    return advantages


def reward_checks(answer: str, meta: dict, max_char_uses: int = 0) -> dict:
    """eval_model.score_answer's checks, with the rhyme closed to one trick: the same character at
    the end of every even line "rhymes". The first long run here found it (飞 ending every line,
    飞飞飞飞 inside them, bits per character +0.8); Tang poets did not reuse a rhyme character.
    max_char_uses > 0 adds "varied": no character of the poem used more often than that."""
    checks = score_answer(answer, meta)
    ends = [line[-1] for line in parse_answer_lines(answer)[1::2]]
    checks["rhyme"] = checks["rhyme"] and len(set(ends)) == len(ends)
    if max_char_uses:
        checks["varied"] = most_uses(answer) <= max_char_uses
    return checks


def grpo_loss(logp, sampling_logp, reference_logp, advantages, mask, clip: float, beta: float):
    """The clipped policy-gradient loss with a KL penalty, (answers, tokens) in; (loss, kl per answer) out.
    mask is 1 on answer tokens; each answer's tokens are averaged, then the answers."""
    ratio = torch.exp(logp - sampling_logp)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    log_r = reference_logp - logp
    kl = torch.exp(log_r) - log_r - 1  # >= 0, an unbiased estimate of KL(policy || reference) on the policy's samples
    per_token = per_token + beta * kl
    n_tokens = mask.sum(dim=1).clamp(min=1)
    per_answer = (per_token * mask).sum(dim=1) / n_tokens
    return per_answer.mean(), ((kl * mask).sum(dim=1) / n_tokens).detach()


def answers_and_stops(out: torch.Tensor, stop_id: int, max_new_tokens: int):
    """generate()'s output -> (answer token lists, each ending in stop_id if it stopped; stopped flags).
    A row stopped if it holds stop_id, or if generation ended early (every row had stopped)."""
    cut_short = out.shape[1] < max_new_tokens
    answers, stopped = [], []
    for row in out.tolist():
        end = row.index(stop_id) if stop_id in row else len(row)
        stops = end < len(row) or cut_short
        answers.append(row[:end] + ([stop_id] if stops else []))
        stopped.append(stops)
    return answers, stopped


class GRPOObjective:
    """The loss train_epoch calls in place of model(X, Y).loss. X holds a batch of prompts, Y the
    indices of their requests; the answers are sampled here, from the policy as it is now."""

    def __init__(self, policy, reference, dataset: RequestDataset, args, rank: int = 0):
        self.policy, self.reference, self.dataset, self.args = policy, reference, dataset, args
        self.stop_id = dataset.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.calls, self.rank, self.sampled_at = 0, rank, None
        # --sft_coef: the SFT loss kept on beside the reward (as InstructGPT kept the pretraining loss
        # on beside PPO's), so that the policy keeps writing poems like the real ones while it chases
        # the checkers (bits per character). Raw pretraining text here taught the answers to end
        # with </s> instead of <|im_end|>: stop rate 0.96 -> 0.62 in 20 steps.
        self.chats = SFTDataset(args.sft_data, dataset.tokenizer, policy.config.max_seq_len) if args.sft_coef > 0 else None
        self.chat_generator = torch.Generator().manual_seed(args.seed * 1_000_003 + rank)  # each rank its own chats

    def sft_rows(self):
        """sft_rows random SFT chats: (inputs, targets) lists, targets IGNORE_INDEX off the answers."""
        picks = torch.randint(len(self.chats), (self.args.sft_rows,), generator=self.chat_generator).tolist()
        rows = []
        for X, Y, _ in (self.chats[i] for i in picks):
            length = int((Y != IGNORE_INDEX).nonzero().max()) + 1  # cut the padding after the answer
            rows.append((X[:length], Y[:length]))
        return rows

    def sample(self, X, Y):
        """group_size answers to every prompt of X: (prompt ids, answer ids, stopped) per answer."""
        pad, g = self.dataset.tokenizer.pad_token_id, self.args.group_size
        mask = (X != pad).long()
        self.policy.eval()
        out = self.policy.generate(X.repeat_interleave(g, 0), stop_id=self.stop_id, attention_mask=mask.repeat_interleave(g, 0),
                                   max_new_tokens=self.args.max_new_tokens, temperature=self.args.temperature,
                                   seed=self.args.seed * 1_000_003 + self.calls * 1009 + self.rank)
        self.policy.train()
        limit = min(self.args.max_new_tokens, self.policy.config.max_seq_len - X.shape[1])  # as generate() cuts it
        answers, stopped = answers_and_stops(out, self.stop_id, limit)
        prompts = [row[m.bool()].tolist() for row, m in zip(X, mask) for _ in range(g)]
        return prompts, answers, stopped

    def rewards(self, Y, answers, stopped):
        """(requests, group) rewards, and each check's passes and applicable counts."""
        decode = self.dataset.tokenizer.decode
        g = self.args.group_size
        names = CHECKS + (("varied",) if self.args.max_char_uses else ())
        rewards, passed, asked = [], dict.fromkeys(names, 0), dict.fromkeys(names, 0)
        for k, (answer, stops) in enumerate(zip(answers, stopped)):
            meta = self.dataset.records[int(Y[k // g])]["meta"]
            checks = reward_checks(decode(answer, skip_special_tokens=True).strip(), meta, self.args.max_char_uses)
            rewards.append(answer_score(checks) if stops else 0.0)
            for name, ok in checks.items():
                if ok is not None:
                    asked[name] += 1
                    passed[name] += bool(ok) and stops
        return torch.tensor(rewards).view(-1, g), passed, asked

    def batch(self, prompts, answers, device, extra_rows=()):
        """Prompt + answer per row, right-padded: inputs, targets (IGNORE_INDEX off the answer).
        extra_rows: (inputs, targets) pairs appended below them (the SFT chats), padded alike."""
        rows = [p + a for p, a in zip(prompts, answers)]
        width = max([len(r) - 1 for r in rows] + [len(x) for x, _ in extra_rows])
        pad = self.dataset.tokenizer.pad_token_id
        inputs = torch.full((len(rows) + len(extra_rows), width), pad)
        targets = torch.full((len(rows) + len(extra_rows), width), IGNORE_INDEX)
        for i, (p, r) in enumerate(zip(prompts, rows)):
            inputs[i, :len(r) - 1] = torch.tensor(r[:-1])
            targets[i, len(p) - 1:len(r) - 1] = torch.tensor(r[len(p):])  # the answer's tokens, each after its prefix
        for i, (x, y) in enumerate(extra_rows, start=len(rows)):
            inputs[i, :len(x)], targets[i, :len(y)] = x, y
        return inputs.to(device), targets.to(device)

    def __call__(self, model, X, Y, stats: dict):
        start = time.time()
        # everything between two samplings (scoring, both forwards, backward, optimizer step) counts as training
        train_s = start - self.sampled_at if self.sampled_at is not None else 0.0
        prompts, answers, stopped = self.sample(X, Y)
        self.calls += 1
        self.sampled_at = time.time()
        sample_s = self.sampled_at - start
        rewards, passed, asked = self.rewards(Y, answers, stopped)
        advantages = group_advantages(rewards, self.args.scale_rewards).view(-1).to(X.device)
        # the SFT chats go through the same forward as the answers: DDP allows one forward per backward
        inputs, targets = self.batch(prompts, answers, X.device, self.sft_rows() if self.chats is not None else ())
        n = len(answers)
        logits = model(inputs, all_logits=True).logits  # every position's, without the unused mean loss
        mask = (targets[:n] != IGNORE_INDEX).float()
        # the policy is the model at the sampling temperature, softmax(logits / T): the answers came from it
        T = self.args.temperature
        logp = token_logps(logits[:n] / T, targets[:n])
        with torch.no_grad():
            reference_logp = token_logps(self.reference(inputs[:n], all_logits=True).logits / T, targets[:n])
        loss, kl = grpo_loss(logp, logp.detach(), reference_logp, advantages, mask, self.args.clip, self.args.beta)
        if self.chats is not None:  # SFT's loss on those rows (at T = 1): the mean over their answer tokens
            sft_loss = -token_logps(logits[n:], targets[n:]).sum() / (targets[n:] != IGNORE_INDEX).sum()
            loss = loss + self.args.sft_coef * sft_loss
            add_stats(stats, sft=sft_loss.detach() * n)
        signal = (rewards.max(dim=1).values > rewards.min(dim=1).values).float().mean().item()
        add_stats(stats, loss_sum=loss.detach() * n, weight=n, reward=rewards.sum().item(), signal=signal * n,
                  kl=kl.sum(), answer_tokens=mask.sum().item(), stopped=float(sum(stopped)),
                  sample_s=sample_s * n, train_s=train_s * n,
                  **passed, **{f"weight_{name}": count for name, count in asked.items()})
        return loss


def main(argv=None):
    parser = build_parser(__doc__, DEFAULTS, PRESETS)
    ddp_sft.add_arguments(parser, DEFAULTS, "the SFT model: where the policy starts, and the frozen reference")
    parser.add_argument("--group_size", type=int, help=f"answers sampled per request (default: {DEFAULTS['group_size']})")
    parser.add_argument("--beta", type=float, help=f"weight of the KL penalty to the reference; 0 = none (default: {DEFAULTS['beta']})")
    parser.add_argument("--clip", type=float, help=f"clip range of the probability ratio (default: {DEFAULTS['clip']})")
    parser.add_argument("--scale_rewards", action=argparse.BooleanOptionalAction,
                        help=f"divide each group's advantages by its reward std (default: {DEFAULTS['scale_rewards']})")
    parser.add_argument("--temperature", type=float, help=f"sampling temperature T; the policy trained is "
                        f"softmax(logits / T) (default: {DEFAULTS['temperature']})")
    parser.add_argument("--max_new_tokens", type=int, help=f"answer length limit; longer answers score 0 "
                        f"(default: {DEFAULTS['max_new_tokens']})")
    parser.add_argument("--sft_coef", type=float, help=f"weight of the SFT loss on --sft_data kept on beside the reward; "
                        f"0 = none (default: {DEFAULTS['sft_coef']})")
    parser.add_argument("--sft_data", help=f"SFT chats (jsonl) for --sft_coef (default: {DEFAULTS['sft_data']})")
    parser.add_argument("--max_char_uses", type=int, help=f"> 0: the reward gets one more check, no character of the "
                        f"poem used more often than this; 0 = none (default: {DEFAULTS['max_char_uses']})")
    parser.add_argument("--sft_rows", type=int, help=f"SFT chats per micro-batch (default: {DEFAULTS['sft_rows']})")
    args = parse_args(argv, parser, DEFAULTS, PRESETS)
    if args.group_size < 2:
        parser.error("--group_size must be >= 2: the advantage compares an answer with its group")
    if args.beta < 0 or args.temperature <= 0 or args.sft_coef < 0 or args.sft_rows < 1:
        parser.error("--beta and --sft_coef must be >= 0, --temperature > 0 and --sft_rows >= 1")
    tokenizer = tokenizer_for_run(args)
    if args.dry_run:  # planned as SFT on one chat a request: the group's rows and the reference come on top
        return ddp_sft.plan(args, tokenizer)
    ctx = Dist(args.device)
    set_seed(args.seed)
    try:
        model = ddp_sft.init_model(args, tokenizer, ctx)
        reference = load_reference(args, tokenizer, ctx.device)
        train_set = RequestDataset(args.data_path, tokenizer)
        objective = GRPOObjective(model, reference, train_set, args, ctx.rank)
    except (FileNotFoundError, ValueError, JsonlError) as e:
        ctx.close()
        sys.exit(f"error: {e}")
    ctx.print(f"{len(train_set)} requests, {args.group_size} answers each, beta {args.beta}, sft_coef {args.sft_coef}; "
              f"the reference is a frozen copy of {args.pretrained_path}")
    run_training(args, model, train_set, None, ctx, trim_batches=True, sample_mode="chat", objective=objective)


if __name__ == "__main__":
    main()
