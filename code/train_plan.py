"""Will it fit, and how long? A training plan computed before any GPU is touched.

    python code/ddp_pretrain.py --preset chapter --dry_run --gpu 4090 --nproc_per_node 4
    python code/ddp_pretrain.py --preset chapter --dry_run --json      # the same as one JSON object

plan() gives the parameters; the memory per GPU (fp32 weights, gradients, AdamW state, DDP
buckets, 16-bit weight copies, activations, loss workspace, CUDA context, fragmentation) at the
run's batch and sequence length, eager and compiled; whether that fits the GPU, and if not the
largest --batch_size that does with the --accumulation_steps that keep the global batch; the
tokens in the data file, the optimizer steps, and the hours at a stated MFU.

Activations are counted from what autograd saves for backward in k_model.py, tensor by tensor
(activation_bytes); tests/test_train_plan.py checks the eager count against saved-tensor hooks
on CPU. N = batch * seq token positions, D = dim, F = MLP width, KV = n_kv_heads * head_dim,
H = n_heads, V = vocab; a = 2 bytes under bf16/fp16 autocast (4 in fp32), f = 4 (fp32).
Eager, per DecoderLayer:
    attention_norm  input x (fp32 residual stream) f*N*D, rsqrt f*N, normalized x f*N*D
    wq/wk/wv input  f*N*D in fp32 (shared); under autocast each Linear casts its own copy: 3*a*N*D
    SDPA (fused)    q a*N*D, k and v a*N*KV each (enable_gqa: not repeated), out a*N*D (also wo's
                    input), logsumexp f*N*H; RoPE saves only its cos/sin tables (buffers)
    ffn_norm        input h f*N*D, rsqrt f*N, normalized f*N*D
    w1/w2 input     f*N*D in fp32; 2*a*N*D under autocast
    SwiGLU          w1 out (silu input), silu out, w2 out, their product (w3 input): 4*a*N*F
Once: token ids and targets 8*N each, final norm (2*f*N*D + f*N), output's input (f or a)*N*D,
log-softmax of the fp32 logits f*N*V (often the largest single tensor), and under autocast the
bf16 copies of every Linear weight that autocast caches and autograd keeps (2 bytes/weight).
"""
import argparse
import json
import math
import os
import re
from typing import NamedTuple, Optional

GIB = 2 ** 30


class GPU(NamedTuple):
    memory_gib: float  # about what nvidia-smi reports (less than the marketing GB with ECC on), in GiB
    tflops: float      # dense bf16 (fp16 where bf16 is missing) tensor-core peak, fp32 accumulate
    bf16: bool         # native bf16; without it the trainer's dtype=auto is float16
    flash: bool        # FlashAttention (sm80+); without it SDPA with enable_gqa falls back to math
    mfu: float         # default model-FLOPs utilisation for the time estimate, with torch.compile


