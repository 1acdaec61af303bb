"""Is Tiny-K right and fast on this GPU? One CUDA machine, under 8 minutes, one table.

    bash code/gpu_check.sh              # the chapter preset on this machine's GPU(s)
    python code/gpu_check.py --smoke    # a tiny model on CPU: checks this script, not a GPU

No downloads: the corpus is synthetic (random Chinese characters), so losses mean nothing
here; speed, memory, graphs and equivalences do. Steps: environment; tokenizer and token
file; chapter-preset pretraining, compiled, on 1 GPU and (with several) under torchrun on all;
tokens/s, MFU against the card's dense bf16 peak, peak memory against the --dry_run
estimate; SFT on trimmed batches and its number of compiled graphs; generation tokens/s with
and without the compiled decode step; export to Hugging Face and the logits check.
Never part of CI.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

from cli import HelpFormatter
from report import read_metrics

CODE = os.path.dirname(os.path.abspath(__file__))

# ---- hyperparameters (CLI flags override) ----
PRETRAIN_STEPS = 300      # optimizer steps of the chapter preset (the first log window includes compiling)
DDP_STEPS = 100           # the same under torchrun on every GPU: enough to measure the scaling
SFT_STEPS = 100           # one micro-batch a step: 100 batches of chats
BATCH_SIZE = 16           # per GPU, sequences of 512 tokens
GEN_TOKENS = 256          # new tokens per generation run
BUDGET_S = 480            # the whole check should take 8 minutes; the table says if it did not
SMOKE_MODEL = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "64"]


def synthetic_corpus(directory, n_chars, seed=0):
    """Pretraining lines of random common CJK characters and SFT chats of varied lengths."""
    rng = random.Random(seed)
    alphabet = [chr(0x4E00 + i) for i in range(3000)]
    weights = [1 / (i + 1) for i in range(len(alphabet))]  # Zipf-like, as real text is

    def text(n):
        chars = rng.choices(alphabet, weights, k=n)
        return "".join(c + ("，" if rng.random() < 0.08 else "") for c in chars) + "。"
    pretrain = os.path.join(directory, "pretrain.jsonl")
    with open(pretrain, "w", encoding="utf-8") as f:
        written = 0
        while written < n_chars:
            line = text(rng.randint(50, 500))
            f.write(json.dumps({"text": line}, ensure_ascii=False) + "\n")
            written += len(line)
    sft = os.path.join(directory, "sft.jsonl")
    with open(sft, "w", encoding="utf-8") as f:
        for _ in range(3000):
            chat = [{"role": "user", "content": text(rng.randint(5, 80))},
                    {"role": "assistant", "content": text(rng.randint(10, 350))}]
            f.write(json.dumps(chat, ensure_ascii=False) + "\n")
    return pretrain, sft


def run(cmd, log):
    """Run a command, its output into `log`; raise with the output's tail if it fails."""
    start = time.time()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if done.returncode != 0:
        with open(log) as f:
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{f.read()[-3000:]}")
    return time.time() - start


def steady_tokens_per_s(metrics):
    """Mean tok/s of the log lines after the first (which includes compiling)."""
    speeds = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    return sum(speeds[1:]) / len(speeds[1:]) if len(speeds) > 1 else speeds[0]


