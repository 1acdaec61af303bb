"""The machinery around the chapter's training loop (ddp_pretrain.py reads like 5.5.1; this holds the rest).

ddp_pretrain.py, ddp_sft.py and ddp_dpo.py keep the chapter's parts: the hyperparameters, get_lr,
train_epoch, train and main. What a learner need not read to follow 5.5 is here:

- the command line: HELP (one line per flag), build_parser, parse_args (DEFAULTS < preset < flags);
- processes and devices: Dist (one process, or one rank of torchrun), precision (resolve_dtype, autocast);
- logging (Logger: metrics.jsonl, swanlab) and saving (save_model, atomic);
- the loss and the validation loss, the data loader (make_loader: shards, packing, trimming);
- Run: what happens around each optimizer step (logs, validation, checkpoints, the NaN guard, signals);
- resume and the checks before training (resume_state, check_compatible, check_out_dir), the dry run.
"""
import argparse
import datetime
import functools
import inspect
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from cuda_env import cuda_setup_problem
from train_plan import add_plan_arguments, plan_from_args, print_plan
from train_tokenizer import load_tokenizer


# ---------------------------------------------------------------- settings and the command line

DDP_TIMEOUT_MINUTES = 60  # how long a rank waits in a collective before the job fails
SFT_LENGTH_MULTIPLE_CUDA = 64  # trimmed SFT batches round up to this on CUDA: few shapes to compile
MODEL_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "dropout")
DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")

HELP = {  # one line per flag; the defaults are DEFAULTS' (a preset may change them, see --preset)
    "data_path": "training data: a .bin token file (pretokenize.py, packed) or a .jsonl (padded, the chapter's way)",
    "val_data_path": "held-out data for the validation loss, same kinds as --data_path (none: no validation)",
    "tokenizer_path": "directory of the tokenizer (train_tokenizer.py)",
    "out_dir": "where the model, metrics.jsonl, loss_curve.png and checkpoints/ go",
    "device": "auto = cuda if available, else cpu; or cuda, cuda:1, cpu",
    "dtype": "autocast dtype; auto = bfloat16 on CUDA (float16 without native bf16), on CPU bfloat16 where it "
             "has bf16 instructions (AMX, AVX512-BF16), else float32",
    "resume": 'continue from a checkpoint file; "auto": the newest readable one in OUT_DIR/checkpoints; "none": start over',
    "epochs": "passes over the training data (ignored when --max_steps > 0)",
    "max_steps": "optimizer steps to train; > 0 overrides --epochs",
    "batch_size": "sequences per micro-batch per process",
    "accumulation_steps": "micro-batches per optimizer step (global batch = batch_size x this x processes)",
    "learning_rate": "peak learning rate, reached after the warmup",
    "min_lr_ratio": "the cosine decays to learning_rate x this",
    "warmup_iters": "optimizer steps of linear warmup",
    "weight_decay": "AdamW weight decay (not on norms)",
    "grad_clip": "clip the gradient norm to this",
    "log_interval": "print and log the loss every this many optimizer steps",
    "save_interval": "write a training checkpoint every this many optimizer steps (0 = only at the end)",
    "eval_interval": "validation loss every this many optimizer steps (0 = only at the end)",
    "eval_iters": "validation batches per process (-1 = the whole file)",
    "seed": "random seed (model init, data order)",
    "num_workers": "DataLoader worker processes (-1 = 4 on CUDA, 0 on CPU)",
    "keep_checkpoints": "training checkpoints kept in OUT_DIR/checkpoints (the newest)",
    "max_nonfinite_steps": "stop after this many NaN/inf steps in a row",
    "dim": "model width (default: the preset's)",
    "n_layers": "number of DecoderLayers (default: the preset's)",
    "n_heads": "query heads (default: the preset's)",
    "n_kv_heads": "key/value heads, GQA (default: the preset's)",
    "max_seq_len": "tokens per training sequence and the RoPE table's length (default: the preset's)",
    "dropout": "dropout probability",
}

