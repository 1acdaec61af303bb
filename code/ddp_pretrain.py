r"""预训练（对应第 5.5.1 节）：单进程运行，或在 torchrun 下以分布式数据并行（DistributedDataParallel，DDP）运行。

    python code/ddp_pretrain.py --preset demo --data_path data/demo_pretrain.jsonl \
        --val_data_path data/demo_pretrain_val.jsonl --out_dir output/pretrain
    torchrun --nproc_per_node 4 code/ddp_pretrain.py --data_path data/pretrain.jsonl

每个进程（rank）只训练自己那一份数据；DDP 在每个优化器步把梯度平均一次（梯度累积期间用 no_sync），
只有 rank 0 写日志、存模型。最终模型是 --out_dir 里的一个 save_pretrained 目录，分词器文件放在旁边。
这里保留章节的部分（超参数、get_lr、train_epoch、train），数据集见 dataset.py（第 5.3 节）；
训练循环外围的机制（进程、日志、检查点、断点续训、命令行）都在 harness.py 里。
"""
import math
import os
import sys
import time

import torch

# 训练循环外围的机制（进程、日志、检查点、断点续训、命令行）都在 harness.py 里
from harness import (Dist, Run, TrainingError, autocast, build_parser, check_compatible, check_out_dir,
                     compile_by_default, dry_run, format_eta, lm_loss, make_loader, make_optimizer,
                     model_config, parse_args, pretrain_dataset, read_tokenizer_files, resolve_dtype, resume_state,
                     save_model, set_seed, tokenizer_for_run, wrap_ddp)
from jsonl import JsonlError
from pretokenize import tokenizer_fingerprint
from train_plan import plan_from_args, summary_line

# ---- 超参数：在这里修改。一次运行的设置先取 DEFAULTS，再用所选 --preset 覆盖，最后命令行参数覆盖两者：
# 用 --preset demo 时，要改该预设设定的值就改 PRESETS["demo"]（或传命令行参数）；改 DEFAULTS 只影响预设没设的项。
DEFAULTS = dict(
    data_path="data/pretrain.jsonl",  # 预训练语料：每行 {"text": ...} 的 jsonl，或 pretokenize.py 的 .bin（打包）
    val_data_path=None,           # 留出的验证集 jsonl，用来算验证损失（None = 不验证）
    tokenizer_path="tokenizer_k",  # 第 5.2 节训练好的分词器目录
    out_dir="output/pretrain",    # 最终模型、日志和检查点的输出目录
    preset="chapter",             # 默认用章节的模型尺寸（见下面的 PRESETS）
    epochs=1,                     # 遍历训练数据的轮数
    max_steps=-1,                 # 优化器步数；> 0 时以它为准，不看 epochs
    batch_size=32,                # 每个进程每个微批（micro-batch）的序列数
    accumulation_steps=8,         # 梯度累积：每个优化器步累积的微批数（等效批量 = batch_size x 8 x 进程数）
    learning_rate=2e-4,           # 峰值学习率：预热结束时达到
    min_lr_ratio=0.1,             # 余弦退火降到 learning_rate * min_lr_ratio
    warmup_iters=1000,            # 学习率预热的步数
    weight_decay=0.1,             # AdamW 的权重衰减（归一化层等一维参数不衰减）
    grad_clip=1.0,                # 梯度裁剪：梯度总范数的上限，防止梯度爆炸
    log_interval=100,             # 每隔多少个优化器步打印一次日志
    save_interval=1000,           # 每隔多少步保存一次训练检查点
    eval_interval=1000,           # 每隔多少步算一次验证损失
    eval_iters=100,               # 每个进程的验证批数（-1 = 整个验证文件）
    seed=42,                      # 随机种子：权重初始化和数据打乱顺序都由它决定
    device="auto",                # auto = 有 CUDA 就用 cuda，否则用 cpu
    dtype="auto",                 # 混合精度的 dtype；auto：CUDA 上 bf16（不支持时 fp16），CPU 有 bf16 矩阵乘指令时 bf16，否则 fp32
    num_workers=-1,               # DataLoader 的工作进程数；-1 = CUDA 上 4 个，CPU 上 0 个
    use_swanlab=False,            # 同时把指标记录到 swanlab
    report=False,                 # 结束时写出 OUT_DIR/report.md（loss_curve.png 总是会画）
    resume=None,                  # 一个检查点文件；"auto" = out_dir/checkpoints 里最新的那个；"none" = 从头开始
    keep_checkpoints=3,           # out_dir/checkpoints 里保留的训练检查点个数
    max_nonfinite_steps=10,       # 连续这么多步出现 NaN/inf 就停止训练
    compile=None,                 # 用 torch.compile 编译模型；None = 只在 CUDA 上编译
    # 模型结构（由预设设定）
    dim=None, n_layers=None, n_heads=None, n_kv_heads=None, max_seq_len=None, dropout=0.0,
)


