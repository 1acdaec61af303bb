"""Sample from a trained model (chapter 5.6): text continuation, one-shot answers, or a chat.

    python code/model_sample.py --mode pretrain --checkpoint output/pretrain
    python code/model_sample.py --mode chat --checkpoint output/sft                # 12 built-in prompts: poems and greetings
    python code/model_sample.py --mode chat --checkpoint output/sft --prompt 你好    # one-shot
    python code/model_sample.py --chat --checkpoint output/sft                     # talk to it (/reset, /exit)
"""
import argparse
import os
import sys

import torch

from cli import HelpFormatter
from export_model import load_tiny_k
from k_model import cast_for_inference, check_sampling

# ---- hyperparameters (CLI flags override) ----
CHECKPOINT = "output/sft"
MAX_NEW_TOKENS = 256
TEMPERATURE = 0.7
TOP_K = 50
TOP_P = 0.9
REPETITION_PENALTY = 1.1
SEED = 42
# the demo pretrains on poems written as "form《title》" then the body: a header starts a poem
PRETRAIN_STARTS = ["五言绝句《春晓》\n", "七言绝句《秋夜》\n", "五言律诗《登楼》\n", "七言律诗《送友人》\n", "明月"]
CHAT_PROMPTS = [
    "写一首五言绝句，题目是《春晓》。", "以《秋夜》为题，作一首七绝。", "请写一首五律，题为《登楼》。",
    "写一首七言律诗，诗中要有“月”字。", "写一首藏头诗，用五言绝句，各句开头连起来是“春夏秋冬”。",
    "接着“白日依山尽”往下写，凑成一首五言绝句。",
    "你好", "你叫什么名字?", "你会做什么?", "再见", "Hello", "What is your name?",
]


class StreamDecoder:
    """Turns token ids into text as they come. Byte-level BPE splits a Chinese character
    over several tokens: text is only released once it no longer ends in half a character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new


class TextGenerator:
    def __init__(self, checkpoint_path=CHECKPOINT, tokenizer_path=None, device="auto", compile_decode=False):
        """checkpoint_path: a Tiny-K or exported Hugging Face Llama directory (or a training checkpoint
        file, with tokenizer_path); the tokenizer defaults to the one saved beside the model.
        On CUDA the model runs in bf16 (fp16 where the GPU lacks bf16); compile_decode compiles
        the decode step (CUDA graphs on CUDA; the first answer waits for the compilation)."""
        from train_tokenizer import load_tokenizer
        if os.path.isfile(checkpoint_path) and tokenizer_path is None:
            raise ValueError(f"{checkpoint_path} is a training checkpoint, which holds no tokenizer: "
                             "add --tokenizer_path tokenizer_k (the tokenizer it was trained with)")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        # the chapter re-typed the model's dims here; the directory's config.json knows them
        self.model = load_tiny_k(checkpoint_path).to(self.device).eval()
        if self.model.device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            self.model = cast_for_inference(self.model, torch.bfloat16 if bf16 else torch.float16)
        self.compile_decode = compile_decode
        self.tokenizer = load_tokenizer(tokenizer_path or checkpoint_path)
        self.im_end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.max_seq_len = self.model.config.max_seq_len

    # ---- building prompts

    def chat_prompt_ids(self, prompt, history=None, max_new_tokens=MAX_NEW_TOKENS):
        """Token ids of the chat so far plus the new user turn, ready for the answer.

        When it does not leave room for max_new_tokens within max_seq_len, the oldest turns are
        dropped (the system prompt stays); a single turn that is still too long is refused.
        """
        history = list(history or [])
        system = [m for m in history[:1] if m["role"] == "system"]
        turns = history[len(system):] + [{"role": "user", "content": prompt}]
        budget = self.max_seq_len - min(max_new_tokens, self.max_seq_len // 2)
        while True:
            text = self.tokenizer.apply_chat_template(system + turns, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= budget or len(turns) == 1:
                break
            turns = turns[2:] if len(turns) > 2 else turns[1:]  # drop the oldest user/assistant pair
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"the message is {len(ids)} tokens long; this model reads at most {self.max_seq_len}")
        return ids

    def _sampling(self, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed):
        return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, seed=seed, compile_decode=self.compile_decode)

    def _generate(self, input_ids, stop_id, **sampling):
        idx = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        out = self.model.generate(idx, stop_id=stop_id, **sampling)[0]
        stopped = len(out) < min(sampling["max_new_tokens"], self.max_seq_len - len(input_ids))
        return self.tokenizer.decode(out.tolist(), skip_special_tokens=True), stopped

    # ---- the chapter's two uses

    def pretrain_sample(self, start, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_k=TOP_K,
                        top_p=TOP_P, repetition_penalty=REPETITION_PENALTY, seed=SEED):
        """Continue `start` as the pretrained model would a document; stop at </s>."""
        input_ids = [self.tokenizer.bos_token_id] + self.tokenizer(start, add_special_tokens=False)["input_ids"]
        input_ids = input_ids[-(self.max_seq_len - 1):]
        text, _ = self._generate(input_ids, self.tokenizer.eos_token_id,
                                 **self._sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed))
        return text

    def chat(self, prompt, history=None, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_k=TOP_K,
             top_p=TOP_P, repetition_penalty=REPETITION_PENALTY, seed=SEED, return_stopped=False):
        """Answer `prompt` after `history` (a list of {"role", "content"}); stop at <|im_end|>.

        The chat template adds the same system prompt that SFT trained with.
        """
        sampling = self._sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
        answer, stopped = self._generate(self.chat_prompt_ids(prompt, history, max_new_tokens), self.im_end_id,
                                         **sampling)
        answer = answer.strip()
        return (answer, stopped) if return_stopped else answer

    def chat_stream(self, prompt, history=None, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE,
                    top_k=TOP_K, top_p=TOP_P, repetition_penalty=REPETITION_PENALTY, seed=SEED):
        """chat(), yielding pieces of text as the tokens come."""
        idx = torch.tensor([self.chat_prompt_ids(prompt, history, max_new_tokens)], device=self.device)
        decoder = StreamDecoder(self.tokenizer)
        for column in self.model.generate_stream(
                idx, stop_id=self.im_end_id,
                **self._sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)):
            piece = decoder.push(int(column[0, 0]))
            if piece:
                yield piece

    def chat_batch(self, prompts, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_k=TOP_K,
                   top_p=TOP_P, repetition_penalty=REPETITION_PENALTY, seed=SEED):
        """Answer several prompts in one batch; each row stops at its own <|im_end|>."""
        rows = [self.chat_prompt_ids(p, None, max_new_tokens) for p in prompts]
        texts, _ = self.generate_batch(rows, self.im_end_id, **self._sampling(
            max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed))
        return texts

    def generate_batch(self, rows, stop_id, **sampling):
        """(texts, stopped) of several prompts (token ids) generated in one batch, left-padded. A row
        stopped if it made stop_id, or if generation ended early (every row had stopped)."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        idx = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        out = self.model.generate(idx, stop_id=stop_id, attention_mask=attention_mask, **sampling).tolist()
        cut_short = len(out[0]) < min(sampling["max_new_tokens"], self.max_seq_len - width)
        texts, stopped = [], []
        for row in out:
            end = row.index(stop_id) if stop_id in row else len(row)
            texts.append(self.tokenizer.decode(row[:end], skip_special_tokens=True).strip())
            stopped.append(end < len(row) or cut_short)
        return texts, stopped


