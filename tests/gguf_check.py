"""Run the GGUF export in llama.cpp (through llama-cpp-python) and compare it with transformers.

Not part of the pytest suite: it needs llama-cpp-python, which pip builds from source (llama.cpp
with CMake and a C++ compiler; a few minutes, ~10 on one core):

    pip install llama-cpp-python      # CMAKE_BUILD_PARALLEL_LEVEL=1 keeps a small machine usable
    python tests/gguf_check.py --checkpoint output/sft [--out_dir output/gguf_check]

It exports --checkpoint as a Hugging Face Llama and as GGUF f32, f16 and q8_0, then for each GGUF:

tokenizer   llama.cpp's tokenizer (gpt2 model, gpt-2 pre-tokenizer) gives the Hugging Face ids
            for the chat prompts, special tokens included
greedy      greedy tokens of llama.cpp == transformers on the export, from every prompt (poem
            starts after <s>, chat prompts); tokens equal = all of them, else the first mismatch
chat        create_chat_completion with the chat template inside the GGUF: the prompt it renders
            is the tokenizer's, and the answer stops at <|im_end|> (eos), as transformers' does;
            llama.cpp's end-of-generation tokens are exactly <|im_end|> and </s>
tokens/s    llama.cpp's greedy decoding speed (prompt not counted), --threads threads

A trained model is needed (a random one does not end its answers). Exit 0: f32 matches in every
token and every chat answer stops; f16 and q8_0 are reported, rounding may change a later token.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "code"))

from cli import HelpFormatter  # noqa: E402

CHECKPOINT = "output/sft"
OUT_DIR = "output/gguf_check"
N_TOKENS = 48  # greedy tokens per prompt
MAX_CHAT_TOKENS = 120  # a chat answer longer than this did not stop (a 七律 is ~70 tokens)
THREADS = 1
PROMPTS = ["五言绝句《春晓》\n", "七言律诗《秋夜》\n", "明月"]  # continued after <s>, as pretraining reads them
CHAT = ["写一首五言绝句，题目是《春晓》。", "以《秋夜》为题，作一首七绝。", "你好", "你叫什么名字?"]


def hf_greedy(model, ids, n, stop=None):
    import torch
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=stop,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


def llama_greedy(llm, ids, n):
    """n greedy tokens after ids, and the seconds the n - 1 after the first took (decode only)."""
    tokens, start = [], None
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        if start is None:  # the first token comes after the prompt's evaluation
            start = time.perf_counter()
        if len(tokens) == n:
            break
    return tokens, time.perf_counter() - start


def first_mismatch(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def check(llm, hf, tokenizer, args) -> dict:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    chats = [[{"role": "user", "content": q}] for q in CHAT]
    rendered = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    result = {"tokenizer_equal": all(
        llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) ==
        tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered)}

    prompts = [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    prompts += [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    mismatches, n_new, seconds = [], 0, 0.0
    for ids in prompts:
        ours, took = llama_greedy(llm, ids, args.n_tokens)
        mismatches.append(first_mismatch(ours, hf_greedy(hf, ids, args.n_tokens)))
        n_new, seconds = n_new + len(ours) - 1, seconds + took
    result["greedy_tokens_equal"] = all(m is None for m in mismatches)
    result["first_mismatch"] = mismatches  # per prompt: None, or the index of the first different token
    result["tokens_per_s"] = round(n_new / seconds, 1)

    template = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="<s>")
    result["chat_prompt_equal"] = all(formatter(messages=c).prompt == r for c, r in zip(chats, rendered))
    result["eos_is_im_end"] = llm.token_eos() == im_end
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eog = [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    result["end_of_generation"] = tokenizer.convert_ids_to_tokens(eog)
    stops, answers_equal, contents = [], [], []
    for chat, text in zip(chats, rendered):
        answer = llm.create_chat_completion(messages=chat, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                            max_tokens=args.max_chat_tokens)
        choice = answer["choices"][0]
        stops.append(choice["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] < args.max_chat_tokens)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        reference = hf_greedy(hf, ids, args.max_chat_tokens, stop=[im_end, tokenizer.eos_token_id])
        contents.append(choice["message"]["content"])
        answers_equal.append(tokenizer.decode(reference, skip_special_tokens=True) == contents[-1])
    result["chat_stops_at_im_end"] = all(stops)
    result["chat_answers_equal"] = answers_equal
    result["example"] = {"user": CHAT[0], "assistant": contents[0]}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="a trained Tiny-K model directory (with its tokenizer)")
    parser.add_argument("--out_dir", default=OUT_DIR, help="where the exports and gguf_check.json go")
    parser.add_argument("--n_tokens", type=int, default=N_TOKENS, help="greedy tokens compared per prompt")
    parser.add_argument("--max_chat_tokens", type=int, default=MAX_CHAT_TOKENS,
                        help="a chat answer longer than this did not stop")
    parser.add_argument("--threads", type=int, default=THREADS, help="llama.cpp's CPU threads")
    args = parser.parse_args(argv)
    try:
        from llama_cpp import Llama
    except ModuleNotFoundError:
        sys.exit("error: this check needs llama-cpp-python: pip install llama-cpp-python")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import export_model
    hf_dir = os.path.join(args.out_dir, "hf")
    export_model.main(["--checkpoint", args.checkpoint, "--save_dir", hf_dir])
    torch.set_num_threads(args.threads)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)

    results = {}
    for outtype in export_model.GGUF_TYPES:
        path = os.path.join(args.out_dir, f"tiny-k-{outtype}.gguf")
        export_model.main(["--checkpoint", args.checkpoint, "--gguf", path, "--outtype", outtype])
        llm = Llama(model_path=path, n_ctx=hf.config.max_position_embeddings, n_threads=args.threads,
                    n_batch=hf.config.max_position_embeddings, verbose=False)
        results[outtype] = {"MiB": round(os.path.getsize(path) / 2**20, 1), **check(llm, hf, tokenizer, args)}
        print(outtype, json.dumps(results[outtype], ensure_ascii=False))
        del llm
    with open(os.path.join(args.out_dir, "gguf_check.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=1)

    print(f"\n{'outtype':8} {'MiB':>5} {'tokenizer':>9} {'greedy':>7} {'chat prompt':>11} {'stops':>6} "
          f"{'answers':>8} {'tokens/s':>8}")
    for outtype, r in results.items():
        print(f"{outtype:8} {r['MiB']:5.1f} {str(r['tokenizer_equal']):>9} {str(r['greedy_tokens_equal']):>7} "
              f"{str(r['chat_prompt_equal']):>11} {str(r['chat_stops_at_im_end']):>6} "
              f"{sum(r['chat_answers_equal'])}/{len(r['chat_answers_equal']):<6} {r['tokens_per_s']:8.1f}")
    f32 = results["f32"]
    ok = all(f32[k] for k in ("tokenizer_equal", "greedy_tokens_equal", "chat_prompt_equal", "eos_is_im_end",
                              "chat_stops_at_im_end")) and all(f32["chat_answers_equal"])
    ok = ok and all(r["chat_stops_at_im_end"] and r["tokenizer_equal"] and
                    sorted(r["end_of_generation"]) == ["</s>", "<|im_end|>"] for r in results.values())
    print("passed" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