# Dense (not 2:4-sparse) tensor-core peaks from NVIDIA's datasheets and architecture whitepapers
# (Volta, Turing, Ampere GA100/GA102, Ada, Hopper). PyTorch accumulates matmuls in fp32: GeForce
# cards run that at half their fp16-accumulate rate (3090: 71 vs 142, 4090: 165.2 vs 330.3), so
# their fp32-accumulate figure is the one listed. The MFUs are assumptions for a ~200M model:
# ~35% of an Ampere/Ada datacenter card, less of a Hopper (its peak outruns dim-1024 matmuls),
# ~30% of a GeForce card (DDP all-reduce over PCIe, no NVLink), ~25% of Volta/Turing (fp16, math
# attention). Calibrate with a real run's tok/s: MFU = tok/s * flops_per_token / (TFLOPS * 1e12 * GPUs).
GPUS = {
    "3090": GPU(24.0, 71.0, True, True, 0.30),
    "4090": GPU(24.0, 165.2, True, True, 0.30),
    "A10": GPU(22.2, 125.0, True, True, 0.35),
    "L4": GPU(22.5, 121.0, True, True, 0.35),
    "L40S": GPU(45.0, 362.0, True, True, 0.35),
    "A100-40GB": GPU(40.0, 312.0, True, True, 0.35),
    "A100-80GB": GPU(80.0, 312.0, True, True, 0.35),
    "H100-PCIe": GPU(79.6, 756.0, True, True, 0.30),
    "H100": GPU(79.6, 989.4, True, True, 0.30),  # SXM
    "H200": GPU(140.4, 989.4, True, True, 0.30),
    "H100-NVL": GPU(93.6, 835.5, True, True, 0.30),  # the NVL cards: PCIe, lower clocks than SXM
    "H200-NVL": GPU(140.4, 835.5, True, True, 0.30),
    "V100-16GB": GPU(15.8, 125.0, False, False, 0.25),  # SXM2
    "V100-32GB": GPU(31.7, 125.0, False, False, 0.25),
    "V100-PCIe-16GB": GPU(15.8, 112.0, False, False, 0.25),
    "V100-PCIe-32GB": GPU(31.7, 112.0, False, False, 0.25),
    "T4": GPU(15.0, 65.0, False, False, 0.25),
}
# torch.cuda.get_device_name() -> GPUS key; the first pattern that matches wins
GPU_PATTERNS = [(r"H200 NVL", "H200-NVL"), (r"H200", "H200"), (r"H100 NVL", "H100-NVL"), (r"H100.*PCIE", "H100-PCIe"),
                (r"H100", "H100"), (r"A100.*80GB", "A100-80GB"), (r"A100", "A100-40GB"),
                (r"V100.*PCIE.*32GB", "V100-PCIe-32GB"), (r"V100.*PCIE", "V100-PCIe-16GB"), (r"V100.*32GB", "V100-32GB"),
                (r"V100", "V100-16GB"), (r"4090", "4090"), (r"3090", "3090"), (r"L40S", "L40S"),
                (r"\bL4\b", "L4"), (r"\bA10\b", "A10"), (r"\bT4\b", "T4")]

CUDA_OVERHEAD_GIB = 1.0   # CUDA context, cuBLAS and NCCL workspaces: outside PyTorch's tensors
FRAGMENTATION = 0.10      # the caching allocator's waste on what is allocated anew every step
EAGER_MFU_FACTOR = 0.8    # without torch.compile the unfused elementwise ops cost ~20% more time
SAMPLE_CHUNKS, SAMPLE_CHUNK_BYTES = 8, 128 * 1024  # a jsonl is sampled at 8 places, 1 MiB in all
BYTES_PER_TOKEN = 3.5     # jsonl bytes per token when no tokenizer is given: Chinese is 3 bytes a
                          # character, ~0.8 token a character with a 6144-token BPE, plus JSON


def lookup_gpu(name: str) -> str:
    """The GPUS key for a name, case-insensitively; argparse's `type` for --gpu."""
    for key in GPUS:
        if key.lower() == name.lower():
            return key
    raise argparse.ArgumentTypeError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} "
                                     "(or give --gpu_memory_gib and --gpu_tflops)")


def match_gpu(device_name: str) -> Optional[str]:
    """The GPUS key of a CUDA device name such as 'NVIDIA A100-SXM4-80GB', or None."""
    for pattern, key in GPU_PATTERNS:
        if re.search(pattern, device_name.upper().replace("NVIDIA", "")):
            return key
    return None


# ---------------------------------------------------------------- model size

def model_shape(config) -> dict:
    """The sizes the formulas need, from a ModelConfig (no model is built)."""
    from k_model import mlp_hidden_dim
    n_kv_heads = config.n_kv_heads or config.n_heads
    head_dim = config.dim // config.n_heads
    return dict(D=config.dim, L=config.n_layers, H=config.n_heads, KV=n_kv_heads * head_dim,
                F=mlp_hidden_dim(config.dim, config.hidden_dim, config.multiple_of), V=config.vocab_size)