def build_parser(description: str, defaults: dict, presets: dict) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(name, **kwargs):
        default = defaults.get(name)
        shown = "" if default is None else f" (default: {default})"
        p.add_argument(f"--{name}", help=HELP[name] + shown, **kwargs)
    for name in ("data_path", "val_data_path", "tokenizer_path", "out_dir", "device", "resume"):
        add(name)
    add("dtype", choices=DTYPES)
    p.add_argument("--preset", choices=sorted(presets), help="model size and hyperparameters: "
                   + "; ".join(f"{k}: " + ", ".join(f"{f}={v}" for f, v in preset.items()) for k, preset in presets.items())
                   + f" (default: {defaults['preset']}; flags override it)")
    for name in ("epochs", "max_steps", "batch_size", "accumulation_steps", "warmup_iters", "log_interval",
                 "save_interval", "eval_interval", "eval_iters", "seed", "num_workers", "keep_checkpoints",
                 "max_nonfinite_steps", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
        add(name, type=int)
    for name in ("learning_rate", "min_lr_ratio", "weight_decay", "grad_clip", "dropout"):
        add(name, type=float)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model (default: on CUDA cards of compute capability 7.0+, off on CPU)")
    p.add_argument("--report", action="store_true", help="write OUT_DIR/report.md with losses, curve and samples")
    p.add_argument("--use_swanlab", action="store_true", help="log to swanlab in OUT_DIR/swanlog (SWANLAB_MODE: "
                   "offline by default, no account needed)")
    return add_plan_arguments(p)


def parse_args(argv, parser, defaults: dict, presets: dict):
    """The settings of a run: DEFAULTS, then the preset's values over them, then the flags over both
    (so with --preset demo, editing DEFAULTS changes only what the demo preset does not set)."""
    parser.set_defaults(**defaults)
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        if preset not in presets:
            parser.error(f"unknown preset {preset!r}; choose from {', '.join(presets)}")
        parser.set_defaults(**presets[preset])
    args = parser.parse_args(argv)
    for name in ("log_interval", "batch_size", "accumulation_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    for name in ("save_interval", "eval_interval"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0 (0 = never)")
    return args


# ---------------------------------------------------------------- processes, devices, precision

class Dist:
    """Who this process is: rank, world size, device. One process without torchrun."""

    def __init__(self, device: str):
        self.ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device == "auto" or device.startswith("cuda"):
            # a GPU the driver lists but this torch build cannot use: say so instead of training on the CPU
            problem = cuda_setup_problem()
            if problem or (device != "auto" and not torch.cuda.is_available()):
                sys.exit(f"error: {problem or 'no CUDA GPU visible to torch'}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and self.ddp:
            # one GPU per process, by its rank on this node; modulo the visible count for jobs that
            # show each process only its own GPU (Slurm --gpus-per-task=1, CUDA_VISIBLE_DEVICES per rank)
            device = gpu_for_rank(self.local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count())
            torch.cuda.set_device(device)
        self.device = device
        self.device_type = "cuda" if device.startswith("cuda") else "cpu"
        self.flag_group = None  # where any() all-reduces its host flags (see any())
        if self.ddp:
            # a generous timeout: the other ranks wait while rank 0 saves a large checkpoint or evaluates
            timeout = datetime.timedelta(minutes=DDP_TIMEOUT_MINUTES)
            # torchrun --max_restarts reuses its store: without a prefix per attempt, a restarted rank could
            # read a dead rank's address from the attempt before and fail ("Gloo connectFullMesh ... refused")
            store, _, _ = next(dist.rendezvous("env://", self.rank, self.world_size, timeout=timeout))
            store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            if self.device_type == "cuda":  # before NCCL, whose own message is "Duplicate GPU detected"
                check_one_rank_per_gpu(store, self.rank, self.world_size, device)
            dist.init_process_group(backend="nccl" if self.device_type == "cuda" else "gloo", store=store,
                                    rank=self.rank, world_size=self.world_size, timeout=timeout)
            # host flags (a stop signal) on a gloo group: an NCCL all-reduce would sync the GPU every micro-batch
            self.flag_group = dist.new_group(backend="gloo") if self.device_type == "cuda" else dist.group.WORLD
        self.is_master = self.rank == 0

    def print(self, *args, **kwargs):
        if self.is_master:
            print(*args, **kwargs, flush=True)

    def all_reduce_sum(self, values):
        """Sum a list of floats over all ranks (one small collective)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.ddp:
            dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (so all ranks take the same branch). A CPU tensor on
        a gloo group: cheap enough to ask after every micro-batch, and the GPU's queue keeps running."""
        if not self.ddp:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.flag_group)
        return bool(t.item())

    def broadcast(self, obj):
        """Rank 0's obj, on every rank."""
        if not self.ddp:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj):
        """Every rank's obj, in rank order (on every rank)."""
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.ddp:
            dist.destroy_process_group()


