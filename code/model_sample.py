"""从训练好的模型采样（对应第 5.6 节“推理生成”）：续写文本、单轮回答，或多轮对话。

    python code/model_sample.py --mode pretrain --checkpoint output/pretrain
    python code/model_sample.py --mode chat --checkpoint output/sft                # 12 built-in prompts: poems and greetings
    python code/model_sample.py --mode chat --checkpoint output/sft --prompt 你好    # one-shot
    python code/model_sample.py --chat --checkpoint output/sft                     # talk to it (/reset, /exit)

--mode pretrain 看预训练模型会不会续写；--mode chat 看 SFT 后的模型能否按对话模板作答，
并以 <|im_end|> 结束回答；--chat 在终端里多轮对话。
"""
import argparse
import os
import sys

import torch

from cli import HelpFormatter
from k_model import NonFiniteLogitsError, cast_for_inference, check_sampling
# 采样的默认值（温度 0.7、top-k 50、top-p 0.9、重复惩罚 1.1）定义在 model_io.py：serve.py 和导出给 ollama 的
# Modelfile 也用它们；要改全部的默认值就改那里，只改这一次运行就用命令行参数
from model_io import REPETITION_PENALTY, TEMPERATURE, TOP_K, TOP_P, load_tiny_k

# ---- 采样超参数：在这里改默认值；命令行参数（--temperature 等）会覆盖它们 ----
# 它们同时也是 TextGenerator 各方法的默认参数。本脚本没有预设（preset）。
# 温度、top-k、top-p、重复惩罚四个默认值见上面从 model_io 导入的那一行。
CHECKPOINT = "output/sft"   # 默认加载的模型目录：ddp_sft.py 的输出（有监督微调后的模型）
MAX_NEW_TOKENS = 256        # 每个回答最多新生成的 token 数（提示加回答还不能超过 max_seq_len）
SEED = 42                   # 采样随机种子：同样的种子和提示，得到同样的回答
DTYPES = ("float32", "bfloat16", "float16")  # --dtype 可选的推理精度（另有 auto）
# 演示数据预训练的是写成“体裁《题目》”再接正文的诗：一个标题头就是一首诗的开头。
# 预训练模型只会续写，所以 --mode pretrain 用这些开头让它往下写
PRETRAIN_STARTS = ["五言绝句《春晓》\n", "七言绝句《秋夜》\n", "五言律诗《登楼》\n", "七言律诗《送友人》\n", "明月"]
# --mode chat 的 12 条内置提示：6 条写诗的请求，6 条问候与自我介绍（含 2 条英文）
CHAT_PROMPTS = [
    "写一首五言绝句，题目是《春晓》。", "以《秋夜》为题，作一首七绝。", "请写一首五律，题为《登楼》。",
    "写一首七言律诗，诗中要有“月”字。", "写一首藏头诗，用五言绝句，各句开头连起来是“春夏秋冬”。",
    "接着“白日依山尽”往下写，凑成一首五言绝句。",
    "你好", "你叫什么名字?", "你会做什么?", "再见", "Hello", "What is your name?",
]


class StreamDecoder:
    """把陆续生成的 token id 随到随转成文本。字节级 BPE 会把一个汉字拆到好几个 token 里：
    只有当解码出的文本不再以半个字结尾时，才把新文本放出去。"""

    def __init__(self, tokenizer):
        # ids：目前收到的全部 token；emitted：已经输出过的字符数
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        # 每次都把全部 token 重新解码：单独解码半个汉字的字节只会得到乱码
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # 到目前为止末尾是不完整的 UTF-8 字节序列（半个字），先不输出
            return ""
        new, self.emitted = text[self.emitted:], len(text)  # 只返回上次输出之后新增的部分
        return new