def linear_params(config) -> int:
    """Weights of every nn.Linear, the output matrix included even when tied (autocast casts it)."""
    s = model_shape(config)
    per_layer = 2 * s["D"] * s["D"] + 2 * s["D"] * s["KV"] + 3 * s["D"] * s["F"]  # wq wo, wk wv, w1 w2 w3
    return s["L"] * per_layer + s["V"] * s["D"]


def count_params(config) -> int:
    """Parameters as k_model.count_parameters counts them: the tied embedding once."""
    s = model_shape(config)
    norms = (2 * s["L"] + 1) * s["D"]
    embedding = s["V"] * s["D"] if not getattr(config, "tie_word_embeddings", True) else 0
    return linear_params(config) + norms + embedding


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6N for the weights' matmuls plus 12*L*D*T for
    attention's (the PaLM / nanoGPT convention that MFU figures are quoted in)."""
    return 6 * count_params(config) + 12 * config.n_layers * config.dim * seq_len


# ---------------------------------------------------------------- memory

def _bytes_per_value(dtype) -> int:
    """2 for bf16/fp16 autocast, 4 for fp32 (names or torch dtypes)."""
    return 4 if str(dtype).replace("torch.", "") in ("float32", "fp32") else 2


def activation_bytes(config, batch_size: int, seq_len: int, dtype="bfloat16", compiled=False,
                     flash=True, kv_repeated=False) -> dict:
    """Bytes autograd keeps from the forward for the backward, by part (the module docstring
    lists the eager terms). flash: SDPA runs a fused kernel (FlashAttention; CPU's flash kernel
    saves the same tensors); False = the math fallback, which keeps the seq x seq probabilities.

    compiled: what the AOTAutograd min-cut partitioner keeps instead (measured on CPU Inductor,
    torch 2.13): per layer the fp32 layer input, both rsqrt, each norm's output once in the
    autocast dtype (Linear casts fused into it), q k v out logsumexp, wo's input, and three of the
    four SwiGLU tensors (the rest is recomputed); once, the logits in the autocast dtype with
    their max and logsumexp instead of the fp32 log-softmax.

    kv_repeated: k and v copied to every query head before SDPA (k_model does this on CUDA
    where FlashAttention is missing, so the memory-efficient kernel runs): saved at D, not KV.
    """
    s = model_shape(config)
    D, F, KV, H, V = s["D"], s["F"], s["KV"], s["H"], s["V"]
    KV = D if kv_repeated else KV
    n = batch_size * seq_len  # token positions
    a = _bytes_per_value(dtype)  # Linear inputs and outputs, SDPA tensors
    f = 4  # fp32: the residual stream and RMSNorm (k_model normalises in fp32)
    autocast = a == 2

    if flash:  # q, k, v (kv heads only), out (= wo's input), logsumexp
        attention = n * (a * D + 2 * a * KV + a * D + f * H)
    else:  # math: fp32 scaled q, k and v repeated to n_heads, probabilities, then wo's input
        attention = n * 3 * f * D + f * batch_size * H * seq_len * seq_len + n * a * D
    if compiled:
        norms = 2 * n * (f + a * D) + n * f * D    # rsqrt and output of each norm, the layer input
        linear_inputs = n * a * D if flash else 0  # wo's input, kept beside SDPA's out
        mlp = 3 * n * a * F
    else:
        norms = 2 * n * (f * D + f + f * D)        # input, rsqrt, normalized: attention_norm, ffn_norm
        linear_inputs = n * (a * D * (5 if autocast else 2))  # wq wk wv, w1 w2 (one shared copy in fp32)
        mlp = 4 * n * a * F
    # dropout > 0 (CUDA): a 1-byte mask per element of resid_dropout and the MLP's dropout
    masks = 2 * n * D if config.dropout > 0 else 0
    per_layer = norms + linear_inputs + attention + mlp + masks

    parts = {"layers": s["L"] * per_layer,
             "ids_and_targets": 2 * 8 * n,  # int64 token ids (embedding) and targets (loss)
             "embedding_dropout_mask": n * D if config.dropout > 0 else 0}
    if compiled:
        parts["final_norm"] = n * (f * D + f + a * D)
        parts["logits"] = n * (a * V + 2 * f)  # logits, their max and logsumexp
    else:
        parts["final_norm"] = n * (2 * f * D + f) + n * (a if autocast else f) * D  # + output's input
        parts["logits"] = n * f * V  # log-softmax of logits.float(), what cross_entropy keeps
    parts["autocast_weights"] = 2 * linear_params(config) if autocast else 0
    parts["total"] = sum(parts.values())
    return parts