def gpu_for_rank(local_rank: int, local_world_size: int, visible: int) -> str:
    """This rank's GPU. More ranks on a node than GPUs it sees would put two ranks on one GPU."""
    if visible == 0:
        sys.exit("error: torchrun asked for CUDA but no GPU is visible (CUDA_VISIBLE_DEVICES?)")
    if 1 < visible < local_world_size:
        sys.exit(f"error: --nproc_per_node {local_world_size} but this node shows {visible} GPUs: two ranks would "
                 f"share a GPU; use --nproc_per_node {visible} (or make more GPUs visible)")
    return f"cuda:{local_rank % visible}"


def check_one_rank_per_gpu(store, rank: int, world_size: int, device: str):
    """Every rank tells the store which GPU it got (host and UUID); two ranks on one GPU stop here.
    That happens when each rank sees one GPU, but not its own (CUDA_VISIBLE_DEVICES=0 for all)."""
    props = torch.cuda.get_device_properties(device)
    store.set(f"gpu/{rank}", f"{socket.gethostname()} {getattr(props, 'uuid', device)} {props.name}")
    gpus = [store.get(f"gpu/{r}").decode() for r in range(world_size)]
    message = shared_gpu_message(gpus)
    if message:
        sys.exit(f"error: {message}")


def shared_gpu_message(gpus) -> str:
    """'host uuid name' per rank -> a message naming the ranks that share a GPU ('' if none do)."""
    ranks_of = {}
    for rank, gpu in enumerate(gpus):
        ranks_of.setdefault(tuple(gpu.split(" ", 2)[:2]), []).append(rank)  # host and UUID
    shared = [ranks for ranks in ranks_of.values() if len(ranks) > 1]
    if not shared:
        return ""
    first = shared[0]
    host, _, name = gpus[first[0]].split(" ", 2)
    return (f"ranks {', '.join(map(str, first))} would share one GPU ({name} on {host}): each process must see "
            "its own GPU; lower --nproc_per_node to the GPU count or fix CUDA_VISIBLE_DEVICES per rank")


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    if name == "auto":
        if device_type == "cuda":
            # without emulation: V100/T4 (sm70/75) report bf16 "supported" but only emulate it, slowly
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
            "float32": torch.float32, "fp32": torch.float32}[name]


def cpu_has_bf16_matmul() -> bool:
    """AMX (Intel Xeon 4th gen and newer) or AVX512-BF16 (AMD Zen 4 and newer): bf16 autocast is
    faster there (1.25x with AMX on the demo); without them it is emulated, 3x slower than fp32."""
    # the kernels ATen dispatches to, not only the chip: under ATEN_CPU_CAPABILITY=avx2 (or on a
    # CPU without AVX-512) the bf16 kernels are emulated, ~20x slower than fp32
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    checks = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(check is not None and check() for check in checks)


def autocast(device_type: str, dtype: torch.dtype):
    # the chapter's torch.cuda.amp.autocast() without a dtype silently meant float16
    return nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device_type, dtype=dtype)


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compile_by_default(device: str) -> bool:
    """torch.compile where Inductor's Triton kernels run: CUDA cards of compute capability 7.0 or
    newer (a P40 or older would crash in Inductor); off on CPU, where compiling takes longer than it saves."""
    return device.startswith("cuda") and torch.cuda.get_device_capability(device) >= (7, 0)


def wrap_ddp(model, ctx: Dist):
    """DistributedDataParallel: every rank holds the whole model; backward averages the gradients.

    gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, no second copy; this
    holds only while they are zeroed in place, never set to None (train_epoch's zero_grad).
    The RoPE tables and masks are constants: no broadcast before every forward (torch 2.13 renamed
    broadcast_buffers to forward_sync_buffers and warns on the old name)."""
    from torch.nn.parallel import DistributedDataParallel
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if ctx.device_type == "cuda" else None,
                                   gradient_as_bucket_view=True, **no_buffer_sync)


def make_optimizer(model, args, device_type):
    # no weight decay on norms (1-D weights), as in LLaMA / nanoGPT
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95),
                             fused=device_type == "cuda")


# ---------------------------------------------------------------- logging and saving

