r"""有监督微调（SFT，对应第 5.5.2 节）：在对话数据上跑预训练的训练循环，只对回答部分计算损失。

    python code/ddp_sft.py --preset demo --data_path data/demo_sft.jsonl \
        --val_data_path data/demo_sft_val.jsonl --pretrained_path output/pretrain --out_dir output/sft
    torchrun --nproc_per_node 4 code/ddp_sft.py --data_path data/sft.jsonl --pretrained_path output/pretrain

模型从预训练得到的 save_pretrained 目录开始，严格加载：缺少或形状不符的权重，
或与预设不同的模型结构，都会报错。
"""
import argparse
import os
import sys

import torch

import ddp_pretrain
from ddp_pretrain import run_training
from harness import (MODEL_FIELDS, Dist, add_stats, build_parser, dry_run, lm_loss, model_config, parse_args, set_seed,
                     tokenizer_for_run)
from jsonl import JsonlError
from k_model import IGNORE_INDEX

# ---- 超参数：在这里修改；预设（--preset）会覆盖这些值，命令行参数又覆盖两者 ----
# 优先级：DEFAULTS < 预设 < 命令行参数。用了 --preset demo 时，demo 预设里出现的键（learning_rate、
# batch_size、epochs 等）以预设为准，改这里不起作用：要改就改 PRESETS["demo"]，或直接在命令行传参。
DEFAULTS = dict(
    ddp_pretrain.DEFAULTS,              # 其余超参数沿用预训练脚本的默认值，下面只列 SFT 不同的
    data_path="data/sft.jsonl",         # SFT 数据：每行一段对话（消息列表），至少有一条 assistant 回答
    pretrained_path="output/pretrain",  # ddp_pretrain.py 的输出目录（预训练权重）
    out_dir="output/sft",               # 微调后的模型保存到这里
    preset=None,              # None：模型结构就是预训练检查点里的结构
    epochs=3,                 # 章节的 SFT 命令（5.7.3）
    batch_size=8,             # 每个进程每个微批的对话数（同 5.7.3）
    learning_rate=1e-5,       # 比预训练的 2e-4 小得多：在预训练权重上微调，别冲掉已学到的东西（同 5.7.3）
    warmup_iters=100,         # 学习率预热的步数
    pack_chats=False,         # 把每批的对话打包进少数几行，而不是把每段对话都填充到等长
    unlikelihood=0.0,         # > 0：另加“把上一个字再写一遍”的 unlikelihood 损失，乘以这个权重（见 repeat_unlikelihood）
    lora_rank=0,              # > 0：用 PEFT 训练该秩的 LoRA 适配器，而不是更新全部权重
    lora_alpha=16,            # LoRA 缩放：更新量为 alpha / rank x B A
    lora_dropout=0.05,        # LoRA 支路上的 dropout
    lora_targets="wq,wk,wv,wo,w1,w2,w3",  # 加适配器的 Linear 层（注意力的 wq/wk/wv/wo，前馈的 w1/w2/w3）
)
# 与预训练相同的模型结构，配上微调用的超参数。demo 用 3 个 epoch：因为训练 2 个 epoch 后，对不同请求的
# 贪心解码回答常常是同一首诗（distinct share 0.43，即互不相同的回答占比），而 4 个会让每字符比特数（bits per char）变差
PRESETS = {
    # 章节的模型结构（dim=1024, n_layers=18），只含模型字段，训练超参数用上面的 DEFAULTS
    "chapter": dict(ddp_pretrain.PRESETS["chapter"]),
    # 从预训练 demo 预设里只取模型结构字段（MODEL_FIELDS），训练超参数另设：
    # 小模型用大学习率，对话打包成行，每 100 步在整个验证集上（eval_iters=-1）算一次验证损失
    "demo": dict({k: ddp_pretrain.PRESETS["demo"][k] for k in MODEL_FIELDS if k in ddp_pretrain.PRESETS["demo"]},
                 dtype="auto", pack_chats=True, batch_size=16, accumulation_steps=1, learning_rate=2e-3, warmup_iters=20, epochs=3,
                 max_steps=-1, log_interval=25, save_interval=1000, eval_interval=100, eval_iters=-1,
                 # 不加它时，41-78% 的贪心回答带叠字（“不不”），真实的诗是 23%（README：演示的测量结果）
                 unlikelihood=3.0),
}