def generation_speed(model, batch, new_tokens, compile_decode):
    """Greedy tokens/s at this batch size, no stop token; the compiled step is warmed up first."""
    prompt = torch.randint(5, model.config.vocab_size, (batch, 16), device=model.device)
    model.generate(prompt, max_new_tokens=4, temperature=0.0, compile_decode=compile_decode)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, temperature=0.0, compile_decode=compile_decode)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return out.numel() / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps, on CPU: tests this script")
    parser.add_argument("--work_dir", help="where the data and runs go (default: a temporary directory)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; this check is for a GPU machine (--smoke runs it on CPU, tiny)")
    from train_plan import GPUS, flops_per_token, match_gpu
    rows = []  # (check, result, note)
    started = time.time()

    def row(check, result, note=""):
        rows.append((check, result, note))
        print(f"[gpu_check] {check}: {result} {note}", flush=True)

    n_gpus = torch.cuda.device_count() if device == "cuda" else 1
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        gpu_key = match_gpu(name)
        row("GPU", f"{n_gpus} x {name}", f"sm{''.join(map(str, torch.cuda.get_device_capability(0)))}, "
            f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
        row("torch / CUDA", f"{torch.__version__} / {torch.version.cuda}",
            f"bf16 native: {torch.cuda.is_bf16_supported(including_emulation=False)}")
    else:
        gpu_key = None
        row("device", "CPU (smoke run)", f"torch {torch.__version__}")
    peak_tflops = GPUS[gpu_key].tflops if gpu_key else None

    work = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    py = sys.executable
    # no run may reach an epoch's end: its shorter last batch would compile another graph. A character of
    # this corpus is about one token; 20% more than the most any run reads
    steps = 20 if smoke else PRETRAIN_STEPS
    ddp_steps = DDP_STEPS if n_gpus > 1 else 0
    tokens_needed = max(steps, ddp_steps * n_gpus) * BATCH_SIZE * (64 if smoke else 512)
    pretrain_jsonl, sft_jsonl = synthetic_corpus(work, int(1.2 * tokens_needed))
    tok = os.path.join(work, "tokenizer")
    run([py, f"{CODE}/train_tokenizer.py", "--data_path", pretrain_jsonl, sft_jsonl, "--save_dir", tok,
         "--vocab_size", "6144"], os.path.join(work, "tokenizer.log"))
    run([py, f"{CODE}/pretokenize.py", "--data_path", pretrain_jsonl, "--tokenizer_path", tok],
        os.path.join(work, "pretokenize.log"))
    bin_path = pretrain_jsonl.replace(".jsonl", ".bin")

    model_flags = SMOKE_MODEL if smoke else []
    common = ["--preset", "chapter", *model_flags, "--tokenizer_path", tok, "--batch_size", str(BATCH_SIZE),
              "--accumulation_steps", "1", "--max_steps", str(steps), "--log_interval", str(steps // 4),
              "--eval_interval", str(10 * steps), "--save_interval", str(10 * steps), "--warmup_iters", "10",
              "--device", device] + (["--no-compile"] if smoke else [])
    pre_out = os.path.join(work, "pretrain")
    plan = json.loads(subprocess.run(
        [py, f"{CODE}/ddp_pretrain.py", *common, "--data_path", bin_path, "--out_dir", pre_out, "--dry_run",
         "--json", "--nproc_per_node", "1"], capture_output=True, text=True, check=True).stdout)
    seconds = run([py, f"{CODE}/ddp_pretrain.py", *common, "--data_path", bin_path, "--out_dir", pre_out],
                  os.path.join(work, "pretrain.log"))
    metrics = read_metrics(pre_out)
    speed = steady_tokens_per_s(metrics)
    from k_model import ModelConfig
    config = ModelConfig.from_pretrained(pre_out)
    flops = flops_per_token(config, config.max_seq_len) * speed
    mfu = f"MFU {flops / (peak_tflops * 1e12):.1%} of {peak_tflops:g} TFLOPS" if peak_tflops else \
        f"{flops / 1e12:.2f} TFLOP/s"
    row("pretrain, 1 GPU, compiled" if device == "cuda" else "pretrain, CPU", f"{speed:,.0f} tok/s",
        f"{mfu}; {plan['params'] / 1e6:.0f}M params, {steps} steps in {seconds:.0f} s")
    peak = [m["peak_memory_gib"] for m in metrics if "peak_memory_gib" in m]
    estimate = plan["memory_gib_per_gpu"]
    if peak:
        row("peak memory vs --dry_run", f"{max(peak):.1f} GiB measured", f"{estimate:.1f} GiB estimated "
            f"(the estimate adds the CUDA context and fragmentation, which PyTorch's counter leaves out)")
    graphs = [m for m in metrics if "compiled_graphs" in m]
    if graphs:
        row("pretrain graphs", f"{graphs[-1]['compiled_graphs']} graphs", f"{graphs[-1]['graph_breaks']} graph breaks")

    if n_gpus > 1:
        ddp_out = os.path.join(work, "pretrain_ddp")
        ddp_flags = [*common, "--max_steps", str(ddp_steps), "--log_interval", str(ddp_steps // 4)]  # override
        seconds = run([py, "-m", "torch.distributed.run", "--nproc_per_node", str(n_gpus),
                       f"{CODE}/ddp_pretrain.py", *ddp_flags, "--data_path", bin_path, "--out_dir", ddp_out],
                      os.path.join(work, "pretrain_ddp.log"))
        ddp_speed = steady_tokens_per_s(read_metrics(ddp_out))
        ddp_flops = flops_per_token(config, config.max_seq_len) * ddp_speed
        row(f"pretrain, torchrun x {n_gpus}", f"{ddp_speed:,.0f} tok/s",
            f"{ddp_speed / speed / n_gpus:.0%} scaling; MFU {ddp_flops / (peak_tflops * 1e12 * n_gpus):.1%}"
            if peak_tflops else f"{ddp_speed / speed / n_gpus:.0%} scaling")

    sft_out = os.path.join(work, "sft")
    sft_steps = 10 if smoke else SFT_STEPS
    seconds = run([py, f"{CODE}/ddp_sft.py", *model_flags, "--tokenizer_path", tok, "--data_path", sft_jsonl,
                   "--pretrained_path", pre_out, "--out_dir", sft_out, "--batch_size", str(BATCH_SIZE),
                   "--accumulation_steps", "1",  # the default 8 would make 100 steps 800 micro-batches
                   "--max_steps", str(sft_steps), "--log_interval", str(sft_steps // 2),
                   "--eval_interval", str(10 * sft_steps), "--save_interval", str(10 * sft_steps),
                   "--device", device] + (["--no-compile"] if smoke else []), os.path.join(work, "sft.log"))
    sft_metrics = read_metrics(sft_out)
    graphs = [m for m in sft_metrics if "compiled_graphs" in m]
    row("SFT, trimmed batches", f"{steady_tokens_per_s(sft_metrics):,.0f} real tok/s",
        f"{graphs[-1]['compiled_graphs']} compiled graphs, {graphs[-1]['graph_breaks']} graph breaks" if graphs
        else f"{sft_steps} steps in {seconds:.0f} s, not compiled")

    from model_sample import TextGenerator
    generator = TextGenerator(sft_out, device=device)
    model = generator.model
    new_tokens = 16 if smoke else GEN_TOKENS
    for batch in (1, 8):
        eager = generation_speed(model, batch, new_tokens, compile_decode=False)
        compiled = generation_speed(model, batch, new_tokens, compile_decode=True)
        row(f"generate, batch {batch}, {model.dtype}".replace("torch.", ""), f"{eager:,.0f} tok/s eager",
            f"{compiled:,.0f} tok/s compiled decode step ({compiled / eager:.2f}x)")

    from export_model import export
    from model_io import load_tiny_k
    from transformers import AutoModelForCausalLM
    hf_dir = os.path.join(work, "hf")
    export(sft_out, sft_out, hf_dir)
    ours = load_tiny_k(sft_out).to(device).eval()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    tokens = torch.randint(5, config.vocab_size, (2, 64 if smoke else 256), device=device)
    with torch.no_grad():
        diff = (ours(tokens, tokens).logits - hf(tokens).logits).abs().max().item()
    row("export: HF logits vs Tiny-K", f"max |diff| {diff:.2e}", "fp32, the same tokens")

    total = time.time() - started
    row("total time", f"{total:.0f} s", ("within" if total <= BUDGET_S else "over") + f" the {BUDGET_S} s budget")
    print("\nTiny-K GPU check" + (" (smoke run on CPU)" if smoke else ""))
    width = [max(len(str(r[i])) for r in rows) for i in range(3)]
    for check, result, note in rows:
        print(f"  {check:<{width[0]}}  {result:<{width[1]}}  {note}")
    print(f"\nlogs and runs in {work}")


if __name__ == "__main__":
    main()