PRESETS = {
    # 章节的 215M 模型（5.6.2：dim=1024, n_layers=18），用于 GPU
    "chapter": dict(dim=1024, n_layers=18, n_heads=16, n_kv_heads=8, max_seq_len=512),
    # 1.6M 参数，在 2 个 CPU 核上约 2 分钟，训练打包好的 token 窗口（pretokenize.py）；
    # dtype auto：有 bf16 指令的 CPU 上用 bf16 autocast，其他 CPU 上用 fp32。这个尺寸是固定 2 分钟预算下
    # 扫参胜出的（README：演示模型为什么是这个大小）：模型小、批量小，因为在这个预算下，
    # 多见些 token、多走些优化器步，比把模型加宽更划算
    "demo": dict(dim=128, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=256, dtype="auto",
                 batch_size=4, accumulation_steps=1, learning_rate=2e-3, warmup_iters=100,
                 max_steps=1000, log_interval=100, save_interval=500, eval_interval=250, eval_iters=-1),
}


def get_lr(it: int, total: int, args) -> float:
    """学习率预热与余弦退火（5.5.3）：先线性升到 learning_rate，再按余弦曲线降到 learning_rate * min_lr_ratio。"""
    min_lr = args.learning_rate * args.min_lr_ratio  # 退火的终点
    if it < args.warmup_iters:  # 预热：刚初始化的模型梯度很乱，先用小学习率，逐步升到峰值
        return args.learning_rate * (it + 1) / args.warmup_iters
    if it >= total:  # 超出计划的步数：停在最低学习率
        return min_lr
    progress = (it - args.warmup_iters) / max(1, total - args.warmup_iters)  # 退火进度：0（预热刚结束）到 1
    # cos 从 1 降到 -1，学习率随之从 learning_rate 平滑地降到 min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.learning_rate - min_lr)


