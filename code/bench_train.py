"""Training throughput, measured side by side in one run (machines are noisy; ratios are not).

    python code/bench_train.py            # CPU: the demo model; CUDA: the chapter's 215M model
    python code/bench_train.py --smoke    # two steps of a tiny model, to check that it runs
    python code/bench_train.py --time_to_loss 120   # + train each path for 120 s, same budget (~9 min)

Prints three tables:
  1. real (non-padding) tokens/s: our packed path vs the chapter's padded PretrainDataset path
     on the demo corpus (needs data/demo_pretrain.jsonl and tokenizer_k; bash code/run_demo.sh);
  2. forward+backward+AdamW step: k_model.Transformer vs Hugging Face LlamaForCausalLM of the
     same size;
  3. model FLOP/s (6 * params * tokens + attention) as a fraction of this machine's peak,
     measured with a large matmul in the same run: the MFU.
With --time_to_loss SECONDS it then trains the demo preset with ddp_pretrain.py on each path for
the same SECONDS (each run's step count set from the speed measured in table 1), and prints the
validation loss and bits per character each reaches: learning per second, not only tokens.
"""
import argparse
import itertools
import os
import sys
import tempfile
import time

import torch

from cli import HelpFormatter
from ddp_pretrain import PRESETS
from harness import autocast, make_optimizer, resolve_dtype
from k_model import ModelConfig, Transformer, count_parameters, mlp_hidden_dim

# ---- hyperparameters (CLI flags override) ----
WARMUP_STEPS = 3
TIMED_STEPS = 10
DATA_PATH = "data/demo_pretrain.jsonl"
VAL_DATA_PATH = "data/demo_pretrain_val.jsonl"
SFT_DATA_PATH = "data/demo_sft.jsonl"
TOKENIZER_PATH = "tokenizer_k"


