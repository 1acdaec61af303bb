"""Generation speed, side by side in one run: KV cache (eager, and with the compiled decode
step) vs the chapter's no-cache loop vs Hugging Face LlamaForCausalLM.generate (with its
cache), same model size, greedy. On CUDA both models run in bf16 (fp16 without bf16).

    python code/bench_generate.py            # 400 new tokens at batch 1 and 8
    python code/bench_generate.py --smoke    # a few tokens, to check that it runs

The weights are random (speed does not depend on them); no stop token, so every run makes
exactly --new_tokens tokens.
"""
import argparse
import time

import torch

from bench_train import hf_llama, print_table
from cli import HelpFormatter
from k_model import ModelConfig, Transformer, cast_for_inference

# ---- hyperparameters (CLI flags override) ----
NEW_TOKENS = 400
PROMPT_TOKENS = 16
BATCH_SIZES = (1, 8)
CONFIG = dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=6144, max_seq_len=512)  # the demo model


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 8 tokens, to check that it runs")
    parser.add_argument("--new_tokens", type=int, default=NEW_TOKENS, help="tokens generated per run (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu (default: %(default)s)")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    new_tokens = 8 if args.smoke else args.new_tokens
    config = ModelConfig(**(dict(CONFIG, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
                            if args.smoke else CONFIG))
    torch.manual_seed(0)
    ours = Transformer(config).to(device).eval()
    hf = hf_llama(config).to(device).eval()
    if device.startswith("cuda"):  # what TextGenerator and serve.py run on a GPU
        from harness import resolve_dtype
        dtype = resolve_dtype("auto", "cuda")
        ours, hf = cast_for_inference(ours, dtype), hf.to(dtype)
    hf.generation_config.pad_token_id = 0
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__} | dim {config.dim}, "
          f"{config.n_layers} layers, prompt {PROMPT_TOKENS} tokens, {new_tokens} new tokens, greedy")

    rows = []
    for batch in BATCH_SIZES:
        prompt = torch.randint(5, config.vocab_size, (batch, PROMPT_TOKENS), device=device)
        runs = {
            "Tiny-K, KV cache": lambda: ours.generate(prompt, max_new_tokens=new_tokens, temperature=0.0),
            "Tiny-K, KV cache, compiled step": lambda: ours.generate(prompt, max_new_tokens=new_tokens,
                                                                     temperature=0.0, compile_decode=True),
            "Tiny-K, no cache (chapter)": lambda: ours.generate(prompt, max_new_tokens=new_tokens, temperature=0.0,
                                                                use_kv_cache=False),
            "HF LlamaForCausalLM.generate": lambda: hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False),
        }
        with torch.inference_mode():  # warm up both models briefly
            ours.generate(prompt, max_new_tokens=2, temperature=0.0)
            ours.generate(prompt, max_new_tokens=4, temperature=0.0, compile_decode=True)  # compiles once per bucket (k_model.DECODE_BUCKETS)
            hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False)
        seconds = {}
        for name, fn in runs.items():
            with torch.inference_mode():
                seconds[name], out = timed(fn, device)
            made = out.shape[1] - (PROMPT_TOKENS if name.startswith("HF") else 0)
            assert made == new_tokens, f"{name} made {made} tokens"
        for name, sec in seconds.items():
            rows.append([batch, name, f"{batch * new_tokens / sec:,.0f}",
                         f"{seconds['Tiny-K, no cache (chapter)'] / sec:.2f}x",
                         f"{seconds['HF LlamaForCausalLM.generate'] / sec:.2f}x"])

    print_table("greedy generation", ["batch", "path", "tokens/s", "vs no cache", "vs HF"], rows)


if __name__ == "__main__":
    main()
