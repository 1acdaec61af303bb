"""Reading models: a Tiny-K directory, an exported Hugging Face Llama directory or a training
checkpoint as a Tiny-K Transformer (load_tiny_k), the Llama weight layout both ways, and the
sampling defaults every reader of a model shares (model_sample.py, serve.py, export_model.py's
ollama Modelfile). It sits below model_sample.py and export_model.py, which import it and not
each other.
"""
import json
import os

import torch

from k_model import ModelConfig, Transformer, load_model

# sampling defaults (model_sample.py's flags and TextGenerator, serve.py's requests, the ollama Modelfile)
TEMPERATURE = 0.7           # logits / temperature: < 1 sharpens the distribution; 0 = greedy
TOP_K = 50                  # sample among the k most likely tokens; 0 = off
TOP_P = 0.9                 # nucleus: the fewest tokens whose probability reaches p; 1.0 = off
REPETITION_PENALTY = 1.1    # tokens already in the text get their logits weakened; 1.0 = off


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