class TextGenerator:
    """章节 5.6.2 的 TextGenerator：加载模型和分词器，预训练模型用来续写，SFT 模型用来对话。"""

    def __init__(self, checkpoint_path=CHECKPOINT, tokenizer_path=None, device="auto", compile_decode=False,
                 dtype="auto"):
        """checkpoint_path：Tiny-K 目录或导出的 Hugging Face Llama 目录（也可以是训练检查点文件，
        此时要给 tokenizer_path）；分词器默认用模型旁边一起保存的那个。
        dtype 为 "auto" 时，在 CUDA 上模型以 bf16 运行（GPU 不支持 bf16 时用 fp16），在 CPU 上用 fp32；
        也可以指定 "float32"、"bfloat16" 或 "float16"。compile_decode 会编译解码步
        （CUDA 上用 CUDA graphs；每种批大小档位的第一个回答要等编译完成）。"""
        from train_tokenizer import load_tokenizer
        # 训练检查点（.pt）里只有权重和配置，没有分词器，必须另外指定
        if os.path.isfile(checkpoint_path) and tokenizer_path is None:
            raise ValueError(f"{checkpoint_path} is a training checkpoint, which holds no tokenizer: "
                             "add --tokenizer_path tokenizer_k (the tokenizer it was trained with)")
        # "auto"：有 GPU 就用 cuda，否则用 cpu
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        # 章节在这里把模型的维度重新手写了一遍；目录里的 config.json 已经记着它们。
        # eval()：关掉 dropout，推理时前向是确定的
        self.model = load_tiny_k(checkpoint_path).to(self.device).eval()
        if dtype == "auto" and self.model.device.type == "cuda":
            # 推理改用半精度：权重和 KV cache 减半，解码更快；bf16 的数值范围与 fp32 相同，优先用它。
            # fp16 最大只到 65504，前向可能上溢（生成时报 NonFiniteLogitsError），那时改用 --dtype float32
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            dtype = "bfloat16" if bf16 else "float16"
        if dtype != "auto":  # CPU 上的 auto：保持加载时的精度（fp32）
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
            if self.model.dtype != getattr(torch, dtype):
                self.model = cast_for_inference(self.model, getattr(torch, dtype))
        self.compile_decode = compile_decode
        self.tokenizer = load_tokenizer(tokenizer_path or checkpoint_path)
        # SFT 数据里每个回答都以 <|im_end|> 结束，所以对话生成到它就停（章节的 chat 停在 eos）
        self.im_end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.max_seq_len = self.model.config.max_seq_len  # 上下文窗口：提示加回答不能超过它

    # ---- 构造提示：套用对话模板

    def chat_prompt_ids(self, prompt, history=None, max_new_tokens=MAX_NEW_TOKENS):
        """到目前为止的对话加上新的用户轮次，套用对话模板后的 token id，正好等着模型写回答。

        如果在 max_seq_len 之内给 max_new_tokens 留不出位置，就丢掉最旧的轮次（system 提示保留）；
        只剩一轮仍然太长的，拒绝。
        """
        history = list(history or [])
        # 只有第一条消息可能是 system 提示；没有时，对话模板会插入与 SFT 训练时相同的那条
        system = [m for m in history[:1] if m["role"] == "system"]
        turns = history[len(system):] + [{"role": "user", "content": prompt}]
        # 提示最多可用的长度：给回答预留 max_new_tokens，但最多预留半个窗口，免得把历史全挤掉
        budget = self.max_seq_len - min(max_new_tokens, self.max_seq_len // 2)
        while True:
            # add_generation_prompt=True：末尾接上 "<|im_start|>assistant\n"，模型接着写的就是回答
            text = self.tokenizer.apply_chat_template(system + turns, tokenize=False, add_generation_prompt=True)
            # 模板里已经带了特殊 token，不再额外加 <s>
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= budget or len(turns) == 1:  # 放得下了，或者只剩这一轮、没得可删
                break
            turns = turns[2:] if len(turns) > 2 else turns[1:]  # 丢掉最旧的一对 user/assistant 消息
        if len(ids) >= self.max_seq_len:  # 一轮就填满了上下文窗口，没有位置写回答
            raise ValueError(f"the message is {len(ids)} tokens long; this model reads at most {self.max_seq_len}")
        return ids

    def _sampling(self, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed):
        # 打包成 model.generate 的采样参数。每一步的采样（k_model.sample_next_token）依次是：
        # 重复惩罚 → 除以温度 → top-k 过滤 → top-p 过滤 → 按 softmax 概率抽一个 token；
        # 温度为 0 时直接取概率最大的 token，即贪心解码
        return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, seed=seed, compile_decode=self.compile_decode)

    def _generate(self, input_ids, stop_id, **sampling):
        idx = torch.tensor([input_ids], dtype=torch.long, device=self.device)  # batch 为 1
        # generate 默认用 KV cache：提示只前向一次，之后每步只算新 token（章节的循环每步重算整个序列）；
        # 只返回新生成的 token，不含停止符本身
        out = self.model.generate(idx, stop_id=stop_id, **sampling)[0]
        # 比上限短，说明是遇到 stop_id 停下的，而不是用完了 max_new_tokens 或上下文窗口
        stopped = len(out) < min(sampling["max_new_tokens"], self.max_seq_len - len(input_ids))
        return self.tokenizer.decode(out.tolist(), skip_special_tokens=True), stopped

    # ---- 章节里的两种用法：预训练模型续写，SFT 模型对话

    def pretrain_sample(self, start, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_k=TOP_K,
                        top_p=TOP_P, repetition_penalty=REPETITION_PENALTY, seed=SEED):
        """像预训练模型续写一篇文档那样接着 `start` 往下写；遇到 </s> 停止。"""
        # 预训练时每篇文档以 <s> 开头、以 </s> 结尾，这里同样先加 <s>，让模型处在“文档开头”
        input_ids = [self.tokenizer.bos_token_id] + self.tokenizer(start, add_special_tokens=False)["input_ids"]
        input_ids = input_ids[-(self.max_seq_len - 1):]  # 太长只留结尾，至少给生成留一个位置
        text, _ = self._generate(input_ids, self.tokenizer.eos_token_id,
                                 **self._sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed))
        return text

    def chat(self, prompt, history=None, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_k=TOP_K,
             top_p=TOP_P, repetition_penalty=REPETITION_PENALTY, seed=SEED, return_stopped=False):
        """在 `history`（{"role", "content"} 字典的列表）之后回答 `prompt`；遇到 <|im_end|> 停止。

        对话模板会加上与 SFT 训练时相同的 system 提示。return_stopped=True 时还返回
        回答是否以 <|im_end|> 正常结束。
        """
        sampling = self._sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
        answer, stopped = self._generate(self.chat_prompt_ids(prompt, history, max_new_tokens), self.im_end_id,
                                         **sampling)
        answer = answer.strip()
        return (answer, stopped) if return_stopped else answer

    def chat_stream(self, prompt, history=None, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE,
                    top_k=TOP_K, top_p=TOP_P, repetition_penalty=REPETITION_PENALTY, seed=SEED):
        """流式的 chat()：token 一边生成，一边一段段地产出文本。"""
        idx = torch.tensor([self.chat_prompt_ids(prompt, history, max_new_tokens)], device=self.device)
        decoder = StreamDecoder(self.tokenizer)
        # generate_stream 借助 KV cache 每步只算一个新 token，每生成一个就交出一列 (batch, 1)
        for column in self.model.generate_stream(
                idx, stop_id=self.im_end_id,
                **self._sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)):
            piece = decoder.push(int(column[0, 0]))
            if piece:  # 凑齐完整的字才输出
                yield piece

    def chat_batch(self, prompts, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_k=TOP_K,
                   top_p=TOP_P, repetition_penalty=REPETITION_PENALTY, seed=SEED):
        """把几个提示放进同一批一起回答（各自不带历史）；每一行在自己的 <|im_end|> 处停止。"""
        rows = [self.chat_prompt_ids(p, None, max_new_tokens) for p in prompts]
        texts, _ = self.generate_batch(rows, self.im_end_id, **self._sampling(
            max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed))
        return texts

    def generate_batch(self, rows, stop_id, **sampling):
        """把几个提示（token id 列表）左填充后在同一批里生成，返回 (texts, stopped)。某一行生成了
        stop_id，或者生成提前结束（每一行都已停止），这一行就算已停止。"""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        # 左填充：各行最后一个 token 对齐，新 token 都接在同一列上
        idx = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        # 填充位置为 0，注意力不看它们
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        out = self.model.generate(idx, stop_id=stop_id, attention_mask=attention_mask, **sampling).tolist()
        # 比上限短，说明整批提前结束了：每一行都已遇到 stop_id
        cut_short = len(out[0]) < min(sampling["max_new_tokens"], self.max_seq_len - width)
        texts, stopped = [], []
        for row in out:
            # 先停下的行在 stop_id 之后也用 stop_id 补齐，截到第一个 stop_id 为止
            end = row.index(stop_id) if stop_id in row else len(row)
            texts.append(self.tokenizer.decode(row[:end], skip_special_tokens=True).strip())
            stopped.append(end < len(row) or cut_short)
        return texts, stopped