def train_epoch(epoch, train_loader, model, optimizer, scaler, run: "Run", args, start_batch=0) -> bool:
    """章节训练循环（5.5.1）的一个 epoch：设定学习率，在 autocast 下前向，反向传播，每累积
    accumulation_steps 个微批做一次梯度裁剪后的优化器步。一步前后的事（日志、验证、检查点、
    NaN 防护、停止信号）归 `run` 管。训练结束时（达到最大步数，或收到停止信号）返回 False。"""
    # start_batch：断点续训时从这个 epoch 里上次停下的那一批接着数
    for step_in_epoch, (X, Y, loss_mask) in enumerate(train_loader, start=start_batch):
        # 本批所在累积窗口的微批数，以及它是不是窗口里的最后一个（是才更新参数）
        window, last_micro = run.accumulation_window(step_in_epoch)
        lr = get_lr(run.step, run.total_steps, args)  # 学习率按优化器步（不是微批）调度
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        X = X.to(run.ctx.device, non_blocking=True)  # 输入 token
        Y = Y.to(run.ctx.device, non_blocking=True)  # 下一个 token；不训练的位置（填充、提示词）为 -100
        # 章节把损失乘以 loss_mask；这里 -100 标签已经让它成为所有训练 token 上的平均。
        # 在 DDP 下，只在窗口的最后一次反向传播时对梯度做 all-reduce。
        with run.no_sync_unless(last_micro):
            with autocast(run.ctx.device_type, run.dtype):  # 混合精度：前向用 bf16/fp16 算，更快、更省显存
                loss = run.loss(model, X, Y) / window  # 即 model(X, Y).loss（DPO：它自己的损失）；除以 window：梯度累积
            scaler.scale(loss).backward()  # 反向传播；float16 时先放大损失，免得小梯度下溢成 0
        run.count(loss, loss_mask)  # 记下损失和训练的 token 数，供日志使用
        if not last_micro:
            if run.stop_in_window(epoch, step_in_epoch):  # 收到停止信号：放弃这个窗口，存检查点后结束
                return False
            continue  # 窗口未满：只累积梯度，不更新参数
        scaler.unscale_(optimizer)  # 先把梯度还原到真实大小，梯度裁剪的阈值才有意义
        # 梯度裁剪：总范数超过 grad_clip 时按比例缩小，防止梯度爆炸；返回裁剪前的范数
        grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), args.grad_clip)
        if run.update_is_finite(grad_norm):  # 出现 NaN/inf 的一步被跳过，不应用到参数上
            scaler.step(optimizer)
        scaler.update()  # 调整下一步的损失缩放系数（只对 float16 起作用）
        # 清空梯度，开始下一个累积窗口；DDP 下梯度就是 all-reduce 桶的视图，置零而不是删掉（删掉会另分配一份）
        optimizer.zero_grad(set_to_none=not run.ctx.ddp)
        if not run.after_step(lr, grad_norm, epoch, step_in_epoch):  # 到时就写日志、验证、存检查点
            return False
    return True


