"""Export a Tiny-K model as a standard Hugging Face Llama, and import one back.

    python code/export_model.py --checkpoint output/sft --tokenizer_path tokenizer_k --save_dir output/hf
    python code/export_model.py --checkpoint output/pretrain/checkpoints/step_00000500.pt --tokenizer_path tokenizer_k
    python code/export_model.py --to_tiny_k --checkpoint output/hf --save_dir output/from_hf

The export is a LlamaForCausalLM directory (config.json, model.safetensors, the tokenizer with
its chat template, generation_config.json that stops at <|im_end|>) that loads with
AutoModelForCausalLM.from_pretrained, without trust_remote_code, and gives the same logits.
"""
import argparse
import json
import os
import shutil
import sys

import torch

from cli import HelpFormatter
from k_model import ModelConfig, Transformer, load_model, mlp_hidden_dim

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


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k projection rows: the chapter rotates pairs (2i, 2i+1) of each head; Hugging Face's
    Llama rotates (i, i + head_dim/2). Reorder each head's rows from the first layout to the second."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def layer_names(i: int):
    """(Tiny-K name, Hugging Face name) of each weight of layer i."""
    return [(f"layers.{i}.attention.wq.weight", f"model.layers.{i}.self_attn.q_proj.weight"),
            (f"layers.{i}.attention.wk.weight", f"model.layers.{i}.self_attn.k_proj.weight"),
            (f"layers.{i}.attention.wv.weight", f"model.layers.{i}.self_attn.v_proj.weight"),
            (f"layers.{i}.attention.wo.weight", f"model.layers.{i}.self_attn.o_proj.weight"),
            (f"layers.{i}.feed_forward.w1.weight", f"model.layers.{i}.mlp.gate_proj.weight"),
            (f"layers.{i}.feed_forward.w2.weight", f"model.layers.{i}.mlp.up_proj.weight"),
            (f"layers.{i}.feed_forward.w3.weight", f"model.layers.{i}.mlp.down_proj.weight"),
            (f"layers.{i}.attention_norm.weight", f"model.layers.{i}.input_layernorm.weight"),
            (f"layers.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight")]


def name_map(n_layers: int):
    names = [("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    return names + [pair for i in range(n_layers) for pair in layer_names(i)]


def remap(weights: dict, name_pairs, permute, n_heads: int, n_kv_heads: int) -> dict:
    """{new name: weights[old name]} for each (old, new) pair, q/k projection rows reordered by permute."""
    heads = {"wq": n_heads, "q_proj": n_heads, "wk": n_kv_heads, "k_proj": n_kv_heads}
    out = {}
    for src, dst in name_pairs:
        kind = src.split(".")[-2]  # "wq", "q_proj", ...
        out[dst] = (permute(weights[src], heads[kind]) if kind in heads else weights[src]).clone()
    return out


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


def to_tiny_k(llama) -> Transformer:
    """The reverse: a Hugging Face Llama of compatible shape as a Tiny-K Transformer."""
    c = llama.config
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("Tiny-K has no biases in attention or MLP")
    if not c.tie_word_embeddings:
        raise ValueError("Tiny-K ties the output layer to the embeddings; this model does not")
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(c, "rope_theta", 1e4)}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"RoPE scaling {rope['rope_type']!r} has no Tiny-K equivalent")
    eos = c.eos_token_id[-1] if isinstance(c.eos_token_id, list) else c.eos_token_id
    config = ModelConfig(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                         n_kv_heads=c.num_key_value_heads, vocab_size=c.vocab_size, hidden_dim=c.intermediate_size,
                         norm_eps=c.rms_norm_eps, max_seq_len=c.max_position_embeddings,
                         rope_theta=rope["rope_theta"], bos_token_id=c.bos_token_id, eos_token_id=eos,
                         pad_token_id=c.pad_token_id if c.pad_token_id is not None else 0)
    weights = remap(llama.state_dict(), [(hf, tiny) for tiny, hf in name_map(config.n_layers)],
                    halves_to_interleaved, config.n_heads, config.n_kv_heads)
    model = Transformer(config)
    model.load_state_dict(weights, strict=False)  # output.weight is tied to tok_embeddings
    model.tie_weights()
    check_all_set(model, weights)
    return model.eval()


def check_all_set(model, weights):
    """Every parameter came from `weights`, except the output layer that is tied to the embeddings."""
    left = [k for k in model.state_dict() if k not in weights and k not in ("lm_head.weight", "output.weight")]
    if left:
        raise ValueError(f"weights with no counterpart: {left[:5]}")


def load_tiny_k(checkpoint: str) -> Transformer:
    """A Tiny-K save_pretrained directory, an exported Hugging Face Llama directory, or a
    training checkpoint file (out_dir/checkpoints/step_N.pt), which carries its config."""
    if os.path.isdir(checkpoint):
        config_path = os.path.join(checkpoint, "config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                if json.load(f).get("model_type") == "llama":
                    from transformers import AutoModelForCausalLM
                    return to_tiny_k(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32))
        return load_model(checkpoint)
    from checkpoint import load_checkpoint, load_weights
    state = load_checkpoint(checkpoint)
    config = {k: v for k, v in state["config"].items() if k in ModelConfig().to_dict()}
    model = Transformer(ModelConfig(**config))
    load_weights(model, state["model"], checkpoint)
    return model


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", default="output/sft", help="a Tiny-K save_pretrained directory or training "
                        "checkpoint file (with --to_tiny_k: a Hugging Face Llama directory)")
    parser.add_argument("--tokenizer_path", default=None, help="default: the tokenizer saved in --checkpoint")
    parser.add_argument("--save_dir", default="output/hf", help="where the exported (or imported) model goes")
    parser.add_argument("--to_tiny_k", action="store_true", help="import a Hugging Face Llama instead")
    args = parser.parse_args(argv)
    try:
        if args.to_tiny_k:
            import_llama(args.checkpoint, args.save_dir)
        else:
            export(args.checkpoint, args.tokenizer_path or args.checkpoint, args.save_dir)
    except (FileNotFoundError, ValueError, OSError) as e:  # CheckpointError is a ValueError
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