def interactive_chat(generator: TextGenerator, sampling: dict, stdin=sys.stdin):
    """终端上的多轮对话：保留历史，/reset 清空历史，/exit（或输入结束）退出。"""
    history = []
    print("Tiny-K chat. /reset starts over, /exit quits.", flush=True)
    while True:
        print("user> ", end="", flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":  # readline 返回空串即输入结束（如 Ctrl-D）
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
        except (ValueError, NonFiniteLogitsError) as e:  # 例如消息太长、fp16 上溢：显示原因，对话继续
            print(f"[{e}]", flush=True)
            continue
        print(flush=True)
        # 这一轮记入历史，下一轮的提示会带上它，模型才“记得”前文
        history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": "".join(pieces).strip()}]


def main(argv=None):
    """命令行入口：--chat 进入终端对话；否则按 --mode 续写或回答内置（或 --prompt 给出的）提示。"""
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
    parser.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto",
                        help="inference precision; auto = bfloat16 on CUDA (float16 where bf16 is missing), "
                             "float32 on CPU")
    args = parser.parse_args(argv)
    try:
        # 先检查采样参数再加载模型：参数写错时立刻报错，不必等模型加载完
        check_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
        generator = TextGenerator(args.checkpoint, args.tokenizer_path, args.device, args.compile_decode, args.dtype)
    except (FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    # 命令行给出的采样参数，每次生成都用它们
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)

    if args.chat:
        interactive_chat(generator, sampling)
        return
    if args.mode == "pretrain":
        for start in args.prompt or PRETRAIN_STARTS:
            # 方括号里是起始文本，后面是起始文本接上模型的续写
            print(f"[{start}] {start}{generator.pretrain_sample(start, **sampling)}\n")
        return
    # 统计多少回答以 <|im_end|> 正常结束：看 SFT 是否教会了模型结束回答
    n_stopped = 0
    prompts = args.prompt or CHAT_PROMPTS
    for prompt in prompts:
        answer, stopped = generator.chat(prompt, return_stopped=True, **sampling)
        n_stopped += stopped
        print(f"user: {prompt}\nassistant: {answer}" + ("" if stopped else "  [no <|im_end|>: hit max_new_tokens]"))
    print(f"\n{n_stopped}/{len(prompts)} answers ended with <|im_end|>")


if __name__ == "__main__":
    main()