class Logger:
    """Rank 0 writes metrics.jsonl in out_dir (and swanlab if asked); other ranks stay silent."""

    def __init__(self, args, ctx: Dist, resume_step: int = 0, run_id: str = None):
        self.ctx, self.swanlab, self.file, self.run_id = ctx, None, None, run_id
        if not ctx.is_master:
            return
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, "metrics.jsonl")
        kept = []
        if resume_step and os.path.isfile(path):  # keep the history up to the checkpoint, drop what came after
            with open(path, encoding="utf-8") as f:
                kept = [line for line in f if json.loads(line)["step"] <= resume_step]
        self.file = open(path, "w", encoding="utf-8")
        self.file.writelines(kept)
        if args.use_swanlab:
            import swanlab
            mode = os.environ.get("SWANLAB_MODE", "offline")
            resume = dict(id=run_id, resume="allow") if run_id and mode == "cloud" else {}
            run = swanlab.init(project="Tiny-K", name=os.path.basename(os.path.normpath(args.out_dir)),
                               config=vars(args), mode=mode, log_dir=os.path.join(args.out_dir, "swanlog"), **resume)
            self.swanlab, self.run_id = swanlab, getattr(run, "id", None)

    def log(self, metrics: dict, step: int):
        if self.file is not None:
            try:
                self.file.write(json.dumps({"step": step, **metrics}) + "\n")
                self.file.flush()
            except OSError as e:  # a full disk: losing log lines is better than losing the run
                print(f"warning: {self.file.name}: cannot write metrics ({e.strerror or e}); training goes on "
                      "without them", file=sys.stderr)
                self.file = None
        if self.swanlab:
            self.swanlab.log(metrics, step=step)

    def close(self):
        if self.file:
            try:
                self.file.close()
            except OSError:  # the warning was printed when the write failed
                pass
        if self.swanlab:
            self.swanlab.finish()


def save_model(model, args, tokenizer_files=None):
    """save_pretrained into out_dir (rank 0 only), with the tokenizer files beside the weights:
    tokenizer_files {name: bytes} as read when the run started (else read from --tokenizer_path).
    A LoRA model saves its adapter to out_dir/adapter, then merges it into the full model.
    Written into a temporary folder first: a failed save (full disk) leaves no partial file."""
    from checkpoint import CheckpointWriteError, space_note
    if tokenizer_files is None:
        tokenizer_files = read_tokenizer_files(args.tokenizer_path)

    def write(directory):
        model.save_pretrained(directory)
        for name, data in tokenizer_files.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
    try:
        if hasattr(model, "merge_and_unload"):  # a PEFT model: the end of training, so merging in place is fine
            save_files(model.save_pretrained, os.path.join(args.out_dir, "adapter"))
            model = model.merge_and_unload()
        save_files(write, args.out_dir)
    except Exception as e:  # safetensors reports a full disk in its own exception type
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise CheckpointWriteError(f"{args.out_dir}: final model not saved ({reason}; "
                                   f"{space_note(args.out_dir)}); the checkpoints are intact") from e


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