def repeat_unlikelihood(logits, X, Y):
    """token 级 unlikelihood 训练（Welleck et al., 2019），候选只有一个：上一个 token。

    对回答中下一个字不是重复的位置 t（Y_t != X_t），惩罚 -log(1 - p(X_t))，即模型把刚写的字再写
    一遍的概率；真实的叠字（青青）处 Y_t == X_t，照常只有交叉熵。返回这些位置上的平均值。"""
    logits = logits.float()
    log_p_again = logits.gather(-1, X[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    penalty = -torch.log1p(-log_p_again.exp().clamp(max=1 - 1e-6))
    keep = (Y != IGNORE_INDEX) & (Y != X)
    return (penalty * keep).sum() / keep.sum().clamp(min=1)


def sft_objective(unlikelihood: float):
    """SFT 的损失：章节的 model(X, Y).loss，unlikelihood > 0 时再加上 unlikelihood x repeat_unlikelihood。
    记下的验证损失仍是交叉熵；训练日志里的 loss 是两者之和，unlikelihood 一项另记。"""
    if unlikelihood == 0:
        return lm_loss

    def loss(model, X, Y, stats):
        out = model(X, Y)
        penalty = repeat_unlikelihood(out.logits, X, Y)
        n_tokens = (Y != IGNORE_INDEX).sum()
        add_stats(stats, loss_sum=out.loss.detach() * n_tokens, weight=n_tokens, unlikelihood=penalty.detach() * n_tokens)
        return out.loss + unlikelihood * penalty
    return loss


def requested_architecture(args, tokenizer) -> dict:
    """预设或命令行要求的模型字段（检查点必须与之一致），以及分词器的词表大小。"""
    # 只收集给了值的字段；不用预设时它们都是 None，即接受检查点原有的结构
    fields = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")
              if getattr(args, k) is not None}
    return {**fields, "vocab_size": len(tokenizer)}


def add_lora(model, args):
    """冻结模型，用 PEFT 加上 LoRA 适配器（save_model 把适配器单独存到 OUT_DIR/adapter，
    把合并后的模型存到 OUT_DIR）。"""
    from peft import LoraConfig, get_peft_model
    # 只训练低秩矩阵 A、B；bias="none"：偏置不训练
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=[t.strip() for t in args.lora_targets.split(",")], bias="none")
    return get_peft_model(model, config)


def init_model(args, tokenizer, ctx: Dist):
    """章节的 init_model（5.5.2）：加载预训练模型，而且严格加载（章节的 strict=False 会让
    没对上的权重悄悄保留随机值）；--lora_rank > 0 时再加上 LoRA 适配器。分词器已由 main 先加载。"""
    from k_model import load_model
    # 从预训练权重开始（SFT 与预训练的区别之三）；结构与预设/参数不符、缺权重都直接报错
    model = load_model(args.pretrained_path, config=requested_architecture(args, tokenizer), dropout=args.dropout)
    ctx.print(f"loaded {args.pretrained_path}")
    if args.lora_rank > 0:
        model = add_lora(model, args)
        # 只数需要梯度的参数：LoRA 时只有适配器可训练
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ctx.print(f"LoRA rank {args.lora_rank} on {args.lora_targets}: {trainable:,} trainable parameters")
    return model


def lora_parameter_count(config, args) -> int:
    """LoRA 适配器的可训练参数量：每个加了适配器的 Linear 为 rank * (输入维度 + 输出维度)。"""
    from k_model import Transformer
    import torch
    with torch.device("meta"):  # 只要形状，不占内存
        model = Transformer(config)
    targets = {t.strip() for t in args.lora_targets.split(",")}
    # 按模块名的最后一段（如 wq）匹配，与 PEFT 的 target_modules 一样
    return sum(args.lora_rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets)