def workspace_bytes(config, batch_size: int, seq_len: int, dtype="bfloat16", compiled=False) -> int:
    """Memory above the saved activations at the backward's peak: the loss's (N, V) gradients
    (two fp32 ones at once in eager, one fused in compiled), or an MLP's three (N, F) gradients."""
    s = model_shape(config)
    n = batch_size * seq_len
    loss = (4 if compiled else 8) * n * s["V"]
    return max(loss, 3 * _bytes_per_value(dtype) * n * s["F"])


def memory_plan(config, batch_size: int, seq_len: int, world_size: int = 1, dtype="bfloat16",
                compiled=True, flash=True, trainable_params: int = None, bucket_view=True,
                kv_repeated=False) -> dict:
    """Bytes per GPU by part; 'total' is their sum.

    The model stays fp32 (master weights) and autocast casts per op. AdamW keeps two fp32 moments
    per trainable parameter (fused: no more). DDP with gradient_as_bucket_view=True makes the
    gradients views into its buckets, so the buckets cost nothing extra; without it they are a
    second copy of the gradients. trainable_params: fewer than all for LoRA (whose activations
    are counted as full fine-tuning's, an upper bound).
    """
    n_params = count_params(config)
    trainable = n_params if trainable_params is None else trainable_params
    acts = activation_bytes(config, batch_size, seq_len, dtype, compiled, flash, kv_repeated)
    workspace = workspace_bytes(config, batch_size, seq_len, dtype, compiled)
    parts = {
        "weights": 4 * n_params,
        "gradients": 4 * trainable,
        "optimizer": 8 * trainable,
        "ddp_buckets": 0 if world_size == 1 or bucket_view else 4 * trainable,
        "autocast_weights": acts["autocast_weights"],
        "activations": acts["total"] - acts["autocast_weights"],
        "workspace": workspace,
        "cuda_overhead": int(CUDA_OVERHEAD_GIB * GIB),
    }
    parts["fragmentation"] = int(FRAGMENTATION * (parts["autocast_weights"] + parts["activations"] + workspace))
    parts["total"] = sum(parts.values())
    return parts


def largest_batch(config, seq_len, memory_gib, global_batch, **kwargs) -> Optional[int]:
    """The largest micro-batch that fits in memory_gib and divides global_batch (sequences per
    optimizer step per GPU), so the accumulation steps keep that global batch exactly; or None."""
    for b in range(global_batch, 0, -1):
        if global_batch % b == 0 and memory_plan(config, b, seq_len, **kwargs)["total"] <= memory_gib * GIB:
            return b
    return None


# ---------------------------------------------------------------- data