def read_tokenizer_files(tokenizer_path) -> dict:
    """{name: bytes} of the tokenizer files, read once: the saved model gets the tokenizer it trained with."""
    files = {}
    for name in TOKENIZER_FILES:
        path = os.path.join(tokenizer_path, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = f.read()
    return files


def save_files(write, directory):
    """write(tmp) into a temporary folder beside `directory`, then move each file into place."""
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".saving-", dir=directory)
    try:
        write(tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------- loss, validation, data

def lm_loss(model, X, Y, stats: dict):
    """The chapter's loss, model(X, Y).loss: mean cross-entropy of the next token over the trained
    positions. stats collects what a weighted mean over batches needs (here: tokens)."""
    from k_model import IGNORE_INDEX
    loss = model(X, Y).loss
    n_tokens = (Y != IGNORE_INDEX).sum()
    add_stats(stats, loss_sum=loss.detach() * n_tokens, weight=n_tokens)
    return loss


def add_stats(stats: dict, **values):
    """Running sums, kept on the device (no synchronisation per micro-step)."""
    for key, value in values.items():
        stats[key] = stats.get(key, 0) + value


def mean_stats(stats: dict, ctx: Dist) -> dict:
    """Sums over every rank, divided by the summed weight: {"loss": ..., other keys...}. The keys
    are every rank's: a rank that saw no batch (a validation set smaller than the world) adds 0s."""
    keys = sorted(set().union(*ctx.gather(sorted(stats)), {"loss_sum", "weight"}))
    sums = dict(zip(keys, ctx.all_reduce_sum([float(stats.get(k, 0.0)) for k in keys])))
    weight = max(sums.pop("weight", 0.0), 1.0)
    # a key with its own weight ("weight_KEY": what it was counted over, e.g. the answers a check applied to)
    own = {k[len("weight_"):]: max(sums.pop(k), 1.0) for k in list(sums) if k.startswith("weight_")}
    return {"loss" if k == "loss_sum" else k: v / own.get(k, weight) for k, v in sums.items()}


@torch.no_grad()
def evaluate(model, val_set, args, ctx: Dist, dtype, objective=lm_loss) -> dict:
    """Validation, weighted over the whole set ({"loss": ...} and what else the objective counts);
    each rank takes every world_size-th sample, sums reduce over ranks."""
    model.eval()
    shard = Subset(val_set, range(ctx.rank, len(val_set), ctx.world_size))
    loader = DataLoader(shard, batch_size=args.batch_size, shuffle=False, collate_fn=getattr(val_set, "collate", None))
    stats = {}
    for i, (X, Y, _) in enumerate(loader):
        if 0 <= args.eval_iters <= i:
            break
        with autocast(ctx.device_type, dtype):
            objective(model, X.to(ctx.device), Y.to(ctx.device), stats)
    model.train()
    return mean_stats(stats, ctx)


def make_loader(train_set, args, ctx: Dist, trim_batches: bool):
    """(batches per epoch, epoch_loader(epoch, start_batch) -> DataLoader of this rank's batches).

    Each rank iterates its own shard, in an order fixed by the seed and the epoch, so a resumed
    run starts exactly at the batch it stopped before. trim_batches cuts each batch of chats to
    its longest instead of max_seq_len.
    """
    from dataset import ShardSampler, pack_chats, trim_padding
    # on CUDA trimmed lengths round up to a multiple of 64, so a compiled model sees a handful of shapes
    multiple = SFT_LENGTH_MULTIPLE_CUDA if ctx.device_type == "cuda" else 1
    # a dataset with its own collate (pairs of answers) trims it too
    collate = functools.partial(getattr(train_set, "collate", trim_padding), multiple=multiple) if trim_batches else None
    if trim_batches and getattr(args, "pack_chats", False) and not hasattr(train_set, "collate"):
        collate = functools.partial(pack_chats, max_length=train_set.max_length)
    num_workers = args.num_workers if args.num_workers >= 0 else (4 if ctx.device_type == "cuda" else 0)
    # DistributedSampler's order, held in 8 bytes an index instead of a Python list (dataset.ShardSampler)
    shard_size = len(train_set) // ctx.world_size

    def epoch_loader(epoch: int, start_batch: int = 0) -> DataLoader:
        sampler = ShardSampler(len(train_set), ctx.world_size, ctx.rank, args.seed, epoch, start_batch * args.batch_size)
        return DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                          collate_fn=collate, num_workers=num_workers,
                          pin_memory=ctx.device_type == "cuda")
    return math.ceil(shard_size / args.batch_size), epoch_loader


# ---------------------------------------------------------------- around the loop: signals, steps, checkpoints