def add_arguments(parser, defaults=DEFAULTS, pretrained_help="the pretrained model directory"):
    """从已保存的模型开始微调（SFT，以及之后的 DPO）用的参数：模型在哪，以及 LoRA。"""
    parser.add_argument("--pretrained_path", help=f"{pretrained_help} (default: {defaults['pretrained_path']})")
    parser.add_argument("--lora_rank", type=int, help=f"LoRA rank; 0 = full fine-tuning (default: {defaults['lora_rank']})")
    parser.add_argument("--lora_alpha", type=float, help=f"LoRA scaling: the update is alpha / rank x B A "
                        f"(default: {defaults['lora_alpha']})")
    parser.add_argument("--lora_dropout", type=float, help=f"dropout on the LoRA path (default: {defaults['lora_dropout']})")
    parser.add_argument("--lora_targets", help=f"comma-separated names of the Linear layers that get adapters "
                        f"(default: {defaults['lora_targets']})")


def plan(args, tokenizer):
    """--dry_run：模型结构取自预训练目录的 config.json（不读权重），没有它就按命令行参数。"""
    from k_model import ModelConfig
    have_pretrained = os.path.isfile(os.path.join(args.pretrained_path, "config.json"))
    config = ModelConfig.from_pretrained(args.pretrained_path) if have_pretrained \
        else model_config(args, tokenizer)
    trainable = lora_parameter_count(config, args) if args.lora_rank > 0 else None
    return dry_run(args, config, tokenizer, trainable)


def main(argv=None):
    """SFT 入口：加载预训练权重和分词器，读入对话数据，再交给与预训练相同的训练循环。"""
    # 沿用预训练脚本的参数定义，只是默认值换成 SFT 的 DEFAULTS 和 PRESETS
    parser = build_parser(__doc__, DEFAULTS, PRESETS)
    add_arguments(parser)
    parser.add_argument("--pack_chats", action=argparse.BooleanOptionalAction,
                        help=f"pack each batch's chats into as few rows as fit (dataset.pack_chats) instead of "
                             f"padding each (default: {DEFAULTS['pack_chats']})")
    parser.add_argument("--unlikelihood", type=float, help=f"weight of the unlikelihood loss on writing the previous "
                        f"token again (repeat_unlikelihood); 0 = the chapter's loss (default: {DEFAULTS['unlikelihood']})")
    args = parse_args(argv, parser, DEFAULTS, PRESETS)  # 在这里叠加：DEFAULTS < 预设 < 命令行参数
    if args.unlikelihood < 0:  # 负的权重会奖励叠字
        parser.error(f"--unlikelihood must be >= 0, got {args.unlikelihood}")
    tokenizer = tokenizer_for_run(args)  # 先确认数据文件存在，再加载分词器（--dry_run 没有分词器也行）

    from dataset import SFTDataset
    if args.dry_run:
        return plan(args, tokenizer)
    from pretokenize import tokenizer_fingerprint
    # 预训练目录里存有分词器时，它必须与这次用的相同：换了分词器，token id 就对不上预训练权重
    if os.path.isfile(os.path.join(args.pretrained_path, "tokenizer.json")) and \
            tokenizer_fingerprint(args.pretrained_path) != tokenizer_fingerprint(args.tokenizer_path):
        sys.exit(f"error: {args.pretrained_path} was pretrained with another tokenizer than {args.tokenizer_path}")
    ctx = Dist(args.device)
    set_seed(args.seed)
    try:
        model = init_model(args, tokenizer, ctx)
        # 对话截断长度：预设或命令行给了 max_seq_len 就用它，否则用模型的上下文长度
        max_length = args.max_seq_len or model.config.max_seq_len
        # SFTDataset 套用对话模板并生成损失掩码：只有 assistant 的回答（连同 <|im_end|>）计算损失
        train_set = SFTDataset(args.data_path, tokenizer, max_length=max_length)
        val_set = SFTDataset(args.val_data_path, tokenizer, max_length=max_length) \
            if args.val_data_path else None
    except (FileNotFoundError, ValueError, JsonlError) as e:
        ctx.close()
        sys.exit(f"error: {e}")
    # 随机组批，每批截到其中最长的对话，或者打包（--pack_chats）：按长度把对话分组组批，
    # 在 demo 上训练效果差得多（README：SFT）。sample_mode="chat"：报告里的样例用对话方式生成
    run_training(args, model, train_set, val_set, ctx, trim_batches=True, sample_mode="chat",
                 objective=sft_objective(args.unlikelihood))


if __name__ == "__main__":
    main()