def _sample_lines(path: str):
    """Whole lines from SAMPLE_CHUNKS places spread over the file (all of it when small), and
    the bytes they take."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= SAMPLE_CHUNKS * SAMPLE_CHUNK_BYTES:
            data = f.read()
            return data.splitlines(), len(data)
        lines, n_bytes = [], 0
        for i in range(SAMPLE_CHUNKS):
            f.seek(i * (size - SAMPLE_CHUNK_BYTES) // (SAMPLE_CHUNKS - 1))
            chunk = f.read(SAMPLE_CHUNK_BYTES)
            if i > 0:  # drop the partial line at the start (or a whole one: harmless)
                chunk = chunk[chunk.find(b"\n") + 1:]
            chunk = chunk[:chunk.rfind(b"\n") + 1]  # and the partial one at the end
            lines += chunk.splitlines()
            n_bytes += len(chunk)
        return lines, n_bytes


def _record_tokens(records, tokenizer) -> list:
    """Tokens of each jsonl record as the datasets build it: <s> text </s>, or a chat's template."""
    if isinstance(records[0], list):
        texts = [tokenizer.apply_chat_template(r, tokenize=False, add_generation_prompt=False) for r in records]
        extra = 0
    else:
        texts, extra = [r["text"] for r in records], 2  # <s> and </s>
    return [len(ids) + extra for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def expected_max(lengths, k: int) -> float:
    """Mean of the largest of k lengths drawn at random (with replacement) from `lengths`."""
    lengths, n = sorted(lengths), len(lengths)
    return sum(x * ((i + 1) ** k - i ** k) / n ** k for i, x in enumerate(lengths))


def data_size(path: str, seq_len: int, tokenizer=None, batch_size: int = 1) -> dict:
    """tokens and samples in a training file, and the positions a sample costs.

    .bin: n_tokens from its .bin.json (exact); samples are PackedDataset's windows. .jsonl: one
    sample a line (padded to seq_len), lines and tokens estimated from the file size and a
    sample of lines (tokenized when a tokenizer is given). Chats (SFT) are trimmed to the
    longest in their batch: a sample costs the expected longest of batch_size chats.
    """
    if path.endswith(".bin"):
        from pretokenize import read_meta
        n_tokens = read_meta(path)["n_tokens"]
        return dict(tokens=n_tokens, samples=(n_tokens - 1) // seq_len, positions_per_sample=seq_len,
                    estimated=False, how=f"{os.path.basename(path)}.json")
    size = os.path.getsize(path)
    raw_lines, n_bytes = _sample_lines(path)
    records = []
    for raw in raw_lines:
        try:
            record = json.loads(raw)
            if isinstance(record, dict) and "prompt" in record:  # a DPO pair: planned as its chosen chat
                record = record["prompt"] + [{"role": "assistant", "content": record["chosen"]}]
            if isinstance(record, dict) and "messages" in record:  # a request to answer (RL): with its real poem
                record = record["messages"] + [{"role": "assistant", "content": record.get("reference") or ""}]
            if isinstance(record, list) or record["text"]:
                records.append(record)
        except (ValueError, KeyError, TypeError):
            continue  # iter_jsonl skips such lines too
    if not records:
        raise ValueError(f"{path}: no usable jsonl line in the sample")
    records = [r for r in records if isinstance(r, list) == isinstance(records[0], list)]  # one kind
    whole = n_bytes >= size
    scale = size / n_bytes  # lines and tokens per byte of the sample, times the file's bytes
    samples = len(records) if whole else round(len(records) * scale)
    positions = seq_len
    if tokenizer is None:
        tokens, how = round(size / BYTES_PER_TOKEN), f"estimated at {BYTES_PER_TOKEN} bytes a token"
    else:
        lengths = _record_tokens(records, tokenizer)
        tokens = sum(lengths) if whole else round(sum(lengths) * scale)
        how = "counted" if whole else f"estimated from {len(records):,} sampled lines"
        if isinstance(records[0], list):  # SFT: trim_padding cuts each batch to its longest chat
            positions = expected_max([min(n - 1, seq_len) for n in lengths], batch_size)
    return dict(tokens=tokens, samples=samples, positions_per_sample=positions,
                estimated=not (whole and tokenizer is not None), how=how)


# ---------------------------------------------------------------- the plan

def kv_heads_repeated(config, dtype, gpu: Optional[GPU]) -> bool:
    """Whether k_model copies k/v to every query head on this GPU: with GQA where FlashAttention
    (sm80+, bf16/fp16, the one fused kernel that takes enable_gqa) is missing, so that the
    memory-efficient kernel runs instead of the math one."""
    gqa = (config.n_kv_heads or config.n_heads) != config.n_heads
    flash = (gpu is None or gpu.flash) and _bytes_per_value(dtype) == 2
    return gqa and not flash


def plan(config, batch_size: int, accumulation_steps: int, world_size: int = 1, dtype="bfloat16",
         compiled=True, gpu_name: str = None, gpu: GPU = None, mfu: float = None, data: dict = None,
         epochs: int = 1, max_steps: int = -1, trainable_params: int = None) -> dict:
    """Everything --dry_run prints, as one JSON-ready dict. gpu None: memory and steps only."""
    seq_len = config.max_seq_len
    repeated = kv_heads_repeated(config, dtype, gpu)
    kwargs = dict(world_size=world_size, dtype=dtype, kv_repeated=repeated, trainable_params=trainable_params)
    memory = {mode: memory_plan(config, batch_size, seq_len, compiled=mode == "compiled", **kwargs)
              for mode in ("eager", "compiled")}
    mode = "compiled" if compiled else "eager"
    parts = memory[mode]
    p = dict(params=count_params(config), trainable_params=trainable_params or count_params(config),
             batch_size=batch_size, accumulation_steps=accumulation_steps, seq_len=seq_len,
             world_size=world_size, dtype=str(dtype).replace("torch.", ""), compiled=compiled,
             attention="memory-efficient (k/v repeated)" if repeated else "fused",
             memory_gib_per_gpu=round(parts["total"] / GIB, 3),
             memory_breakdown_gib={k: round(v / GIB, 3) for k, v in parts.items() if k != "total"},
             activation_gib={m: round((memory[m]["activations"] + memory[m]["autocast_weights"]) / GIB, 3)
                             for m in memory},
             gpu=gpu_name, gpu_memory_gib=gpu.memory_gib if gpu else None, fits=None, margin_gib=None,
             suggested_batch_size=None, suggested_accumulation_steps=None)
    if gpu is not None and gpu.memory_gib:
        p["fits"] = parts["total"] <= gpu.memory_gib * GIB
        p["margin_gib"] = round(gpu.memory_gib - parts["total"] / GIB, 3)
        if not p["fits"]:
            b = largest_batch(config, seq_len, gpu.memory_gib, batch_size * accumulation_steps,
                              compiled=compiled, **kwargs)
            if b is not None:
                p["suggested_batch_size"] = b
                p["suggested_accumulation_steps"] = batch_size * accumulation_steps // b

    p.update(tokens=None, tokens_estimated=None, tokens_how=None, samples=None, steps_per_epoch=None, steps=None,
             tokens_per_step=None, flops_per_token=None, hours=None, tflops=None, mfu=None)
    if data is not None:
        # as train() counts them: DistributedSampler(drop_last) shards, then batches, then windows
        per_rank = data["samples"] // world_size
        steps_per_epoch = math.ceil(math.ceil(per_rank / batch_size) / accumulation_steps)
        steps = max_steps if max_steps > 0 else epochs * steps_per_epoch
        positions = data["positions_per_sample"]
        p.update(tokens=data["tokens"], tokens_estimated=data["estimated"], tokens_how=data["how"],
                 samples=data["samples"], steps_per_epoch=steps_per_epoch, steps=steps,
                 tokens_per_step=round(batch_size * accumulation_steps * world_size * positions),
                 flops_per_token=flops_per_token(config, round(positions)))
    if gpu is not None and gpu.tflops:
        p["tflops"] = gpu.tflops
        p["mfu"] = mfu if mfu is not None else gpu.mfu * (1.0 if compiled else EAGER_MFU_FACTOR)
        if p["steps"] is not None:
            flops = p["steps"] * p["tokens_per_step"] * p["flops_per_token"]
            p["hours"] = flops / (world_size * gpu.tflops * 1e12 * p["mfu"]) / 3600
    return p


def _gib(x):
    return f"{x:6.2f} GiB"


def _duration(hours):
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"


PART_NAMES = {
    "weights": "weights (fp32 master)", "gradients": "gradients (fp32)",
    "optimizer": "AdamW moments (fp32 m, v)", "ddp_buckets": "DDP buckets",
    "autocast_weights": "16-bit weight copies (autocast)", "activations": "activations saved for backward",
    "workspace": "backward workspace (loss grads)", "cuda_overhead": "CUDA context, cuBLAS, NCCL",
    "fragmentation": f"allocator fragmentation ({FRAGMENTATION:.0%})",
}


def format_plan(p: dict) -> str:
    """The plan as the readable text --dry_run prints."""
    m = lambda x: f"{x / 1e6:,.1f}M"  # noqa: E731
    lines = [f"plan: {m(p['params'])} parameters"
             + (f" ({m(p['trainable_params'])} trainable)" if p["trainable_params"] != p["params"] else "")
             + f", {p['dtype']}{' autocast' if p['dtype'] != 'float32' else ''}, "
             + ("compiled" if p["compiled"] else "eager") + f", {p['attention']} attention, "
             + f"{p['world_size']} GPU(s)" + (f" x {p['gpu']}" if p["gpu"] else ""),
             f"memory per GPU at batch {p['batch_size']} x seq {p['seq_len']}:"]
    for key, gib in p["memory_breakdown_gib"].items():
        note = " (gradient_as_bucket_view)" if key == "ddp_buckets" and p["world_size"] > 1 and not gib else ""
        lines.append(f"  {PART_NAMES[key]:34s} {_gib(gib)}{note}")
    act = p["activation_gib"]
    lines.append(f"  {'total':34s} {_gib(p['memory_gib_per_gpu'])}   (activations incl. weight copies: "
                 f"eager {act['eager']:.2f} GiB, compiled {act['compiled']:.2f} GiB)")
    if p["fits"] is None:
        lines.append("  fits: unknown GPU (give --gpu or --gpu_memory_gib)")
    elif p["fits"]:
        lines.append(f"  fits the {p['gpu'] or 'GPU'}'s {p['gpu_memory_gib']:.1f} GiB, {p['margin_gib']:.1f} GiB to spare")
    else:
        lines.append(f"  does NOT fit the {p['gpu'] or 'GPU'}'s {p['gpu_memory_gib']:.1f} GiB "
                     f"({-p['margin_gib']:.1f} GiB short)")
        if p["suggested_batch_size"]:
            lines.append(f"  -> --batch_size {p['suggested_batch_size']} --accumulation_steps "
                         f"{p['suggested_accumulation_steps']} fits and keeps "
                         f"{p['batch_size'] * p['accumulation_steps']} sequences per step per GPU")
        else:
            lines.append("  -> not even batch 1 fits: use more or larger GPUs, a shorter --max_seq_len, or LoRA")
    if p["tokens"] is not None:
        lines.append(f"data: {p['tokens']:,} tokens ({p['tokens_how']}), {p['samples']:,} samples")
        lines.append(f"steps: {p['steps']:,} optimizer steps ({p['steps_per_epoch']:,} per epoch), "
                     f"{p['tokens_per_step']:,} token positions per step")
    if p["hours"] is not None:
        lines.append(f"time: ~{_duration(p['hours'])} at MFU {p['mfu']:.2f} ({p['flops_per_token'] / 1e9:.2f} GFLOP per "
                     f"token = 6 x params + 12 x layers x dim x seq; {p['tflops']:g} TFLOPS peak x {p['world_size']})")
    elif p["tflops"] is None:
        lines.append("time: unknown GPU speed (give --gpu or --gpu_tflops)")
    return "\n".join(lines)


def summary_line(p: dict) -> str:
    """One line for the start of a real run."""
    fits = {None: "", True: ", fits", False: ", does NOT fit"}[p["fits"]]
    gpu = f" of {p['gpu_memory_gib']:.0f} ({p['gpu'] or 'GPU'}{fits})" if p["gpu_memory_gib"] else ""
    text = f"plan: {p['params'] / 1e6:.1f}M params | {p['memory_gib_per_gpu']:.1f} GiB/GPU{gpu}"
    if p["steps"] is not None:
        text += f" | {p['steps']:,} steps"
    if p["hours"] is not None:
        text += f" | ~{_duration(p['hours'])} at MFU {p['mfu']:.2f}"
    return text


# ---------------------------------------------------------------- command line

def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The --dry_run flags, for the trainers' parsers."""
    g = parser.add_argument_group("plan (--dry_run)")
    g.add_argument("--dry_run", action="store_true",
                   help="print parameters, memory per GPU, fit, tokens, steps and time, then exit without training")
    g.add_argument("--json", action="store_true", help="with --dry_run: print the plan as one JSON object")
    g.add_argument("--gpu", type=lookup_gpu, metavar="NAME",
                   help=f"GPU to plan for: {', '.join(GPUS)} (default: the local CUDA device, if known)")
    g.add_argument("--nproc_per_node", type=int,
                   help="GPUs (processes) to plan for (default: $WORLD_SIZE, else the local CUDA device count, else 1)")
    g.add_argument("--gpu_memory_gib", type=float, help="GPU memory in GiB (default: from --gpu)")
    g.add_argument("--gpu_tflops", type=float, help="dense bf16/fp16 peak TFLOPS (default: from --gpu)")
    g.add_argument("--mfu", type=float, help="model FLOPs utilisation for the time (default: per GPU, 0.25-0.35)")
    return parser


def resolve_gpu(name=None, memory_gib=None, tflops=None):
    """(name, GPU) from --gpu, else the local CUDA device; --gpu_memory_gib/--gpu_tflops override.
    (None, None) when nothing is known."""
    device_name = None
    if name is None:
        import torch
        if torch.cuda.is_available():
            device_name = torch.cuda.get_device_name(0)
            name = match_gpu(device_name)
            if name is None and memory_gib is None:  # not in GPUS: its memory at least
                memory_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    gpu = GPUS.get(name) if name else None
    if memory_gib is None and tflops is None:
        return name, gpu
    base = gpu or GPU(None, None, True, True, 0.30)
    return (name or device_name or "custom",
            base._replace(memory_gib=memory_gib or base.memory_gib, tflops=tflops or base.tflops))


def default_world_size() -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    import torch
    return torch.cuda.device_count() or 1


def plan_from_args(args, config, tokenizer=None, trainable_params: int = None, *, world_size: int = None,
                   dtype=None, compiled: bool = None, samples: int = None) -> dict:
    """plan() for a trainer's parsed arguments (add_plan_arguments' flags included) and the
    ModelConfig it will train; tokenizer: to count a jsonl's tokens. A dry run plans a CUDA run
    from the flags; a real run passes what it has resolved: world_size, dtype, compiled, and
    samples = len(train_set)."""
    name, gpu = resolve_gpu(getattr(args, "gpu", None), getattr(args, "gpu_memory_gib", None),
                            getattr(args, "gpu_tflops", None))
    world_size = world_size or getattr(args, "nproc_per_node", None) or default_world_size()
    dtype = str(dtype or args.dtype).replace("torch.", "")
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    if dtype == "auto":  # what train() picks on that GPU
        dtype = "bfloat16" if gpu is None or gpu.bf16 else "float16"
    if compiled is None:
        compiled = args.compile if args.compile is not None else True  # the CUDA default
    have_data = args.data_path and os.path.isfile(args.data_path)  # a dry run may come before the data
    data = data_size(args.data_path, config.max_seq_len, tokenizer, args.batch_size) if have_data else None
    if data is not None and samples is not None:
        data["samples"] = samples
    return plan(config, args.batch_size, args.accumulation_steps, world_size, dtype, compiled, name, gpu,
                getattr(args, "mfu", None), data, args.epochs, args.max_steps, trainable_params)


def print_plan(p: dict, as_json: bool = False):
    print(json.dumps(p) if as_json else format_plan(p), flush=True)