class StopRequest:
    """SIGTERM/SIGINT (a preempted job, Ctrl-C) ask the loop to checkpoint and exit cleanly.

    Signals come twice: Slurm sends SIGTERM to every process of a job step and torchrun forwards
    its own ~0.1 s later; a terminal's Ctrl-C reaches torchrun and the workers, and torchrun
    follows with SIGTERM. Only a second SIGINT (the user pressing Ctrl-C again) stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT:  # Ctrl-C again: the user does not want to wait for the checkpoint
                raise KeyboardInterrupt
            return  # the same request again (Slurm and torchrun): the checkpoint is on its way
        self.requested = True
        print(f"received {signal.Signals(signum).name}: saving a checkpoint after this micro-batch "
              "(Ctrl-C again to stop without it)", file=sys.stderr, flush=True)


def due(step: int, interval: int) -> bool:
    """Every `interval` steps; never when interval is 0."""
    return interval > 0 and step % interval == 0


class Run:
    """Everything around the chapter's loop: step count, logs, validation, checkpoints, the
    non-finite guard and stop signals. train() sets it up; train_epoch() calls it."""

    def __init__(self, args, ctx: Dist, raw_model, model, eval_model, optimizer, scaler, dtype, val_set,
                 batches_per_epoch, total_steps, step, last_checkpoint, tokenizer_sha256, run_id, objective=lm_loss):
        self.args, self.ctx, self.raw_model, self.model, self.eval_model = args, ctx, raw_model, model, eval_model
        self.optimizer, self.scaler, self.dtype, self.val_set = optimizer, scaler, dtype, val_set
        self.batches_per_epoch, self.total_steps, self.step = batches_per_epoch, total_steps, step
        self.last_checkpoint, self.tokenizer_sha256 = last_checkpoint, tokenizer_sha256
        self.logger = Logger(args, ctx, resume_step=step, run_id=run_id)
        self.stop = StopRequest()
        self.loss_accum = torch.zeros((), device=ctx.device)  # summed on the device: no sync per micro-step
        self.window_loss = torch.zeros((), device=ctx.device)
        self.tokens_seen = 0  # loss_mask lives on the host: counting it costs no sync
        self.steps_since_log, self.t_log, self.t_start, self.start_step = 0, time.time(), time.time(), step
        self.nonfinite_in_a_row, self.stopped_by_signal = 0, False
        self.objective, self.stats = objective, {}  # the loss, and what it counts between two logs

    def loss(self, model, X, Y):
        return self.objective(model, X, Y, self.stats)

    # ---- inside an accumulation window

    def accumulation_window(self, batch: int):
        """(micro-batches in this batch's window, whether it is the window's last). The last window
        of an epoch may be shorter: its loss is scaled by its real size instead of being dropped."""
        window_start = batch - batch % self.args.accumulation_steps
        window = min(self.args.accumulation_steps, self.batches_per_epoch - window_start)
        return window, batch == window_start + window - 1

    def no_sync_unless(self, last_micro: bool):
        return self.model.no_sync() if self.ctx.ddp and not last_micro else nullcontext()

    def count(self, loss, loss_mask):
        self.window_loss += loss.detach()
        self.tokens_seen += int(loss_mask.sum())

    def stop_in_window(self, epoch: int, batch: int) -> bool:
        """A stop signal in the middle of an accumulation window: drop the window's gradients and
        checkpoint at its first batch, so the save comes one micro-batch after the signal instead of
        a whole step (torchrun kills the workers --shutdown_timeout seconds after its SIGTERM)."""
        self.stopped_by_signal = self.ctx.any(self.stop.requested)
        if not self.stopped_by_signal:
            return False
        self.optimizer.zero_grad(set_to_none=not self.ctx.ddp)
        self.window_loss.zero_()
        self.last_checkpoint = self.save_checkpoint(epoch, batch - batch % self.args.accumulation_steps) \
            or self.last_checkpoint
        return True

    # ---- after the backward of a window

    def update_is_finite(self, grad_norm) -> bool:
        """Advance the step; False (skip the update) if the loss or gradient is NaN/inf, and stop
        the run after max_nonfinite_steps of those in a row."""
        self.step += 1
        self.steps_since_log += 1
        self.loss_accum += self.window_loss
        window_loss, self.window_loss = self.window_loss.clone(), self.window_loss.zero_()
        # gradients are all-reduced, so every rank sees the same norm and takes the same branch
        if math.isfinite(grad_norm.item()):
            self.nonfinite_in_a_row = 0
            return True
        overflow_only = False
        if self.scaler.is_enabled():  # float16: the scaler finding its scale is routine; a non-finite loss is not
            overflow_only = not self.ctx.any(not math.isfinite(window_loss.item()))
        self.nonfinite_in_a_row += 0 if overflow_only else 1
        self.ctx.print(f"step {self.step}: non-finite loss or gradient, update skipped "
                       f"({self.nonfinite_in_a_row} in a row)")
        self.logger.log({"skipped": "non-finite loss or gradient"}, self.step)
        if self.nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            self.close()
            raise TrainingError(f"step {self.step}: {self.nonfinite_in_a_row} non-finite steps in a row; stopping. "
                                f"Last good checkpoint: {self.last_checkpoint or 'none'} (lower --learning_rate "
                                "and --resume it)")
        return False

    def after_step(self, lr, grad_norm, epoch, batch) -> bool:
        """Log, validate and checkpoint when due; False when training is over."""
        args, step = self.args, self.step
        if step % args.log_interval == 0 or step == self.total_steps:
            self.log_train(lr, grad_norm, epoch)
        if self.val_set is not None and (due(step, args.eval_interval) or step == self.total_steps):
            self.log_validation()
        self.stopped_by_signal = self.ctx.any(self.stop.requested)
        # the position saved is the next batch of this epoch (or the next epoch's first)
        position = (epoch, batch + 1) if batch + 1 < self.batches_per_epoch else (epoch + 1, 0)
        if self.stopped_by_signal or (due(step, args.save_interval) and step < self.total_steps):
            self.last_checkpoint = self.save_checkpoint(*position) or self.last_checkpoint
        return step < self.total_steps and not self.stopped_by_signal

    def log_train(self, lr, grad_norm, epoch):
        ctx, step = self.ctx, self.step
        loss_sum, tokens = ctx.all_reduce_sum([self.loss_accum.item(), self.tokens_seen])
        train_loss = loss_sum / ctx.world_size / self.steps_since_log
        tokens_per_s = tokens / (time.time() - self.t_log)
        eta = (time.time() - self.t_start) / (step - self.start_step) * (self.total_steps - step)
        memory = {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30} if ctx.device_type == "cuda" else {}
        extra = mean_stats(self.stats, ctx)  # what the objective counts besides the loss (DPO: margins, ...)
        extra.pop("loss", None)
        self.stats = {}
        ctx.print(f"epoch {epoch + 1} | step {step}/{self.total_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                  f"grad norm {grad_norm.item():.3f} | {tokens_per_s:,.0f} tok/s | eta {format_eta(eta)}"
                  + (f" | peak {memory['peak_memory_gib']:.1f} GiB" if memory else "")
                  + "".join(f" | {k} {v:.4f}" for k, v in extra.items()))
        self.logger.log({"loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": tokens_per_s,
                         "time": time.time() - self.t_start, **memory, **extra}, step)
        self.loss_accum.zero_()
        self.tokens_seen, self.steps_since_log, self.t_log = 0, 0, time.time()

    def log_validation(self):
        val = evaluate(self.eval_model, self.val_set, self.args, self.ctx, self.dtype, self.objective)
        self.ctx.print(f"step {self.step} | " + " | ".join(f"val {k} {v:.4f}" for k, v in val.items()))
        self.logger.log({f"val_{k}": v for k, v in val.items()} | {"time": time.time() - self.t_start}, self.step)

    def log_start(self, first_batch):
        """Step 0, before any update: the loss curves then show where training starts."""
        X, Y, _ = first_batch
        # the uncompiled model: one batch is not worth compiling an inference graph for (validation may)
        self.raw_model.eval()
        with torch.no_grad(), autocast(self.ctx.device_type, self.dtype):
            loss = self.objective(self.raw_model, X.to(self.ctx.device), Y.to(self.ctx.device), {}).item()
        self.raw_model.train()
        loss = self.ctx.all_reduce_sum([loss])[0] / self.ctx.world_size
        self.ctx.print(f"step 0 | loss {loss:.4f} (before training)")
        self.logger.log({"loss": loss, "lr": 0.0, "time": 0.0}, 0)
        if self.val_set is not None:
            self.log_validation()

    def save_checkpoint(self, epoch, batch_in_epoch):
        from checkpoint import checkpoint_path, rng_state, save_checkpoint
        ctx = self.ctx
        rng = ctx.gather(rng_state())
        if not ctx.is_master:
            return None
        path = checkpoint_path(self.args.out_dir, self.step)
        t0 = time.time()
        save_checkpoint(path, {
            "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "step": self.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "rng": rng, "config": self.raw_model.config.to_dict(), "tokenizer_sha256": self.tokenizer_sha256,
            "run_id": self.logger.run_id, "lineage": self.lineage, "world_size": ctx.world_size, "args": vars(self.args)},
            self.args.keep_checkpoints)
        ctx.print(f"checkpoint {path} ({os.path.getsize(path) / 2**20:.1f} MiB, {time.time() - t0:.1f}s)")
        return path

    def close(self):
        self.logger.close()
        self.stop.restore()


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss keeps turning NaN)."""


