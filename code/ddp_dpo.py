r"""Preference tuning with DPO (Direct Preference Optimization): after SFT, the model learns to
prefer the better of two answers to a request.

    python code/make_preferences.py --checkpoint output/sft     # -> data/demo_dpo{,_val}.jsonl
    python code/ddp_dpo.py --preset demo                         # output/sft -> output/dpo
    torchrun --nproc_per_node 2 code/ddp_dpo.py --preset demo

Each line of --data_path holds a prompt and two answers, "chosen" and "rejected". The policy
starts as the SFT model, and a frozen copy of it is the reference. With log p(answer) the summed
log-probability of the answer's tokens given the prompt:

    reward(answer) = beta * (log p_policy(answer) - log p_reference(answer))
    loss           = -log sigmoid(reward(chosen) - reward(rejected))

The loss falls as the policy raises the chosen answer and lowers the rejected one, each measured
against the reference; no reward model, and beta sets how far the policy may move. Training is
ddp_pretrain's loop (train_epoch, under torchrun too) with this loss in place of model(X, Y).loss.
Logged: loss, reward_margin (reward(chosen) - reward(rejected)), reward_accuracy (share of pairs
with a positive margin), kl (log p_reference - log p_policy per answer: on answers the reference
sampled, an estimate of KL(reference || policy) in nats).
"""
import sys

import torch
import torch.nn.functional as F

import ddp_sft
from ddp_pretrain import run_training
from harness import Dist, add_stats, build_parser, parse_args, set_seed, tokenizer_for_run
from jsonl import JsonlError

# ---- hyperparameters: edit here; a preset overrides these, CLI flags override both ----
DEFAULTS = dict(
    ddp_sft.DEFAULTS,
    data_path="data/dpo.jsonl",       # make_preferences.py writes these
    val_data_path=None,
    pretrained_path="output/sft",       # the SFT model: the policy's start and the frozen reference
    out_dir="output/dpo",
    epochs=1,
    batch_size=8,                       # pairs per batch (16 rows: chosen and rejected)
    learning_rate=1e-6,
    warmup_iters=10,
    beta=0.1,                           # larger: the policy stays closer to the reference
)
PRESETS = {
    "chapter": dict(ddp_sft.PRESETS["chapter"]),
    "demo": dict(ddp_sft.PRESETS["demo"], data_path="data/demo_dpo.jsonl", val_data_path="data/demo_dpo_val.jsonl",
                 batch_size=8, learning_rate=2e-5, warmup_iters=10, epochs=2, log_interval=10, eval_interval=50),
}


def token_logps(logits, Y):
    """log p of each target token (0 where Y is IGNORE_INDEX: the prompt and the padding).
    Flattened to (tokens, vocab): cross_entropy over a (batch, vocab, seq) view is 3x slower on CPU."""
    from k_model import IGNORE_INDEX
    token_nll = F.cross_entropy(logits.flatten(0, 1).float(), Y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -token_nll.view_as(Y)


def sequence_logps(logits, Y):
    """log p(answer | prompt) of each row: the summed log-probabilities of its trained tokens."""
    return token_logps(logits, Y).sum(dim=-1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta):
    """Per pair: the DPO loss, and the implicit rewards of the chosen and the rejected answer."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


class DPOObjective:
    """The loss train_epoch calls in place of model(X, Y).loss. A batch's rows are its pairs'
    chosen answers, then their rejected answers (PreferenceDataset.collate)."""

    def __init__(self, reference, beta: float):
        self.reference, self.beta = reference, beta

    def __call__(self, model, X, Y, stats: dict):
        policy = sequence_logps(model(X, all_logits=True).logits, Y)  # every position's logits, no mean loss
        with torch.no_grad():
            reference = sequence_logps(self.reference(X, all_logits=True).logits, Y)
        n = len(X) // 2
        losses, chosen_reward, rejected_reward = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.beta)
        margin = (chosen_reward - rejected_reward).detach()
        add_stats(stats, loss_sum=losses.detach().sum(), weight=n, reward_margin=margin.sum(),
                  reward_accuracy=(margin > 0).sum(), kl=(reference - policy.detach()).sum() / 2)
        return losses.mean()


def load_reference(args, tokenizer, device):
    """The frozen reference: a second copy of the starting model, never trained."""
    from k_model import load_model
    reference = load_model(args.pretrained_path, config=ddp_sft.requested_architecture(args, tokenizer))
    return reference.to(device).eval().requires_grad_(False)


def main(argv=None):
    parser = build_parser(__doc__, DEFAULTS, PRESETS)
    ddp_sft.add_arguments(parser, DEFAULTS, "the SFT model: where the policy starts, and the frozen reference")
    parser.add_argument("--beta", type=float, help=f"how strongly the reference holds the policy (default: {DEFAULTS['beta']})")
    args = parse_args(argv, parser, DEFAULTS, PRESETS)
    if args.beta <= 0:
        parser.error("--beta must be > 0")
    tokenizer = tokenizer_for_run(args)
    from dataset import PreferenceDataset
    if args.dry_run:  # planned as SFT on one chat a pair: DPO's second row a pair and its reference come on top
        return ddp_sft.plan(args, tokenizer)
    ctx = Dist(args.device)
    set_seed(args.seed)
    try:
        model = ddp_sft.init_model(args, tokenizer, ctx)
        reference = load_reference(args, tokenizer, ctx.device)
        max_length = args.max_seq_len or model.config.max_seq_len
        train_set = PreferenceDataset(args.data_path, tokenizer, max_length=max_length)
        val_set = PreferenceDataset(args.val_data_path, tokenizer, max_length=max_length) if args.val_data_path else None
    except (FileNotFoundError, ValueError, JsonlError) as e:
        ctx.close()
        sys.exit(f"error: {e}")
    ctx.print(f"{len(train_set)} preference pairs, beta {args.beta}; the reference is a frozen copy of {args.pretrained_path}")
    run_training(args, model, train_set, val_set, ctx, trim_batches=True, sample_mode="chat",
                 objective=DPOObjective(reference, args.beta))


if __name__ == "__main__":
    main()