def train(args, model, train_set, val_set, ctx: Dist, trim_batches=False, objective=lm_loss):
    """搭好预训练与 SFT 共用的训练流程并运行：设备与 dtype、断点续训、编译、DDP、AdamW、数据加载器；
    然后反复调用 train_epoch 直到最后一步，最后用 save_pretrained 保存模型并返回它（被信号停下时返回 None）。"""
    from checkpoint import load_weights, new_lineage, set_rng_state
    from k_model import count_parameters
    dtype = resolve_dtype(args.dtype, ctx.device_type)  # 混合精度用的 dtype（auto 的规则见 DEFAULTS）
    if ctx.device_type == "cuda":  # 允许 TF32：float32 的矩阵乘走 Tensor Core，更快
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    raw_model = model.to(ctx.device)  # 未编译、未经 DDP 包装的模型：保存和梯度裁剪都用它
    n_params = count_parameters(raw_model)
    # 先查输出目录的磁盘空间：权重 + AdamW 的两个矩估计，都是 fp32，每个保留的检查点和正在写的那个各一份
    check_out_dir(args.out_dir, n_params * 4 * 3 * (args.keep_checkpoints + 1), ctx)
    tokenizer_sha256 = tokenizer_fingerprint(args.tokenizer_path)  # 分词器指纹：续训时核对是不是同一个分词器
    tokenizer_files = read_tokenizer_files(args.tokenizer_path)  # 最终模型连同这些分词器文件一起保存
    last_checkpoint, state = resume_state(args, ctx)  # 断点续训：要续训的检查点及其内容（从头训练时 state 为 None）
    if state is not None:
        check_compatible(state, raw_model, tokenizer_sha256, ctx, last_checkpoint)  # 模型结构和分词器须与检查点一致
        load_weights(raw_model, state["model"], last_checkpoint)
    use_compile = args.compile if args.compile is not None else compile_by_default(ctx.device)
    trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)  # 可训练参数（LoRA 时只有适配器）
    # 打印一行训练计划摘要（显存、token 数、步数等）
    ctx.print(summary_line(plan_from_args(args, raw_model.config, trainable_params=trainable, world_size=ctx.world_size,
                                          dtype=dtype, compiled=use_compile, samples=len(train_set))))
    eval_model = torch.compile(raw_model) if use_compile else raw_model  # 验证用：可能编译过，但不经 DDP 包装
    model = eval_model
    if ctx.ddp:
        # 分布式数据并行：每个进程持有完整模型，反向传播时自动把各进程的梯度平均
        model = wrap_ddp(eval_model, ctx)  # 见 harness.wrap_ddp：梯度就存放在 all-reduce 桶里，不另存一份
    optimizer = make_optimizer(raw_model, args, ctx.device_type)  # AdamW（见 harness.make_optimizer）
    # 只有 float16 需要损失缩放；bfloat16 的数值范围与 float32 相同
    scaler = torch.amp.GradScaler(ctx.device_type, enabled=dtype == torch.float16)

    # 本进程每个 epoch 的批数，以及按 (epoch, 起始批) 造出本进程 DataLoader 的函数
    batches_per_epoch, epoch_loader = make_loader(train_set, args, ctx, trim_batches)
    if batches_per_epoch == 0:
        raise TrainingError(f"{args.data_path}: {len(train_set)} samples are too few for {ctx.world_size} process(es)")
    # accumulation_steps 个微批算一个优化器步；epoch 末尾不满的窗口也算一步
    steps_per_epoch = math.ceil(batches_per_epoch / args.accumulation_steps)
    # 总步数：max_steps > 0 时用它，否则 epochs x 每轮步数；它也是余弦退火的终点
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
    ctx.print(f"{n_params / 1e6:.2f}M parameters | {len(train_set)} samples, {ctx.world_size} process(es), "
              f"{steps_per_epoch} steps/epoch, {total_steps} steps | device {ctx.device}, {dtype}"
              + (", compiled" if use_compile else ""))

    # 从头训练的起点；lineage 标记这一次训练的检查点系列
    step, epoch, start_batch, run_id, lineage = 0, 0, 0, None, new_lineage()
    if state is not None:  # 断点续训：恢复优化器、损失缩放器、随机数状态和数据读到的位置
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and state["scaler"]:  # bf16/fp32 的运行保存的是空的 scaler 状态
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][ctx.rank])  # 每个进程恢复它自己的随机数状态
        step, epoch, start_batch, run_id = state["step"], state["epoch"], state["batch_in_epoch"], state["run_id"]
        lineage = state.get("lineage") or lineage  # 清理旧检查点时只删这个 lineage 的检查点
        ctx.print(f"resumed from {last_checkpoint}: step {step}, epoch {epoch + 1}, batch {start_batch}")
        del state  # 释放检查点占的内存

    # Run（harness.py）管一步前后的事：日志、验证、检查点、NaN 防护、停止信号
    run = Run(args, ctx, raw_model, model, eval_model, optimizer, scaler, dtype, val_set, batches_per_epoch,
              total_steps, step, last_checkpoint, tokenizer_sha256, run_id, objective)
    run.lineage = ctx.broadcast(lineage)  # 以 rank 0 的为准，各进程一致
    if step == 0:  # 训练前先记下第 0 步的损失，损失曲线从起点画起
        run.log_start(next(iter(epoch_loader(0))))
    try:
        while run.step < total_steps:  # 一个 epoch 接一个 epoch，直到总步数
            if not train_epoch(epoch, epoch_loader(epoch, start_batch), model, optimizer, scaler, run, args, start_batch):
                break
            epoch, start_batch = epoch + 1, 0  # 下一个 epoch 从第一批开始
    finally:  # 运行失败时（某个对等进程挂了），必须随启动器的 SIGTERM 退出，而不是等着写检查点
        run.stop.restore()
    step = run.step
    if use_compile:  # 计算图多于几个，或有任何图中断（graph break），说明编译后的模型比应有的慢
        from torch._dynamo.utils import counters
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        ctx.print(f"torch.compile: {graphs} graphs, {breaks} graph breaks")
        run.logger.log({"compiled_graphs": graphs, "graph_breaks": breaks}, step)
    if run.stopped_by_signal:  # 被信号停下：检查点已写好，可用 --resume auto 接着训练
        ctx.print(f"stopped at step {step}; continue with --resume auto")
    elif ctx.is_master:  # 正常结束：只由 rank 0 保存最终模型
        if tokenizer_fingerprint(args.tokenizer_path) != tokenizer_sha256:  # 训练期间分词器目录被改过
            ctx.print(f"note: {args.tokenizer_path} changed while training; {args.out_dir} gets the tokenizer "
                      "the run started with")
        save_model(raw_model, args, tokenizer_files)  # save_pretrained 目录，连同开始时读到的分词器文件
        ctx.print(f"saved {args.out_dir} after {step} steps in {format_eta(time.time() - run.t_start)}")
    run.logger.close()
    if ctx.is_master:
        from report import plot_losses
        plot_losses(args.out_dir)  # 画损失曲线 loss_curve.png
    return None if run.stopped_by_signal else raw_model  # 被信号停下时没有最终模型