# ---------------------------------------------------------------- resume and checks before training

def check_out_dir(out_dir, need_bytes, ctx: Dist):
    """Rank 0 writes the checkpoints: it checks out_dir now, and every rank stops if it fails."""
    from checkpoint import check_writable
    error = None
    if ctx.is_master:
        try:
            check_writable(out_dir, need_bytes)
        except OSError as e:
            error = str(e)
    if ctx.any(error is not None):
        raise OSError(error or f"{out_dir}: rank 0 cannot write checkpoints")


def resume_state(args, ctx: Dist):
    """(path, checkpoint) to resume from, or (None, None). Rank 0 chooses the file (--resume
    auto looks in its --out_dir); every rank loads that file ("auto": the same file name in its
    own --out_dir). If any rank cannot read it, every rank stops with one message, at once,
    instead of rank 0 waiting for the others until the collective timeout."""
    from checkpoint import CHECKPOINT_DIR, CheckpointError, find_checkpoint, load_checkpoint
    if not args.resume or args.resume == "none":
        return None, None
    path, state, error = None, None, None
    if ctx.is_master:
        try:
            path, state = find_checkpoint(args.resume, args.out_dir)
        except CheckpointError as e:
            error = str(e)
    path, error = ctx.broadcast((path, error))
    if error:
        raise CheckpointError(error)
    if path is None:
        ctx.print(f"no checkpoint in {args.out_dir}: starting from scratch")
        return None, None
    if not ctx.is_master:
        if args.resume == "auto":
            path = os.path.join(args.out_dir, CHECKPOINT_DIR, os.path.basename(path))
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            error = f"rank {ctx.rank} on {socket.gethostname()}: {e}"
    errors = [e for e in ctx.gather(error) if e]
    if errors:
        raise CheckpointError(f"{len(errors)} of {ctx.world_size} processes cannot read the checkpoint that rank 0 "
                              f"resumes from ({errors[0]}); only rank 0 writes checkpoints, so put --out_dir on "
                              f"storage every node shares, or copy {os.path.basename(path)} into "
                              f"OUT_DIR/{CHECKPOINT_DIR}/ on every node")
    return path, state


