r"""Supervised fine-tuning (chapter 5.5.2): the pretraining loop on chats, loss on answers only.

    python code/ddp_sft.py --preset demo --data_path data/demo_sft.jsonl \
        --val_data_path data/demo_sft_val.jsonl --pretrained_path output/pretrain --out_dir output/sft
    torchrun --nproc_per_node 4 code/ddp_sft.py --data_path data/sft.jsonl --pretrained_path output/pretrain

The model starts from a pretrained save_pretrained directory, loaded strictly: a missing or
misshapen weight, or an architecture other than the preset's, is an error.
"""
import argparse
import os
import sys

import ddp_pretrain
from ddp_pretrain import Dist, check_paths, parse_args, run_training, set_seed
from jsonl import JsonlError
from train_tokenizer import load_tokenizer

# ---- hyperparameters: edit here; a preset overrides these, CLI flags override both ----
DEFAULTS = dict(
    ddp_pretrain.DEFAULTS,
    data_path="data/sft.jsonl",
    pretrained_path="output/pretrain",  # a ddp_pretrain.py output directory
    out_dir="output/sft",
    preset=None,              # None: the architecture is whatever the pretrained checkpoint has
    epochs=3,                 # the chapter's SFT command (5.7.3)
    batch_size=8,
    learning_rate=1e-5,
    warmup_iters=100,
    pack_chats=False,         # pack each batch's chats into few rows instead of padding every chat
    lora_rank=0,              # > 0: train LoRA adapters of this rank (PEFT) instead of every weight
    lora_alpha=16,
    lora_dropout=0.05,
    lora_targets="wq,wk,wv,wo,w1,w2,w3",  # the Linear layers that get adapters
)
# same architectures as pretraining, with fine-tuning hyperparameters. Demo: 3 epochs, because after 2
# greedy answers to different requests were often one poem (distinct share 0.43), and 4 cost bits per char
PRESETS = {
    "chapter": dict(ddp_pretrain.PRESETS["chapter"]),
    "demo": dict({k: ddp_pretrain.PRESETS["demo"][k] for k in ddp_pretrain.MODEL_FIELDS if k in ddp_pretrain.PRESETS["demo"]},
                 dtype="auto", pack_chats=True, batch_size=16, accumulation_steps=1, learning_rate=2e-3, warmup_iters=20, epochs=3,
                 max_steps=-1, log_interval=25, save_interval=1000, eval_interval=100, eval_iters=-1),
}


def requested_architecture(args, tokenizer) -> dict:
    """The model fields the preset or flags ask for (the checkpoint must match them), and the
    tokenizer's vocabulary size."""
    fields = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")
              if getattr(args, k) is not None}
    return {**fields, "vocab_size": len(tokenizer)}


def add_lora(model, args):
    """Freeze the model and add LoRA adapters with PEFT (save_model keeps the adapter on its own
    in OUT_DIR/adapter and the merged model in OUT_DIR)."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=[t.strip() for t in args.lora_targets.split(",")], bias="none")
    return get_peft_model(model, config)


def init_model(args, tokenizer, ctx: Dist):
    """The chapter's init_model (5.5.2): the pretrained model, loaded strictly (the chapter's
    strict=False silently kept random weights for whatever did not match), with LoRA adapters
    when --lora_rank > 0. The tokenizer was loaded before, by main."""
    from k_model import load_model
    model = load_model(args.pretrained_path, config=requested_architecture(args, tokenizer), dropout=args.dropout)
    ctx.print(f"loaded {args.pretrained_path}")
    if args.lora_rank > 0:
        model = add_lora(model, args)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ctx.print(f"LoRA rank {args.lora_rank} on {args.lora_targets}: {trainable:,} trainable parameters")
    return model


def lora_parameter_count(config, args) -> int:
    """Trainable parameters of LoRA adapters: rank * (inputs + outputs) per adapted Linear."""
    from k_model import Transformer
    import torch
    with torch.device("meta"):  # shapes only, no memory
        model = Transformer(config)
    targets = {t.strip() for t in args.lora_targets.split(",")}
    return sum(args.lora_rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets)


def add_arguments(parser, defaults=DEFAULTS, pretrained_help="the pretrained model directory"):
    """The flags of fine-tuning from a saved model (SFT, and DPO after it): where it is, and LoRA."""
    parser.add_argument("--pretrained_path", help=f"{pretrained_help} (default: {defaults['pretrained_path']})")
    parser.add_argument("--lora_rank", type=int, help=f"LoRA rank; 0 = full fine-tuning (default: {defaults['lora_rank']})")
    parser.add_argument("--lora_alpha", type=float, help=f"LoRA scaling: the update is alpha / rank x B A "
                        f"(default: {defaults['lora_alpha']})")
    parser.add_argument("--lora_dropout", type=float, help=f"dropout on the LoRA path (default: {defaults['lora_dropout']})")
    parser.add_argument("--lora_targets", help=f"comma-separated names of the Linear layers that get adapters "
                        f"(default: {defaults['lora_targets']})")


def plan(args, tokenizer):
    """--dry_run: the architecture from the pretrained config.json (no weights read), else the flags."""
    from k_model import ModelConfig
    have_pretrained = os.path.isfile(os.path.join(args.pretrained_path, "config.json"))
    config = ModelConfig.from_pretrained(args.pretrained_path) if have_pretrained \
        else ddp_pretrain.model_config(args, tokenizer)
    trainable = lora_parameter_count(config, args) if args.lora_rank > 0 else None
    return ddp_pretrain.dry_run(args, config, tokenizer, trainable)


def main(argv=None):
    parser = ddp_pretrain.build_parser(__doc__, DEFAULTS, PRESETS)
    add_arguments(parser)
    parser.add_argument("--pack_chats", action=argparse.BooleanOptionalAction,
                        help=f"pack each batch's chats into as few rows as fit (dataset.pack_chats) instead of "
                             f"padding each (default: {DEFAULTS['pack_chats']})")
    args = parse_args(argv, parser, DEFAULTS, PRESETS)
    try:
        check_paths(args)
        tokenizer = ddp_pretrain.load_tokenizer_or_none(args) if args.dry_run else load_tokenizer(args.tokenizer_path)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")

    from dataset import SFTDataset
    if args.dry_run:
        return plan(args, tokenizer)
    from pretokenize import tokenizer_fingerprint
    if os.path.isfile(os.path.join(args.pretrained_path, "tokenizer.json")) and \
            tokenizer_fingerprint(args.pretrained_path) != tokenizer_fingerprint(args.tokenizer_path):
        sys.exit(f"error: {args.pretrained_path} was pretrained with another tokenizer than {args.tokenizer_path}")
    ctx = Dist(args.device)
    set_seed(args.seed)
    try:
        model = init_model(args, tokenizer, ctx)
        max_length = args.max_seq_len or model.config.max_seq_len
        train_set = SFTDataset(args.data_path, tokenizer, max_length=max_length)
        val_set = SFTDataset(args.val_data_path, tokenizer, max_length=max_length) \
            if args.val_data_path else None
    except (FileNotFoundError, ValueError, JsonlError) as e:
        ctx.close()
        sys.exit(f"error: {e}")
    # random batches, cut to their longest chat or packed (--pack_chats): grouping chats by length
    # trained far worse on the demo (README: SFT)
    run_training(args, model, train_set, val_set, ctx, trim_batches=True, sample_mode="chat")


if __name__ == "__main__":
    main()