def bench_config(device_type, smoke):
    if smoke:
        return dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, batch_size=4)
    preset = PRESETS["chapter" if device_type == "cuda" else "demo"]
    return dict({k: preset[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")},
                batch_size=16 if device_type == "cuda" else preset["batch_size"])


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step_fns, batches, device, warmup, steps, rounds=3):
    """Per step function: (seconds per step, real tokens per step), the best of `rounds`.

    The functions take turns round by round, so a slow spell of the machine hits them alike.
    """
    batches = list(batches)
    for step_fn in step_fns:
        for batch in batches[:warmup]:
            step_fn(batch)
    sync(device)
    best = [float("inf")] * len(step_fns)
    timed = list(itertools.islice(itertools.cycle(batches), steps))
    real_tokens = [sum(int(b[2].sum()) for b in timed) / steps] * len(step_fns)
    for _ in range(rounds):
        for i, step_fn in enumerate(step_fns):
            start = time.perf_counter()
            for batch in timed:
                step_fn(batch)
            sync(device)
            best[i] = min(best[i], (time.perf_counter() - start) / steps)
    return list(zip(best, real_tokens))


def make_train_step(model, device, dtype, compile_model=False):
    optimizer = make_optimizer(model, argparse.Namespace(weight_decay=0.1, learning_rate=1e-4),
                               "cuda" if device.startswith("cuda") else "cpu")
    forward = torch.compile(model) if compile_model else model
    device_type = "cuda" if device.startswith("cuda") else "cpu"

    def step(batch):
        X, Y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast(device_type, dtype):
            # HF shifts the labels itself: same compute, one position fewer in the loss
            out = forward(X, Y) if isinstance(model, Transformer) else forward(input_ids=X, labels=X)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def time_paths(paths, config, device, compile_model, warmup, steps):
    """(seconds, real tokens) per step for each (name, batches, dtype), each with a fresh model."""
    results = []
    for _, batches, dtype in paths:
        torch.manual_seed(0)
        model = Transformer(config).to(device)
        results += time_steps([make_train_step(model, device, dtype, compile_model)], batches, device, warmup, steps)
    return results


def loader_batches(dataset, batch_size, n):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    return list(itertools.islice(loader, n))


def random_batches(vocab_size, batch_size, seq_len, n):
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        tokens = torch.randint(5, vocab_size, (batch_size, seq_len + 1), generator=g)
        batches.append((tokens[:, :-1], tokens[:, 1:], torch.ones(batch_size, seq_len, dtype=torch.long)))
    return batches


def peak_flops(device, dtype, smoke):
    """FLOP/s of a large square matmul in `dtype`: the ceiling for the model's matmuls."""
    n = 512 if smoke else (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps, start = (3 if smoke else 10), time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def flops_per_token(config: ModelConfig, n_params: int) -> float:
    """6N for the weights (forward + backward) plus 12 * layers * dim * seq for attention scores."""
    return 6 * n_params + 12 * config.n_layers * config.dim * config.max_seq_len


def hf_llama(config: ModelConfig):
    """Hugging Face's LlamaForCausalLM with the same sizes (its own random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_config = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.dim,
                            intermediate_size=mlp_hidden_dim(config.dim, config.hidden_dim, config.multiple_of),
                            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                            num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.max_seq_len,
                            rms_norm_eps=config.norm_eps, tie_word_embeddings=True,
                            attn_implementation="sdpa")
    return LlamaForCausalLM(hf_config)


def time_to_loss(args, paths):
    """Train the demo preset on each path for the same budget (args.time_to_loss seconds), with as
    many steps as the measured step time allows; report val losses and bits per character."""
    import json
    import ddp_pretrain
    from eval_model import bits_per_char
    from jsonl import read_jsonl, text_of
    from k_model import load_model
    from pretokenize import pretokenize
    from train_tokenizer import load_tokenizer
    tokenizer, texts = load_tokenizer(args.tokenizer_path), list(read_jsonl(args.val_data_path, text_of))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bin_path = os.path.join(tmp, "train.bin")
        pretokenize(args.data_path, args.tokenizer_path, bin_path, num_proc=2)
        for name, dtype, step_seconds in paths:
            budget = args.time_to_loss
            steps = max(10, int(budget / step_seconds))
            out_dir = os.path.join(tmp, f"run{len(rows)}")
            ddp_pretrain.main(["--preset", "demo", "--tokenizer_path", args.tokenizer_path, "--out_dir", out_dir,
                               "--data_path", args.data_path if name.startswith("chapter") else bin_path,
                               "--val_data_path", args.val_data_path, "--dtype", str(dtype).replace("torch.", ""),
                               "--max_steps", str(steps), "--warmup_iters", str(min(50, steps // 10)),
                               "--eval_interval", str(steps), "--eval_iters", "-1", "--log_interval", str(steps),
                               "--save_interval", str(steps + 1), "--device", args.device])
            with open(os.path.join(out_dir, "metrics.jsonl")) as f:
                metrics = [json.loads(line) for line in f]
            train = [m for m in metrics if "loss" in m][-1]
            val = [m for m in metrics if "val_loss" in m][-1]
            # eval_model's measure, on the trained model: comparable across paths (and tokenizers)
            bpc = bits_per_char(load_model(out_dir), tokenizer, texts)
            rows.append([name, f"{budget:.0f}", steps, f"{train['time']:.0f}", f"{train['loss']:.3f}",
                         f"{val['val_loss']:.3f}", f"{bpc:.3f}"])
    print_table(f"4. time to loss: demo preset, validation on {args.val_data_path}",
                ["path", "budget s", "steps", "train s", "train loss", "val loss", "val bits/char"], rows)


# --sweep: sizes around the demo's, each pretrained for the same --time_to_loss seconds (steps =
# budget / the step time measured first), compared in bits per character. Each variant changes
# SWEEP_BASE (the demo preset before the sweep); tokenizer fields are train_tokenizer.py's.
SWEEP_BASE = dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=256, batch_size=4,
                  learning_rate=2e-3, warmup_iters=100, dtype="auto")
SWEEP_TOKENIZER = dict(vocab_size=6144, split_cjk=True)
SWEEP = [
    {}, dict(split_cjk=False), dict(vocab_size=4096),
    dict(dim=192), dict(dim=384), dict(n_layers=4), dict(n_layers=8),
    dict(batch_size=8), dict(max_seq_len=128, batch_size=8),
    dict(dim=128), dict(dim=192, n_layers=4), dict(dim=128, n_layers=4), dict(dim=192, batch_size=8),
]


def sweep(args):
    """Pretrain each SWEEP variant for args.time_to_loss seconds; print bits per character."""
    import json
    import ddp_pretrain
    from eval_model import bits_per_char
    from jsonl import read_jsonl, text_of
    from k_model import load_model
    from pretokenize import pretokenize
    from train_tokenizer import load_tokenizer, train_tokenizer
    texts = list(read_jsonl(args.val_data_path, text_of))
    rows = []
    chosen = [int(i) for i in args.sweep_only.split(",")] if args.sweep_only else range(len(SWEEP))
    with tempfile.TemporaryDirectory() as tmp:
        for variant in [SWEEP[i] for i in chosen]:
            tok_fields = {**SWEEP_TOKENIZER, **{k: v for k, v in variant.items() if k in SWEEP_TOKENIZER}}
            run = {**SWEEP_BASE, **{k: v for k, v in variant.items() if k not in SWEEP_TOKENIZER}}
            tok_dir = os.path.join(tmp, "tok_{vocab_size}_{split_cjk}".format(**tok_fields))
            if not os.path.isdir(tok_dir):
                train_tokenizer([args.data_path, args.sft_data_path], tok_dir, **tok_fields)
                for name, path in (("train", args.data_path), ("val", args.val_data_path)):
                    pretokenize(path, tok_dir, os.path.join(tok_dir, f"{name}.bin"), num_proc=2)
            config = ModelConfig(vocab_size=tok_fields["vocab_size"],
                                 **{k: run[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")})
            dtype = resolve_dtype(run["dtype"], "cpu")
            torch.manual_seed(0)
            model = Transformer(config)
            (step_seconds, _), = time_steps([make_train_step(model, "cpu", dtype)],
                                            random_batches(config.vocab_size, run["batch_size"], config.max_seq_len, 8),
                                            "cpu", WARMUP_STEPS, 8, rounds=3)
            steps = max(10, int(args.time_to_loss / step_seconds))
            out_dir = os.path.join(tmp, f"run{len(rows)}")
            flags = [f"--{k}={v}" for k, v in run.items() if k != "warmup_iters"]
            ddp_pretrain.main(["--preset", "demo", "--tokenizer_path", tok_dir, "--out_dir", out_dir, *flags,
                               "--data_path", os.path.join(tok_dir, "train.bin"),
                               "--val_data_path", os.path.join(tok_dir, "val.bin"), "--max_steps", str(steps),
                               "--warmup_iters", str(min(run["warmup_iters"], steps // 10)),
                               "--eval_interval", "0", "--log_interval", str(max(1, steps // 4)), "--save_interval", "0"])
            with open(os.path.join(out_dir, "metrics.jsonl")) as f:
                seconds = [json.loads(line) for line in f if '"loss"' in line][-1]["time"]
            bpc = bits_per_char(load_model(out_dir), load_tokenizer(tok_dir), texts)
            name = ", ".join(f"{k}={v}" for k, v in variant.items()) or "base (dim=256, n_layers=6)"
            n_params = count_parameters(model)
            rows.append([name, f"{n_params / 1e6:.1f}M", steps, f"{steps * run['batch_size'] * config.max_seq_len / 1e6:.2f}M",
                         f"{seconds:.0f}", f"{bpc:.3f}"])
            print_table(f"sweep so far ({args.time_to_loss:.0f} s each)", ["variant", "params", "steps", "tokens",
                                                                         "train s", "val bits/char"], rows)
    print_table(f"5. demo size sweep: {args.time_to_loss:.0f} s of pretraining each, bits per character on "
                f"{args.val_data_path}", ["variant", "params", "steps", "tokens", "train s", "val bits/char"], rows)


def print_table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, two timed steps, random tokens")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    parser.add_argument("--steps", type=int, default=TIMED_STEPS, help="timed training steps per path and round")
    parser.add_argument("--data_path", default=DATA_PATH, help="pretraining jsonl for the packed vs padded table")
    parser.add_argument("--tokenizer_path", default=TOKENIZER_PATH, help="directory of the tokenizer")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: on CUDA only")
    parser.add_argument("--time_to_loss", type=float, default=0, help="seconds of training for the chapter's path")
    parser.add_argument("--val_data_path", default=VAL_DATA_PATH, help="held-out jsonl for --time_to_loss")
    parser.add_argument("--sweep", action="store_true", help="only: pretrain the demo preset and its neighbours "
                        "(SWEEP) for --time_to_loss seconds each, and compare bits per character")
    parser.add_argument("--sweep_only", help="comma-separated indices of SWEEP to run (default: all)")
    parser.add_argument("--sft_data_path", default=SFT_DATA_PATH, help="chats the sweep's tokenizers also learn from")
    args = parser.parse_args(argv)
    if args.sweep:
        if not args.time_to_loss:
            parser.error("--sweep needs --time_to_loss SECONDS")
        return sweep(args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    compile_model = args.compile if args.compile is not None else device_type == "cuda"
    warmup, steps = (1, 2) if args.smoke else (WARMUP_STEPS, args.steps)
    bf16 = torch.bfloat16
    torch.manual_seed(0)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    cfg = bench_config(device_type, args.smoke)
    batch_size, seq_len = cfg.pop("batch_size"), cfg["max_seq_len"]
    have_data = os.path.isfile(args.data_path) and os.path.isfile(os.path.join(args.tokenizer_path, "tokenizer.json"))
    vocab_size = 6144
    if have_data:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
        vocab_size = len(tokenizer)
    config = ModelConfig(**cfg, vocab_size=vocab_size)
    n_params = count_parameters(Transformer(config))
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__} | model {n_params / 1e6:.1f}M "
          f"params, dim {config.dim}, {config.n_layers} layers, seq {seq_len}, batch {batch_size}"
          + (", compiled" if compile_model else ""))

    # 1. packed vs padded, on the real corpus
    if have_data:
        from dataset import PackedDataset, PretrainDataset
        from pretokenize import pretokenize
        n_batches = warmup + steps
        padded = loader_batches(PretrainDataset(args.data_path, tokenizer, seq_len), batch_size, n_batches)
        with tempfile.TemporaryDirectory() as tmp:
            bin_path = os.path.join(tmp, "tokens.bin")
            pretokenize(args.data_path, args.tokenizer_path, bin_path, num_proc=2)
            packed = loader_batches(PackedDataset(bin_path, seq_len), batch_size, n_batches)
        paths = (("chapter: padded jsonl, fp32", padded, torch.float32),
                 ("packed tokens, fp32", packed, torch.float32),
                 ("packed tokens, bf16 autocast", packed, bf16))
        timings = time_paths(paths, config, device, compile_model, warmup, steps)
        base = timings[0][1] / timings[0][0]
        rows = [[name, f"{real / (batch_size * seq_len):.0%}", f"{real / sec:,.0f}", f"{real / sec / base:.2f}x"]
                for (name, _, _), (sec, real) in zip(paths, timings)]
        print_table(f"1. real tokens/s on {args.data_path}", ["path", "real tokens", "real tok/s", "vs chapter"], rows)
        step_times = [(name, dtype, sec) for (name, _, dtype), (sec, _) in zip(paths, timings)]
    else:
        print(f"\n1. skipped: no {args.data_path} or {args.tokenizer_path} (bash code/run_demo.sh makes them)")

    # 2. ours vs Hugging Face Llama, same dims, same random batches
    batches = random_batches(vocab_size, batch_size, seq_len, warmup + steps)
    dtype = resolve_dtype("auto", device_type) if device_type == "cuda" else torch.float32
    rows, results = [], {}
    for dtype in ([dtype] if device_type == "cuda" else [torch.float32, bf16]):
        torch.manual_seed(0)
        models = {"Hugging Face LlamaForCausalLM": hf_llama(config).to(device),
                  "Tiny-K Transformer": Transformer(config).to(device)}
        timings = time_steps([make_train_step(m, device, dtype, compile_model) for m in models.values()],
                             batches, device, warmup, steps)
        (hf_sec, _), (ours_sec, _) = timings
        for name, (sec, real) in zip(models, timings):
            results[(name, dtype)] = (sec, real)
            rows.append([name, str(dtype).replace("torch.", ""), f"{sec * 1000:.1f}", f"{real / sec:,.0f}",
                         f"{hf_sec / sec:.2f}x"])
    print_table("2. train step (forward + backward + AdamW), same model size",
                ["model", "dtype", "ms/step", "tok/s", "vs HF"], rows)

    # 3. MFU
    rows = []
    for dtype in ([resolve_dtype("auto", "cuda")] if device_type == "cuda" else [torch.float32, bf16]):
        peak = peak_flops(device, dtype, args.smoke)
        sec, real = results[("Tiny-K Transformer", dtype)]
        achieved = flops_per_token(config, n_params) * real / sec
        rows.append([str(dtype).replace("torch.", ""), f"{peak / 1e9:,.0f}", f"{achieved / 1e9:,.1f}", f"{achieved / peak:.1%}"])
    print_table("3. model FLOP/s vs this machine's matmul peak",
                ["dtype", "peak GFLOP/s", "model GFLOP/s", "MFU"], rows)
    if device_type == "cuda":
        print(f"\npeak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.time_to_loss and have_data:
        time_to_loss(args, step_times)


if __name__ == "__main__":
    sys.exit(main())