def check_compatible(state, model, tokenizer_sha256, ctx: Dist, path):
    """Refuse a checkpoint of another architecture, tokenizer or world size."""
    from checkpoint import CheckpointError
    from k_model import ARCH_FIELDS
    diff = [f"{k}: checkpoint {state['config'].get(k)} vs now {getattr(model.config, k)}" for k in ARCH_FIELDS
            if state["config"].get(k) != getattr(model.config, k)]
    if diff:
        raise CheckpointError(f"{path}: written for another model ({', '.join(diff)})")
    if state["tokenizer_sha256"] != tokenizer_sha256:
        raise CheckpointError(f"{path}: written with another tokenizer than the one in --tokenizer_path")
    if state["world_size"] != ctx.world_size:
        raise CheckpointError(f"{path}: written by {state['world_size']} processes, resumed with {ctx.world_size}; "
                              "the data position is only exact with the same number")


def model_config(args, tokenizer):
    """The model the flags and preset ask for, sized to the tokenizer."""
    from k_model import ModelConfig
    if tokenizer is None:  # a dry run without a tokenizer yet
        return ModelConfig(**{k: getattr(args, k) for k in MODEL_FIELDS})
    return ModelConfig(**{k: getattr(args, k) for k in MODEL_FIELDS}, vocab_size=len(tokenizer),
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)


def pretrain_dataset(path, tokenizer, args):
    """A .bin token file (pretokenize.py) trains packed; a .jsonl trains as the chapter does, padded."""
    from dataset import PackedDataset, PretrainDataset
    if path.endswith(".bin"):
        return PackedDataset(path, max_length=args.max_seq_len, tokenizer_path=args.tokenizer_path)
    return PretrainDataset(path, tokenizer, max_length=args.max_seq_len)


def check_paths(args):
    """Fail fast, with the path in the message, before any process group or model exists."""
    for name in ("data_path", "val_data_path"):
        path = getattr(args, name)
        if path and not os.path.isfile(path) and not args.dry_run:
            raise FileNotFoundError(f"{path}: file not found (--{name})")


def tokenizer_for_run(args):
    """The checks every trainer's main starts with: the data files exist, then the tokenizer (a dry run
    may come before it). A problem ends the script with one line naming the path."""
    try:
        check_paths(args)
        return load_tokenizer_or_none(args) if args.dry_run else load_tokenizer(args.tokenizer_path)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


def load_tokenizer_or_none(args):
    """A dry run may come before the tokenizer: then the model is planned with the chapter's 6144."""
    try:
        return load_tokenizer(args.tokenizer_path)
    except FileNotFoundError:
        print(f"note: no tokenizer in {args.tokenizer_path}: planning with vocab_size 6144", file=sys.stderr)
        return None


def dry_run(args, config, tokenizer, trainable_params=None):
    """--dry_run: print the plan (memory per GPU, fit, tokens, steps, time) and train nothing."""
    print_plan(plan_from_args(args, config, tokenizer, trainable_params), args.json)
