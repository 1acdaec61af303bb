"""Sample from a trained model (chapter 5.6): text continuation or chat.

    python code/model_sample.py --mode pretrain --checkpoint output/pretrain
    python code/model_sample.py --mode chat --checkpoint output/sft
    python code/model_sample.py --mode chat --checkpoint output/sft --prompt 你好
"""
import argparse
import os
import sys

import torch

from k_model import load_model

# ---- hyperparameters (CLI flags override) ----
CHECKPOINT = "output/sft"
MAX_NEW_TOKENS = 256
TEMPERATURE = 0.7
TOP_K = 50
SEED = 42
PRETRAIN_STARTS = ["中国", "新华社北京１月１日电", "经济", "今天是", "北京"]
CHAT_PROMPTS = [
    "你好", "你好吗?", "嗨，最近如何?", "很高兴见到你.", "你叫什么名字?",
    "你是谁?", "什么是ai", "你会做什么?", "你喜欢什么?", "再见",
    "Hello", "Hi, how are you?", "What is your name?", "Good morning", "Nice to meet you.",
    "What is AI?", "Do you like music?", "Tell me a joke", "Who are you?", "Goodbye",
]


class TextGenerator:
    def __init__(self, checkpoint_path=CHECKPOINT, tokenizer_path=None, device="auto"):
        """checkpoint_path: a save_pretrained directory; the tokenizer defaults to the one saved beside it."""
        from ddp_pretrain import load_tokenizer
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        # the chapter re-typed the model's dims here; the directory's config.json knows them
        self.model = load_model(checkpoint_path).to(self.device).eval()
        self.tokenizer = load_tokenizer(tokenizer_path or checkpoint_path)
        self.im_end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def _generate(self, input_ids, stop_id, max_new_tokens, temperature, top_k, seed):
        if seed is not None:
            torch.manual_seed(seed)
        idx = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        out = self.model.generate(idx, stop_id=stop_id, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_k=top_k)[0]
        stopped = len(out) < max_new_tokens  # generate returns early only at stop_id
        return self.tokenizer.decode(out.tolist(), skip_special_tokens=True), stopped

    def pretrain_sample(self, start, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_k=TOP_K,
                        seed=SEED):
        """Continue `start` as the pretrained model would a document; stop at </s>."""
        input_ids = [self.tokenizer.bos_token_id] + self.tokenizer(start, add_special_tokens=False)["input_ids"]
        text, _ = self._generate(input_ids, self.tokenizer.eos_token_id, max_new_tokens, temperature, top_k, seed)
        return text

    def chat(self, prompt, history=None, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_k=TOP_K,
             seed=SEED, return_stopped=False):
        """Answer `prompt` after `history` (a list of {"role", "content"}); stop at <|im_end|>.

        The chat template adds the same system prompt that SFT trained with.
        """
        messages = list(history or []) + [{"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        input_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        answer, stopped = self._generate(input_ids, self.im_end_id, max_new_tokens, temperature, top_k, seed)
        answer = answer.strip()
        return (answer, stopped) if return_stopped else answer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["pretrain", "chat"], default="chat")
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="a save_pretrained model directory")
    parser.add_argument("--tokenizer_path", default=None, help="default: the tokenizer saved in --checkpoint")
    parser.add_argument("--prompt", action="append", help="prompt or start text (repeatable); default: built-in examples")
    parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--temperature", type=float, default=TEMPERATURE)
    parser.add_argument("--top_k", type=int, default=TOP_K)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        generator = TextGenerator(args.checkpoint, args.tokenizer_path, args.device)
    except (FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    seed=args.seed)

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
