"""Export a Tiny-K model as a standard Hugging Face Llama, and import one back.

    python code/export_model.py --checkpoint output/sft --tokenizer_path tokenizer_k --save_dir output/hf
    python code/export_model.py --checkpoint output/pretrain/checkpoints/step_00000500.pt --tokenizer_path tokenizer_k
    python code/export_model.py --to_tiny_k --checkpoint output/hf --save_dir output/from_hf
    python code/export_model.py --checkpoint output/sft --gguf output/tiny-k.gguf --outtype q8_0

The export is a LlamaForCausalLM directory (config.json, model.safetensors, the tokenizer with
its chat template, generation_config.json that stops at <|im_end|>) that loads with
AutoModelForCausalLM.from_pretrained, without trust_remote_code, and gives the same logits.

With --gguf it writes instead one GGUF file for llama.cpp and ollama (architecture "llama",
the byte-level BPE tokenizer as "gpt2", the chat template inside) and an ollama Modelfile
beside it. The GGUF holds no output.weight: llama.cpp's llama architecture then reads the
output layer from token_embd, which is the tie Tiny-K has.
"""
import argparse
import json
import os
import shutil
import sys

import torch

from cli import HelpFormatter
from k_model import ModelConfig, Transformer, mlp_hidden_dim
from model_io import (REPETITION_PENALTY, TEMPERATURE, TOP_K, TOP_P, check_all_set, interleaved_to_halves,
                      load_tiny_k, name_map, remap, to_tiny_k)

# ---- hyperparameters (CLI flags override) ----
CHECKPOINT = "output/sft"
SAVE_DIR = "output/hf"
OUTTYPE = "f16"  # GGUF: f32 (exact), f16 (half the size), q8_0 (a quarter, 8-bit blocks of 32 weights)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def llama_config(config: ModelConfig, tokenizer=None):
    from transformers import LlamaConfig
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if tokenizer is not None else None
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim,
        intermediate_size=mlp_hidden_dim(config.dim, config.hidden_dim, config.multiple_of),
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads or config.n_heads, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
        eos_token_id=[im_end, config.eos_token_id] if im_end is not None else config.eos_token_id)


def to_llama(model: Transformer, tokenizer=None):
    """A LlamaForCausalLM with the same weights (q/k rows reordered for its RoPE layout)."""
    from transformers import LlamaForCausalLM
    config = model.config
    weights = remap(model.state_dict(), name_map(config.n_layers), interleaved_to_halves, config.n_heads,
                    config.n_kv_heads or config.n_heads)
    llama = LlamaForCausalLM(llama_config(config, tokenizer))
    llama.load_state_dict(weights, strict=False)  # lm_head is tied to embed_tokens
    llama.tie_weights()
    check_all_set(llama, weights)
    return llama.eval()


def export(checkpoint: str, tokenizer_path: str, save_dir: str):
    from transformers import GenerationConfig
    from train_tokenizer import load_tokenizer
    model = load_tiny_k(checkpoint)
    tokenizer = load_tokenizer(tokenizer_path)
    llama = to_llama(model, tokenizer)
    llama.save_pretrained(save_dir)  # config.json + model.safetensors
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[im_end, tokenizer.eos_token_id],
                     pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.7, top_p=0.9,
                     top_k=50).save_pretrained(save_dir)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer_path, name)):
            shutil.copy(os.path.join(tokenizer_path, name), save_dir)
    print(f"exported {checkpoint} as a Hugging Face LlamaForCausalLM to {save_dir}")


def import_llama(checkpoint: str, save_dir: str):
    from transformers import AutoModelForCausalLM
    model = to_tiny_k(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32))
    model.save_pretrained(save_dir)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(checkpoint, name)):
            shutil.copy(os.path.join(checkpoint, name), save_dir)
    print(f"imported {checkpoint} as a Tiny-K model to {save_dir}")


# ---------------------------------------------------------------- GGUF: llama.cpp and ollama