def main(argv=None):
    """预训练入口：解析参数，加载分词器，构建数据集（PretrainDataset 或打包的 PackedDataset）和模型，然后训练。"""
    args = parse_args(argv, build_parser(__doc__, DEFAULTS, PRESETS), DEFAULTS, PRESETS)  # DEFAULTS < 预设 < 命令行
    # 在建进程组和模型之前，先确认数据文件存在，再加载分词器（--dry_run 只估算规模，没有分词器也行）
    tokenizer = tokenizer_for_run(args)
    try:
        config = model_config(args, tokenizer)  # ModelConfig（5.4.1）：尺寸来自预设和参数，词表大小来自分词器
    except ValueError as e:  # 彼此不相容的尺寸，例如 --dim 100 配 8 个头
        sys.exit(f"error: {e}")
    if args.dry_run:
        return dry_run(args, config, tokenizer)  # 只打印训练计划（显存、步数、时间），不训练

    from k_model import Transformer
    ctx = Dist(args.device)  # 进程信息：torchrun 启动时建立进程组（DDP），否则就是单进程
    set_seed(args.seed)
    try:
        # .jsonl：PretrainDataset，像章节那样逐行分词、填充；.bin：PackedDataset，打包好的 token 窗口
        train_set = pretrain_dataset(args.data_path, tokenizer, args)
        val_set = pretrain_dataset(args.val_data_path, tokenizer, args) if args.val_data_path else None
    except (JsonlError, ValueError, FileNotFoundError) as e:
        ctx.close()
        sys.exit(f"error: {e}")
    model = Transformer(config)  # 随机初始化的模型（5.4.7）
    run_training(args, model, train_set, val_set, ctx)


def run_training(args, model, train_set, val_set, ctx: Dist, trim_batches=False, sample_mode="pretrain", objective=lm_loss):
    """调用 train()：用户能自己改正的错误报成一行（并以非零状态退出）；要求时再写报告
    （样例：sample_mode 为 "pretrain" 时是续写，为 "chat" 时是对话回答）。"""
    from checkpoint import CheckpointError
    try:
        finished = train(args, model, train_set, val_set, ctx, trim_batches, objective) is not None
    except (CheckpointError, TrainingError, OSError) as e:
        ctx.close()
        # DataLoader 工作进程里的错误是包在该进程的 traceback 里传来的：最后一行才是错误信息
        message = str(e).strip().splitlines()[-1].split(": ", 1)[-1] if "Original Traceback" in str(e) else str(e)
        sys.exit(f"error: {message}")
    ctx.close()
    # --report：只由 rank 0 写，而且要有保存好的最终模型（config.json）
    # 被信号停下时不写：OUT_DIR 里可能是上一次训练的旧模型
    if args.report and finished and ctx.is_master and os.path.isfile(os.path.join(args.out_dir, "config.json")):
        from model_sample import CHAT_PROMPTS, PRETRAIN_STARTS, TextGenerator
        from report import write_report
        generator = TextGenerator(args.out_dir, device=ctx.device)  # 用刚保存的模型生成几段样例
        if sample_mode == "chat":
            samples = [f"user: {p}\nassistant: {generator.chat(p, max_new_tokens=60)}" for p in CHAT_PROMPTS[:5]]
        else:
            samples = [f"{s}{generator.pretrain_sample(s, max_new_tokens=60)}" for s in PRETRAIN_STARTS[:3]]
        write_report(os.path.join(args.out_dir, "report.md"), [args.out_dir], samples="\n\n".join(samples))


if __name__ == "__main__":
    main()