def interactive_chat(generator: TextGenerator, sampling: dict, stdin=sys.stdin):
    """A multi-turn chat on the terminal: history kept, /reset forgets it, /exit (or end of input) quits."""
    history = []
    print("Tiny-K chat. /reset starts over, /exit quits.", flush=True)
    while True:
        print("user> ", end="", flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            print()
            return
        prompt = line.strip()
        if not prompt:
            continue
        if prompt == "/reset":
            history = []
            print("(history cleared)", flush=True)
            continue
        print("assistant> ", end="", flush=True)
        pieces = []
        try:
            for piece in generator.chat_stream(prompt, history, **sampling):
                pieces.append(piece)
                print(piece, end="", flush=True)
        except ValueError as e:
            print(f"[{e}]", flush=True)
            continue
        print(flush=True)
        history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": "".join(pieces).strip()}]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--mode", choices=["pretrain", "chat"], default="chat", help="pretrain: continue texts (poem openings); chat: answer prompts")
    parser.add_argument("--chat", action="store_true", help="interactive multi-turn chat on the terminal")
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="a Tiny-K or exported Hugging Face model directory, "
                        "or a training checkpoint .pt (with --tokenizer_path)")
    parser.add_argument("--tokenizer_path", default=None,
                        help="the tokenizer directory (default: the one saved in --checkpoint)")
    parser.add_argument("--prompt", action="append",
                        help="prompt or start text, repeatable (default: the built-in examples)")
    parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS, help="the most tokens to generate per answer")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE, help="sampling temperature, >= 0; 0 = greedy")
    parser.add_argument("--top_k", type=int, default=TOP_K, help="sample among the k most likely tokens; 0 = off")
    parser.add_argument("--top_p", type=float, default=TOP_P,
                        help="nucleus sampling: keep the most likely tokens up to this probability, in (0, 1]; 1.0 = off")
    parser.add_argument("--repetition_penalty", type=float, default=REPETITION_PENALTY,
                        help="divide the logits of tokens already present by this, > 0; 1.0 = off")
    parser.add_argument("--seed", type=int, default=SEED, help="sampling seed (the same seed, the same answer)")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    parser.add_argument("--compile_decode", action="store_true",
                        help="torch.compile the decode step (CUDA graphs on CUDA); worth it for long answers on a GPU")
    args = parser.parse_args(argv)
    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
        generator = TextGenerator(args.checkpoint, args.tokenizer_path, args.device, args.compile_decode)
    except (FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)

    if args.chat:
        interactive_chat(generator, sampling)
        return
    if args.mode == "pretrain":
        for start in args.prompt or PRETRAIN_STARTS:
            print(f"[{start}] {start}{generator.pretrain_sample(start, **sampling)}\n")
        return
    n_stopped = 0
    prompts = args.prompt or CHAT_PROMPTS
    for prompt in prompts:
        answer, stopped = generator.chat(prompt, return_stopped=True, **sampling)
        n_stopped += stopped
        print(f"user: {prompt}\nassistant: {answer}" + ("" if stopped else "  [no <|im_end|>: hit max_new_tokens]"))
    print(f"\n{n_stopped}/{len(prompts)} answers ended with <|im_end|>")


if __name__ == "__main__":
    main()