GGUF_TYPES = ("f32", "f16", "q8_0")
# GGUF name of each Hugging Face weight in llama.cpp's "llama" architecture (blk.N. for layer N)
GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight"""
    base = hf_name.removesuffix(".weight")
    if base in GGUF_NAMES:
        return GGUF_NAMES[base] + ".weight"
    _, _, layer, rest = base.split(".", 3)  # "model", "layers", "3", "self_attn.q_proj"
    return f"blk.{layer}.{GGUF_NAMES[rest]}.weight"


def gguf_tensor(w: torch.Tensor, outtype: str):
    """(data, GGML type) the way llama.cpp's converter chooses: norm weights (1-D) stay f32 in
    every outtype; q8_0 needs rows made of whole blocks of 32 weights, else the tensor is f16."""
    import gguf
    from gguf import GGMLQuantizationType as T
    w = w.detach().float().numpy()
    if w.ndim == 1 or outtype == "f32":
        return w, T.F32
    if outtype == "q8_0":
        try:
            return gguf.quants.quantize(w, T.Q8_0), T.Q8_0
        except gguf.QuantError:  # a row length that is not a multiple of 32
            pass
    return w.astype("float16"), T.F16


def gguf_vocab(tokenizer, tokenizer_path: str, vocab_size: int):
    """Tokens in id order, their types (special tokens are "control": llama.cpp hides them in the
    text it prints and matches them in a prompt only when asked to), and the BPE merges."""
    from gguf import TokenType
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise ValueError(f"{tokenizer_path}: the tokenizer has {len(by_id)} tokens, the model only {vocab_size}")
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows no token uses: a placeholder llama.cpp never produces
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    with open(os.path.join(tokenizer_path, "tokenizer.json"), encoding="utf-8") as f:
        merges = json.load(f)["model"]["merges"]
    # tokenizers writes a merge as ["a", "b"] (older versions: "a b"); GGUF stores "a b"
    return tokens, types, [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_gguf(model: Transformer, tokenizer, tokenizer_path: str, path: str, outtype: str) -> dict:
    """The GGUF file; returns how many tensors of each type it holds."""
    import gguf
    c = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("Tiny-K")
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_seq_len)  # RoPE positions past training were never seen
    writer.add_embedding_length(c.dim)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(mlp_hidden_dim(c.dim, c.hidden_dim, c.multiple_of))
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads or c.n_heads)
    writer.add_rope_dimension_count(c.dim // c.n_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)

    # byte-level BPE with GPT-2's split regex: llama.cpp's "gpt2" model with the "gpt-2" pre-tokenizer.
    # llama.cpp applies no NFC normalizer: text that is not NFC already may tokenize differently.
    tokens, types, merges = gguf_vocab(tokenizer, tokenizer_path, c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    # llama.cpp stops at eos and at eot (and chat front ends read eos as "the answer is over"):
    # eos = <|im_end|>, the end of an answer; eot = </s>, the end of a pretraining text
    writer.add_eos_token_id(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    writer.add_eot_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)  # as the tokenizer: the chat text starts with <|im_start|>, not <s>
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    # q/k rows keep the chapter's layout: llama.cpp's llama architecture rotates pairs (2i, 2i+1)
    # as the chapter does (its converter permutes Hugging Face's q/k back to this). No output.weight:
    # without one, llama.cpp uses token_embd for the output layer, Tiny-K's tie.
    weights = model.state_dict()
    counts = {}
    for tiny_name, hf_name in name_map(c.n_layers):
        data, qtype = gguf_tensor(weights[tiny_name], outtype)
        writer.add_tensor(gguf_name(hf_name), data, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def modelfile(gguf_file: str, system_prompt: str, num_ctx: int) -> str:
    """An ollama Modelfile for the GGUF in the same directory. The TEMPLATE (Go's text/template)
    writes the tokenizer's ChatML; ollama puts SYSTEM first when the chat has no system turn,
    as the tokenizer's chat template does. Sampling as model_sample.py's defaults."""
    return "\n".join([
        f"FROM ./{gguf_file}",
        "",
        '# ChatML: <|im_start|>role\\ncontent<|im_end|>\\n for every turn, then the answer\'s start',
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
        "{{ .Content }}<|im_end|>",
        "{{ end }}<|im_start|>assistant",
        '"""',
        f'SYSTEM """{system_prompt}"""',
        'PARAMETER stop "<|im_end|>"',
        f"PARAMETER num_ctx {num_ctx}",
        f"PARAMETER temperature {TEMPERATURE}",
        f"PARAMETER top_p {TOP_P}",
        f"PARAMETER top_k {TOP_K}",
        f"PARAMETER repeat_penalty {REPETITION_PENALTY}",
        ""])


def export_gguf(checkpoint: str, tokenizer_path: str, path: str, outtype: str):
    from train_tokenizer import SYSTEM_PROMPT, load_tokenizer
    try:
        import gguf  # noqa: F401 (the GGUF writer of llama.cpp's own converter)
    except ModuleNotFoundError:
        raise ValueError("writing GGUF needs the gguf package: pip install gguf") from None
    model = load_tiny_k(checkpoint)
    tokenizer = load_tokenizer(tokenizer_path)
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    counts = write_gguf(model, tokenizer, tokenizer_path, path, outtype)
    modelfile_path = os.path.join(out_dir, "Modelfile")
    with open(modelfile_path, "w", encoding="utf-8") as f:
        f.write(modelfile(os.path.basename(path), SYSTEM_PROMPT, model.config.max_seq_len))
    kinds = ", ".join(f"{n} {kind.lower()}" for kind, n in counts.items())
    print(f"exported {checkpoint} as GGUF ({outtype}: {kinds} tensors, {os.path.getsize(path) / 2**20:.1f} MiB) "
          f"to {path}, and {modelfile_path} for ollama create")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="a Tiny-K save_pretrained directory or training "
                        "checkpoint file (with --to_tiny_k: a Hugging Face Llama directory)")
    parser.add_argument("--tokenizer_path", default=None, help="default: the tokenizer saved in --checkpoint")
    parser.add_argument("--save_dir", default=SAVE_DIR, help="where the exported (or imported) model goes")
    parser.add_argument("--to_tiny_k", action="store_true", help="import a Hugging Face Llama instead")
    parser.add_argument("--gguf", default=None, help="write this GGUF file (and a Modelfile beside it) "
                        "instead of --save_dir")
    parser.add_argument("--outtype", default=OUTTYPE, choices=GGUF_TYPES, help="the GGUF's weight type")
    args = parser.parse_args(argv)
    try:
        if args.gguf:
            export_gguf(args.checkpoint, args.tokenizer_path or args.checkpoint, args.gguf, args.outtype)
        elif args.to_tiny_k:
            import_llama(args.checkpoint, args.save_dir)
        else:
            export(args.checkpoint, args.tokenizer_path or args.checkpoint, args.save_dir)
    except (FileNotFoundError, ValueError, OSError) as e:  # CheckpointError is a ValueError
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
