"""train_plan.py: the activation count against what autograd really saves, the memory sum, the
fit and batch suggestion, tokens from token files and jsonl, steps and hours, the flags."""
import argparse
import json
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import train_plan as tp
from conftest import SENTENCES, write_jsonl
from k_model import ModelConfig, Transformer, count_parameters

CHAPTER = dict(dim=1024, n_layers=18, n_heads=16, n_kv_heads=8, vocab_size=6144, max_seq_len=512)

# dim, n_layers, n_heads, n_kv_heads, vocab, seq, batch
SIZES = [
    (64, 2, 4, 2, 400, 32, 2),
    (128, 4, 8, 2, 2048, 128, 1),
    (256, 2, 8, 4, 6144, 256, 4),
    (96, 2, 6, 6, 1000, 64, 3),  # no GQA
]


def saved_bytes(model, tokens, targets, dtype, math_attention=False) -> int:
    """Bytes of the storages autograd saves in a training forward, each storage once, the
    model's own parameters and buffers (which saved tensors often view) left out."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            storages[ptr] = t.untyped_storage().nbytes()
        return t  # the graph keeps it alive, so no pointer is reused while we count

    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
    kernel = sdpa_kernel(SDPBackend.MATH) if math_attention else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast, kernel:
        out = model(tokens, targets)
    assert out.loss.requires_grad
    return sum(storages.values())


def build(dim, n_layers, n_heads, n_kv_heads, vocab, seq, **kwargs):
    torch.manual_seed(0)
    config = ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         vocab_size=vocab, max_seq_len=seq, **kwargs)
    return config, Transformer(config).train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "d{}-L{}-h{}/{}-V{}-T{}-B{}".format(*s))
def test_activation_estimate_matches_saved_tensors(size, dtype):
    dim, n_layers, n_heads, n_kv_heads, vocab, seq, batch = size
    config, model = build(dim, n_layers, n_heads, n_kv_heads, vocab, seq)
    tokens = torch.randint(0, vocab, (batch, seq))
    measured = saved_bytes(model, tokens, torch.randint(0, vocab, (batch, seq)), dtype)
    # CPU's SDPA runs its flash kernel, which saves what CUDA's does: q, k, v, out, logsumexp
    estimate = tp.activation_bytes(config, batch, seq, dtype, compiled=False, flash=True)["total"]
    assert abs(estimate - measured) / measured < 0.15, (size, dtype, estimate, measured)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", SIZES[:2], ids=lambda s: "d{}-L{}-h{}/{}-V{}-T{}-B{}".format(*s))
def test_activation_estimate_math_attention(size, dtype):
    """Without FlashAttention (V100, T4) enable_gqa sends SDPA to the math kernel: seq x seq saved."""
    dim, n_layers, n_heads, n_kv_heads, vocab, seq, batch = size
    config, model = build(dim, n_layers, n_heads, n_kv_heads, vocab, seq)
    tokens = torch.randint(0, vocab, (batch, seq))
    measured = saved_bytes(model, tokens, tokens, dtype, math_attention=True)
    estimate = tp.activation_bytes(config, batch, seq, dtype, compiled=False, flash=False)["total"]
    assert abs(estimate - measured) / measured < 0.15, (size, dtype, estimate, measured)


@pytest.mark.skipif(os.environ.get("TRAIN_PLAN_COMPILE") != "1",
                    reason="torch.compile takes about a minute on CPU; set TRAIN_PLAN_COMPILE=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_estimate_matches_saved_tensors(dtype):
    config, model = build(64, 2, 4, 2, 400, 32)
    tokens = torch.randint(0, 400, (2, 32))
    compiled = torch.compile(model)
    with torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext():
        compiled(tokens, tokens).loss.backward()  # compile outside the hooks
    measured = saved_bytes(compiled, tokens, tokens, dtype)
    estimate = tp.activation_bytes(config, 2, 32, dtype, compiled=True)["total"]
    assert abs(estimate - measured) / measured < 0.15, (dtype, estimate, measured)


def test_compiled_and_bf16_save_less():
    config = ModelConfig(**CHAPTER)
    eager32, eager16, compiled16 = (tp.activation_bytes(config, 8, 512, d, compiled=c)["total"]
                                    for d, c in (("float32", False), ("bfloat16", False), ("bfloat16", True)))
    assert compiled16 < 0.7 * eager16 < eager32
    # the log-softmax of the fp32 logits is one of the largest single tensors
    assert tp.activation_bytes(config, 8, 512, "bfloat16")["logits"] == 4 * 8 * 512 * 6144


@pytest.mark.parametrize("kwargs", [{}, dict(tie_word_embeddings=False), dict(hidden_dim=200, n_kv_heads=4)])
def test_count_params(kwargs):
    config = ModelConfig(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300), **kwargs})
    assert tp.count_params(config) == count_parameters(Transformer(config))
    assert tp.count_params(ModelConfig(**CHAPTER)) == 215_127_040  # the chapter's "215M"


def test_memory_plan_adds_up():
    config = ModelConfig(**CHAPTER)
    n = tp.count_params(config)
    parts = tp.memory_plan(config, 16, 512, world_size=4, dtype="bfloat16", compiled=True)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert parts["weights"] == parts["gradients"] == 4 * n and parts["optimizer"] == 8 * n
    assert parts["ddp_buckets"] == 0  # gradient_as_bucket_view: the buckets are the gradients
    assert parts["autocast_weights"] == 2 * tp.linear_params(config)
    assert tp.memory_plan(config, 16, 512, world_size=4, bucket_view=False)["ddp_buckets"] == 4 * n
    fp32 = tp.memory_plan(config, 16, 512, dtype=torch.float32)
    assert fp32["autocast_weights"] == 0
    lora = tp.memory_plan(config, 16, 512, trainable_params=1000)
    assert lora["gradients"] == 4000 and lora["optimizer"] == 8000 and lora["weights"] == 4 * n
    # activations grow with the batch, the rest does not
    double = tp.memory_plan(config, 32, 512, world_size=4, compiled=True)
    assert double["activations"] == 2 * parts["activations"] and double["weights"] == parts["weights"]


def test_too_small_gpu_gets_a_batch_that_fits():
    config = ModelConfig(**CHAPTER)
    small = tp.GPU(8.0, 100.0, True, True, 0.3)
    p = tp.plan(config, 32, 8, world_size=4, gpu_name="small", gpu=small)
    assert p["fits"] is False and p["margin_gib"] < 0
    b, acc = p["suggested_batch_size"], p["suggested_accumulation_steps"]
    assert b * acc == 32 * 8 and b < 32
    assert tp.memory_plan(config, b, 512, world_size=4)["total"] <= 8.0 * tp.GIB
    bigger = min(d for d in range(b + 1, 257) if 256 % d == 0)
    assert tp.memory_plan(config, bigger, 512, world_size=4)["total"] > 8.0 * tp.GIB
    assert "does NOT fit" in tp.format_plan(p) and f"--batch_size {b}" in tp.format_plan(p)

    tiny = tp.plan(config, 32, 8, gpu_name="tiny", gpu=small._replace(memory_gib=2.0))
    assert tiny["fits"] is False and tiny["suggested_batch_size"] is None
    assert "not even batch 1" in tp.format_plan(tiny)

    big = tp.plan(config, 32, 8, gpu_name="H200", gpu=tp.GPUS["H200"])
    assert big["fits"] is True and big["suggested_batch_size"] is None and big["margin_gib"] > 0


def test_gpu_table_and_names():
    for name in ("3090", "4090", "A100-40GB", "A100-80GB", "H100", "H200", "V100-16GB", "T4", "L4"):
        assert name in tp.GPUS
    assert tp.GPUS["4090"].tflops == pytest.approx(165.2) and not tp.GPUS["T4"].bf16
    assert tp.match_gpu("NVIDIA GeForce RTX 4090") == "4090"
    assert tp.match_gpu("NVIDIA A100-SXM4-80GB") == "A100-80GB"
    assert tp.match_gpu("NVIDIA A100-PCIE-40GB") == "A100-40GB"
    assert tp.match_gpu("NVIDIA H100 80GB HBM3") == "H100"
    assert tp.match_gpu("NVIDIA H100 PCIe") == "H100-PCIe"
    assert tp.match_gpu("Tesla V100-SXM2-32GB") == "V100-32GB"
    assert tp.match_gpu("Tesla T4") == "T4" and tp.match_gpu("NVIDIA L4") == "L4"
    assert tp.match_gpu("NVIDIA L40S") == "L40S" and tp.match_gpu("Some Other GPU") is None
    # V100 and T4 have no FlashAttention, nor has fp32: with GQA the model copies k/v to every
    # head there (memory-efficient kernel), which the plan counts at full width
    config = ModelConfig(**CHAPTER)
    assert not tp.kv_heads_repeated(config, "bfloat16", tp.GPUS["A100-80GB"])
    assert tp.kv_heads_repeated(config, "float16", tp.GPUS["T4"])
    assert tp.kv_heads_repeated(config, "float32", tp.GPUS["A100-80GB"])
    assert not tp.kv_heads_repeated(ModelConfig(**{**CHAPTER, "n_kv_heads": 16}), "float16", tp.GPUS["T4"])
    repeated = tp.activation_bytes(config, 2, 512, "float16", kv_repeated=True)["layers"]
    assert repeated > tp.activation_bytes(config, 2, 512, "float16")["layers"]
    assert tp.plan(config, 32, 8, 1, "float16", gpu_name="T4", gpu=tp.GPUS["T4"])["attention"].startswith("memory")


def write_token_file(path, n_tokens):
    np.arange(n_tokens, dtype=np.uint16).tofile(path)
    with open(path + ".json", "w") as f:
        json.dump({"dtype": "uint16", "vocab_size": 400, "n_tokens": n_tokens, "n_docs": 3,
                   "tokenizer_sha256": "x", "source": "test"}, f)
    return str(path)


def test_tokens_from_token_file(tmp_path):
    path = write_token_file(str(tmp_path / "train.bin"), 10_001)
    d = tp.data_size(path, seq_len=100)
    assert d["tokens"] == 10_001 and d["samples"] == 100 and not d["estimated"]
    assert d["positions_per_sample"] == 100


def test_tokens_of_a_jsonl_estimated_from_a_sample(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(tp, "SAMPLE_CHUNK_BYTES", 16 * 1024)  # a 128 KiB sample: quicker to tokenize
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(SENTENCES, size=rng.integers(1, 8))) for _ in range(3_000)]
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in texts])
    assert os.path.getsize(path) > tp.SAMPLE_CHUNKS * tp.SAMPLE_CHUNK_BYTES  # so it is sampled
    exact = sum(len(ids) + 2 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    d = tp.data_size(path, seq_len=64, tokenizer=tokenizer)
    assert d["estimated"] and abs(d["tokens"] - exact) / exact < 0.05
    assert abs(d["samples"] - len(texts)) / len(texts) < 0.05
    assert d["positions_per_sample"] == 64  # padded to max_seq_len: every position costs
    # without a tokenizer: file size over bytes per token
    assert tp.data_size(path, 64)["tokens"] == round(os.path.getsize(path) / tp.BYTES_PER_TOKEN)
    # a small file is read whole: exact
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": t} for t in texts[:50]] + ["not json"])
    d = tp.data_size(small, seq_len=64, tokenizer=tokenizer)
    assert not d["estimated"] and d["samples"] == 50
    assert d["tokens"] == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 2 for t in texts[:50])


def test_chats_cost_their_batch_longest(tmp_path, tokenizer):
    chats = [[{"role": "user", "content": s}, {"role": "assistant", "content": s * (i % 4 + 1)}]
             for i, s in enumerate(SENTENCES * 5)]
    path = write_jsonl(tmp_path / "sft.jsonl", chats)
    d1 = tp.data_size(path, seq_len=512, tokenizer=tokenizer, batch_size=1)
    d8 = tp.data_size(path, seq_len=512, tokenizer=tokenizer, batch_size=8)
    assert d1["samples"] == len(chats) and d1["positions_per_sample"] < d8["positions_per_sample"] < 512
    assert tp.expected_max([1, 2, 3], 1) == pytest.approx(2.0)
    assert tp.expected_max([1, 2, 3], 2) == pytest.approx((1 * 1 + 2 * 3 + 3 * 5) / 9)


def test_steps_and_hours():
    config = ModelConfig(**CHAPTER)
    data = dict(tokens=10_000 * 512, samples=10_000, positions_per_sample=512, estimated=False, how="test")
    gpu = tp.GPUS["A100-80GB"]
    p = tp.plan(config, 8, 2, world_size=4, gpu_name="A100-80GB", gpu=gpu, data=data, epochs=2)
    # 2500 samples per rank, 313 batches, 157 steps per epoch
    assert p["steps_per_epoch"] == 157 and p["steps"] == 314
    assert p["tokens_per_step"] == 8 * 2 * 4 * 512
    assert p["flops_per_token"] == 6 * 215_127_040 + 12 * 18 * 1024 * 512
    expected = p["steps"] * p["tokens_per_step"] * p["flops_per_token"] / (4 * 312e12 * gpu.mfu) / 3600
    assert p["hours"] == pytest.approx(expected) and p["mfu"] == gpu.mfu
    assert tp.plan(config, 8, 2, gpu=gpu, data=data, max_steps=5)["steps"] == 5
    eager = tp.plan(config, 8, 2, 4, compiled=False, gpu=gpu, data=data)
    assert eager["mfu"] == pytest.approx(gpu.mfu * tp.EAGER_MFU_FACTOR)
    assert tp.plan(config, 8, 2, 4, gpu=gpu, data=data, mfu=0.5)["mfu"] == 0.5
    # no GPU known: memory and steps, no fit and no time
    p = tp.plan(config, 8, 2, world_size=4, data=data)
    assert p["fits"] is None and p["hours"] is None and p["steps"] == 157
    assert "unknown GPU" in tp.format_plan(p)


def test_flags_and_plan_from_trainer_args(tmp_path):
    import ddp_pretrain
    from harness import build_parser, parse_args
    parser = build_parser("", ddp_pretrain.DEFAULTS, ddp_pretrain.PRESETS)  # the trainers carry the plan flags
    path = write_token_file(str(tmp_path / "train.bin"), 4096 * 513 + 1)
    args = parse_args(["--preset", "chapter", "--data_path", path, "--dry_run", "--json",
                      "--gpu", "a100-80gb", "--nproc_per_node", "4"], parser, ddp_pretrain.DEFAULTS, ddp_pretrain.PRESETS)
    assert args.dry_run and args.json and args.gpu == "A100-80GB" and args.nproc_per_node == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--gpu", "rtx9999"])
    config = ModelConfig(**CHAPTER)
    p = tp.plan_from_args(args, config)
    assert p["gpu"] == "A100-80GB" and p["world_size"] == 4 and p["dtype"] == "bfloat16" and p["compiled"]
    assert p["samples"] == 4096 * 513 // 512 and p["fits"] is True
    out = json.loads(json.dumps(p))
    for key in ("params", "memory_gib_per_gpu", "activation_gib", "fits", "tokens", "steps", "hours"):
        assert out[key] is not None, key
    assert set(out["activation_gib"]) == {"eager", "compiled"}
    assert sum(out["memory_breakdown_gib"].values()) == pytest.approx(out["memory_gib_per_gpu"], abs=0.01)
    line = tp.summary_line(p)
    assert "\n" not in line and "215.1M" in line and "A100-80GB" in line
    # a T4 has no bf16: dtype auto plans float16; a custom GPU from its numbers
    args = parser.parse_args(["--gpu", "T4", "--nproc_per_node", "1"])
    args.data_path = None
    assert tp.plan_from_args(args, config)["dtype"] == "float16"
    args = parser.parse_args(["--gpu_memory_gib", "48", "--gpu_tflops", "200", "--nproc_per_node", "2"])
    args.data_path = path
    p = tp.plan_from_args(args, config)
    assert p["gpu"] == "custom" and p["gpu_memory_gib"] == 48 and p["tflops"] == 200 and p["hours"] > 0
    assert isinstance(tp.format_plan(p), str)
    # a real run passes what it resolved (here: CPU, fp32, eager, no GPU to plan for)
    args = parser.parse_args(["--data_path", path])
    p = tp.plan_from_args(args, config, world_size=2, dtype=torch.float32, compiled=False, samples=100)
    assert (p["world_size"], p["dtype"], p["compiled"], p["samples"]) == (2, "float32", False, 100)
    assert p["memory_breakdown_gib"]["autocast_weights"] == 0 and p["attention"].startswith("memory-efficient")
    if not torch.cuda.is_available():
        assert p["fits"] is None and p["hours"] is None and "\n" not in tp.summary_line(p)


def test_help_names_the_defaults():
    text = tp.add_plan_arguments(argparse.ArgumentParser()).format_help()
    for flag in ("--dry_run", "--json", "--gpu", "--nproc_per_node", "--gpu_memory_gib", "--gpu_tflops", "--mfu"):
        assert flag in text
    assert "WORLD_SIZE" in text and "4090" in text

