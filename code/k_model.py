"""The Tiny-K model: a LLaMA2-style decoder (chapter 5.4).

ModelConfig -> RMSNorm, RoPE (precompute_freqs_cis / apply_rotary_emb), GQA Attention
(repeat_kv), SwiGLU MLP, DecoderLayer, Transformer. Models save with `save_pretrained`
and load with `Transformer.from_pretrained(dir)` or, strictly, `load_model(dir)`.
"""
import math
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # no "Loading weights" bars in training logs

IGNORE_INDEX = -100  # label value that the loss skips (padding, prompts); never a real token id


class ModelConfig(PretrainedConfig):
    model_type = "Tiny-K"

    def __init__(
            self,
            dim: int = 768,           # model width
            n_layers: int = 12,       # number of DecoderLayers
            n_heads: int = 16,        # query heads
            n_kv_heads: int = 8,      # key/value heads (GQA)
            vocab_size: int = 6144,   # tokenizer vocabulary
            hidden_dim: int = None,   # MLP width; None = the LLaMA rule from dim
            multiple_of: int = 64,    # MLP width is rounded up to a multiple of this
            norm_eps: float = 1e-5,   # RMSNorm epsilon
            max_seq_len: int = 512,   # longest sequence (RoPE table, causal mask)
            dropout: float = 0.0,     # dropout probability
            flash_attn: bool = True,  # use F.scaled_dot_product_attention when available
            rope_theta: float = 10000.0,  # RoPE base (the chapter's default, named for export)
            **kwargs,
    ):
        self.dim = dim
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.vocab_size = vocab_size
        self.hidden_dim = hidden_dim
        self.multiple_of = multiple_of
        self.norm_eps = norm_eps
        self.max_seq_len = max_seq_len
        self.dropout = dropout
        self.flash_attn = flash_attn
        self.rope_theta = rope_theta
        # Special ids of our tokenizer (train_tokenizer.py): <unk>=0 doubles as pad, <s>=1, </s>=2.
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
        check_architecture(self)


def check_architecture(config) -> None:
    """A one-line ValueError for sizes the model cannot be built with (instead of an assert deep
    inside Attention)."""
    n_kv_heads = config.n_kv_heads or config.n_heads
    if config.dim % config.n_heads:
        raise ValueError(f"dim {config.dim} is not a multiple of n_heads {config.n_heads} (each head gets dim / n_heads)")
    if (config.dim // config.n_heads) % 2:
        raise ValueError(f"head size dim / n_heads = {config.dim // config.n_heads} is odd; RoPE rotates pairs")
    if config.n_heads % n_kv_heads:
        raise ValueError(f"n_heads {config.n_heads} is not a multiple of n_kv_heads {n_kv_heads} (GQA shares "
                         "each key/value head among n_heads / n_kv_heads query heads)")


# Fields that define the architecture: a checkpoint must match them exactly to be loaded.
ARCH_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
               "multiple_of", "norm_eps", "max_seq_len", "rope_theta")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        # x / sqrt(mean(x^2) + eps): no mean subtraction, unlike LayerNorm
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        # normalise in fp32 even under bf16 autocast, then return to the input dtype
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0):
    """cos/sin tables of shape (end, dim // 2) for positions 0..end-1."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device).float()
    freqs = torch.outer(t, freqs).float()
    return torch.cos(freqs), torch.sin(freqs)


def apply_rotary_emb(xq, xk, freqs_cos, freqs_sin):
    """Rotate each (even, odd) pair of q and k by its position's angle.

    xq, xk: (batch, seq, heads, head_dim); freqs_*: (seq, head_dim // 2), or (batch, seq,
    head_dim // 2) when each row has its own positions (left-padded generation).
    """
    xq_r, xq_i = xq.float().reshape(xq.shape[:-1] + (-1, 2)).unbind(-1)
    xk_r, xk_i = xk.float().reshape(xk.shape[:-1] + (-1, 2)).unbind(-1)

    # broadcast the tables over heads (and batch): (batch or 1, seq, 1, head_dim // 2)
    freqs_cos = freqs_cos.view(-1, xq.shape[1], 1, freqs_cos.shape[-1])
    freqs_sin = freqs_sin.view(-1, xq.shape[1], 1, freqs_sin.shape[-1])

    # complex multiplication (r + i*j) * (cos + i*sin)
    xq_out_r = xq_r * freqs_cos - xq_i * freqs_sin
    xq_out_i = xq_r * freqs_sin + xq_i * freqs_cos
    xk_out_r = xk_r * freqs_cos - xk_i * freqs_sin
    xk_out_i = xk_r * freqs_sin + xk_i * freqs_cos

    xq_out = torch.stack([xq_out_r, xq_out_i], dim=-1).flatten(3)
    xk_out = torch.stack([xk_out_r, xk_out_i], dim=-1).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, seq, n_kv_heads, head_dim) -> (batch, seq, n_kv_heads * n_rep, head_dim)."""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)
    )


class Attention(nn.Module):
    def __init__(self, args: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id  # which slot of a KVCache is this layer's
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        assert args.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        assert args.dim % args.n_heads == 0, "dim must be a multiple of n_heads"
        self.n_heads = args.n_heads
        self.head_dim = args.dim // args.n_heads
        self.n_rep = args.n_heads // self.n_kv_heads

        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.wo.is_residual_proj = True  # scaled init, see Transformer._init_weights

        # the chapter uses self.dropout and self.mask without defining them
        self.dropout = args.dropout
        self.attn_dropout = nn.Dropout(args.dropout)
        self.resid_dropout = nn.Dropout(args.dropout)

        self.flash = args.flash_attn and hasattr(F, "scaled_dot_product_attention")
        if not self.flash:
            self.register_buffer("mask", causal_mask(args.max_seq_len), persistent=False)

    def forward(self, x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor,
                kv_cache: "KVCache" = None, mask: Optional[torch.Tensor] = None):
        """mask: None = causal over x alone (training); else (batch, 1, seq, keys) bool, True = may attend."""
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_kv_heads, self.head_dim)

        # RoPE on (batch, seq, heads, head_dim), before the heads move to dim 1
        xq, xk = apply_rotary_emb(xq, xk, freqs_cos, freqs_sin)

        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        # no mask: causal when the keys are these tokens (no cache, or an empty one); a single new
        # token after a cache sees them all. Decided from Python facts, not from tensor shapes: a
        # shape comparison turns symbolic under torch.compile and breaks the graph at SDPA.
        causal = mask is None and (kv_cache is None or kv_cache.length == 0)
        if kv_cache is not None:  # attend to every earlier position, computed once
            xk, xv = kv_cache.update(self.layer_id, xk, xv)
        if self.flash:
            gqa = self.n_rep > 1
            if gqa and x.is_cuda and (mask is not None or xq.dtype == torch.float32 or not cuda_has_flash_attention()):
                # on CUDA only FlashAttention (sm80+, 16-bit, no mask) takes enable_gqa; elsewhere SDPA would
                # fall back to the math kernel and its seq x seq matrices. Copying each key/value head for
                # its n_rep query heads lets the memory-efficient kernel run instead.
                xk, xv = xk.repeat_interleave(self.n_rep, dim=1), xv.repeat_interleave(self.n_rep, dim=1)
                gqa = False
            # enable_gqa: SDPA lets each key/value head serve n_rep query heads without copying them
            output = F.scaled_dot_product_attention(
                xq, xk, xv, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=causal, enable_gqa=gqa)
        else:
            # GQA: each key/value head serves n_rep query heads
            xk = repeat_kv(xk.transpose(1, 2), self.n_rep).transpose(1, 2)
            xv = repeat_kv(xv.transpose(1, 2), self.n_rep).transpose(1, 2)
            scores = torch.matmul(xq, xk.transpose(2, 3)) / math.sqrt(self.head_dim)
            if causal:
                scores = scores + self.mask[:, :, :seqlen, :seqlen]
            elif mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            scores = F.softmax(scores.float(), dim=-1).type_as(xq)
            scores = self.attn_dropout(scores)
            output = torch.matmul(scores, xv)

        output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.resid_dropout(self.wo(output))


@torch.compiler.assume_constant_result  # a fact of the machine: torch.compile need not trace it
def cuda_has_flash_attention() -> bool:
    """FlashAttention, the one fused SDPA kernel that takes enable_gqa, needs compute capability 8.0+."""
    return torch.cuda.get_device_capability() >= (8, 0)


def causal_mask(n: int) -> torch.Tensor:
    """(1, 1, n, n) additive mask: 0 on and below the diagonal, -inf above."""
    return torch.full((1, 1, n, n), float("-inf")).triu(diagonal=1)


def mlp_hidden_dim(dim: int, hidden_dim: int = None, multiple_of: int = 64) -> int:
    """The MLP width: hidden_dim if given, else the LLaMA rule from dim."""
    if hidden_dim is None:
        # LLaMA: 2/3 of 4*dim keeps the parameter count of a plain 4*dim MLP
        hidden_dim = 4 * dim
        hidden_dim = int(2 * hidden_dim / 3)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
    return hidden_dim


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, dropout: float):
        super().__init__()
        hidden_dim = mlp_hidden_dim(dim, hidden_dim, multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w3 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3.is_residual_proj = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        # SwiGLU: silu(w1 x) gates w2 x (the chapter's revised version)
        return self.dropout(self.w3(F.silu(self.w1(x)) * self.w2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, layer_id: int, args: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, layer_id)
        self.feed_forward = MLP(
            dim=args.dim,
            hidden_dim=args.hidden_dim,
            multiple_of=args.multiple_of,
            dropout=args.dropout,
        )
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs_cos, freqs_sin, kv_cache=None, mask=None):
        # pre-norm residual blocks
        h = x + self.attention(self.attention_norm(x), freqs_cos, freqs_sin, kv_cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(PreTrainedModel):
    config_class = ModelConfig
    base_model_prefix = "tiny_k"
    # declared so save_pretrained (safetensors) stores the shared matrix once and loading re-ties it
    _tied_weights_keys = {"output.weight": "tok_embeddings.weight"}
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def __init__(self, args: ModelConfig = None):
        args = args if args is not None else ModelConfig()
        super().__init__(args)
        self.args = args

        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList([DecoderLayer(i, args) for i in range(args.n_layers)])
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

        freqs_cos, freqs_sin = precompute_freqs_cis(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)
        self.register_buffer("freqs_cos", freqs_cos, persistent=False)
        self.register_buffer("freqs_sin", freqs_sin, persistent=False)

        self.post_init()  # init weights (_init_weights) and tie output to tok_embeddings

    @torch.no_grad()
    def _init_weights(self, module):
        """normal(0, 0.02); the projections that feed a residual sum get 0.02/sqrt(2*n_layers) (GPT-2)."""
        std = 0.02
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_proj", False):
                std = std / math.sqrt(2 * self.args.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Attention) and not module.flash:
            # non-persistent buffers are not in checkpoints: from_pretrained builds them here
            module.mask.copy_(causal_mask(self.args.max_seq_len))
        elif isinstance(module, Transformer):
            cos, sin = precompute_freqs_cis(self.args.dim // self.args.n_heads, self.args.max_seq_len,
                                            self.args.rope_theta)
            module.freqs_cos.copy_(cos)
            module.freqs_sin.copy_(sin)

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, value):
        self.output = value

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                kv_cache: Optional["KVCache"] = None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        """Logits for every position and the mean loss when `targets` is given (IGNORE_INDEX
        positions skipped); otherwise only the last position's logits (cheaper for generation).

        Generation passes a KVCache (tokens are then the ones after kv_cache.length) and an
        attention_mask (batch, kv_cache.length + seq) that is 0 on left padding.
        """
        _bsz, seqlen = tokens.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + seqlen > self.args.max_seq_len:
            raise ValueError(f"sequence of {past + seqlen} tokens is longer than max_seq_len={self.args.max_seq_len}")
        h = self.dropout(self.tok_embeddings(tokens))
        if attention_mask is None and (past == 0 or seqlen == 1):
            # no padding: causal over these tokens, or one new token that sees the whole cache
            freqs_cos, freqs_sin, mask = self.freqs_cos[past:past + seqlen], self.freqs_sin[past:past + seqlen], None
        else:
            if attention_mask is None:
                attention_mask = torch.ones(_bsz, past + seqlen, dtype=torch.long, device=tokens.device)
            # a row's first real token is its position 0, however much padding precedes it
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            freqs_cos, freqs_sin = self.freqs_cos[positions], self.freqs_sin[positions]
            mask = generation_mask(attention_mask, past, seqlen)
        for layer in self.layers:
            h = layer(h, freqs_cos, freqs_sin, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.length += seqlen
        h = self.norm(h)

        if targets is not None:
            logits = self.output(h)
            loss = masked_cross_entropy(logits, targets)
        else:
            logits = self.output(h[:, [-1], :])
            loss = None
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def decode_step(self, tokens: torch.Tensor, kv_cache: "StaticKVCache") -> torch.Tensor:
        """Logits (batch, vocab) of one new token per row, written into a StaticKVCache. Every
        shape is fixed (the cache is max_seq_len long; a mask hides what is not written yet), so
        torch.compile captures this once and CUDA graphs can replay it (compiled_decode_step)."""
        freqs_cos = self.freqs_cos[kv_cache.positions][:, None]  # (batch, 1, head_dim // 2): each row's position
        freqs_sin = self.freqs_sin[kv_cache.positions][:, None]
        kv_cache.key_mask.index_fill_(1, kv_cache.column, True)  # the new token sees itself
        mask = kv_cache.key_mask[:, None, None, :]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, freqs_cos, freqs_sin, kv_cache, mask)
        logits = self.output(self.norm(h))[:, -1]
        kv_cache.column += 1
        kv_cache.positions += 1
        return logits

    def compiled_decode_step(self):
        """decode_step under torch.compile, made once per model; on CUDA with CUDA graphs
        (mode="reduce-overhead"), which replay the whole step as one launch."""
        if getattr(self, "_compiled_decode_step", None) is None:
            cuda = self.tok_embeddings.weight.is_cuda
            self._compiled_decode_step = torch.compile(self.decode_step, fullgraph=True, dynamic=False,
                                                       mode="reduce-overhead" if cuda else None)
        return self._compiled_decode_step

    @torch.inference_mode()
    def generate(self, idx, stop_id=None, max_new_tokens=256, temperature=1.0, top_k=None, top_p=None,
                 repetition_penalty=1.0, min_new_tokens=0, seed=None, attention_mask=None, use_kv_cache=True,
                 compile_decode=False):
        """Sample up to max_new_tokens after idx (batch, seq); return only the new tokens.

        temperature 0 is greedy. stop_id is a token id or a list of them; a row ends at its
        first stop token, which is not returned (rows that ended early are padded with it), and
        generation ends when every row has. min_new_tokens forbids stopping before that many.
        attention_mask (batch, seq) is 0 on left padding. use_kv_cache=False re-runs the whole
        sequence for each token, as the chapter's loop does. compile_decode=True runs each step
        after the prompt through compiled_decode_step (the first call compiles it). The sequence
        never grows past max_seq_len: max_new_tokens is cut to what fits.
        """
        columns = list(self.generate_stream(idx, stop_id, max_new_tokens, temperature, top_k, top_p,
                                            repetition_penalty, min_new_tokens, seed, attention_mask, use_kv_cache,
                                            compile_decode))
        return torch.cat(columns, dim=1) if columns else idx.new_zeros((idx.shape[0], 0))

    @torch.inference_mode()
    def generate_stream(self, idx, stop_id=None, max_new_tokens=256, temperature=1.0, top_k=None, top_p=None,
                        repetition_penalty=1.0, min_new_tokens=0, seed=None, attention_mask=None,
                        use_kv_cache=True, compile_decode=False):
        """generate() one step at a time: yields each new (batch, 1) column of tokens."""
        check_sampling(temperature, top_k, top_p, repetition_penalty)
        batch, prompt_len = idx.shape
        if prompt_len > self.args.max_seq_len:
            raise ValueError(f"prompt of {prompt_len} tokens is longer than max_seq_len={self.args.max_seq_len}")
        max_new_tokens = min(max_new_tokens, self.args.max_seq_len - prompt_len)
        stop_ids = torch.tensor([] if stop_id is None else [stop_id] if isinstance(stop_id, int) else list(stop_id),
                                dtype=torch.long, device=idx.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        padded = not bool(attention_mask.all())  # without padding the model needs no mask at all
        generator = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
        static = use_kv_cache and compile_decode
        kv_cache = (StaticKVCache if static else KVCache)(self.args, batch, idx.device, self.dtype) \
            if use_kv_cache else None
        finished = torch.zeros(batch, dtype=torch.bool, device=idx.device)
        sequence, step_input = idx, idx
        for i in range(max_new_tokens):
            mask = attention_mask if padded else None
            if static and i > 0:  # the prompt ran eagerly; every later step has the same shapes
                if idx.is_cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                # clone: a CUDA graph's next replay overwrites its output
                logits = self.compiled_decode_step()(step_input, kv_cache).clone()
            elif kv_cache is not None:  # only the tokens the cache has not seen
                logits = self(step_input, kv_cache=kv_cache, attention_mask=mask).logits[:, -1, :]
            else:
                logits = self(sequence, attention_mask=mask).logits[:, -1, :]
            if static and i == 0:
                kv_cache.start_decoding(attention_mask)
            next_token = sample_next_token(
                logits, temperature, top_k, top_p, repetition_penalty, sequence, attention_mask, generator,
                banned=stop_ids if i < min_new_tokens else None, exempt=stop_ids)
            if len(stop_ids):
                next_token[finished] = stop_ids[0]
                finished |= torch.isin(next_token, stop_ids)
                if finished.all():
                    return
            step_input = next_token[:, None]
            sequence = torch.cat((sequence, step_input), dim=1)
            attention_mask = torch.cat((attention_mask, torch.ones_like(step_input)), dim=1)
            yield step_input


def generation_mask(attention_mask: torch.Tensor, past: int, seqlen: int) -> torch.Tensor:
    """(batch, 1, seqlen, past + seqlen) bool: causal, padded keys hidden, and each position
    sees at least itself (a padding row with nothing to attend to would turn into NaN)."""
    keys = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :]
    queries = torch.arange(past, past + seqlen, device=attention_mask.device)[:, None]
    mask = (keys <= queries)[None] & attention_mask.bool()[:, None, :]
    return (mask | (keys == queries)[None])[:, None]


class KVCache:
    """Keys and values of every layer for a batch, preallocated for max_seq_len positions and
    filled left to right: a new token attends to them instead of recomputing the prefix."""

    def __init__(self, config: ModelConfig, batch_size: int, device=None, dtype=torch.float32):
        n_kv_heads = config.n_kv_heads or config.n_heads
        shape = (config.n_layers, batch_size, n_kv_heads, config.max_seq_len, config.dim // config.n_heads)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled; Transformer.forward advances it after all layers

    def update(self, layer_id: int, xk: torch.Tensor, xv: torch.Tensor):
        """Store this step's (batch, kv_heads, seq, head_dim) keys/values; return all so far."""
        end = self.length + xk.shape[2]
        self.k[layer_id, :, :, self.length:end] = xk
        self.v[layer_id, :, :, self.length:end] = xv
        return self.k[layer_id, :, :, :end], self.v[layer_id, :, :, :end]


class StaticKVCache(KVCache):
    """A KVCache whose shapes never change, for compiled decoding. The prompt fills it as usual
    (KVCache.update); after start_decoding, each step writes one position at `column` (a tensor,
    not a Python int that torch.compile would specialise on) and attention reads all max_seq_len
    slots, with key_mask hiding those not written yet and the left padding."""

    def __init__(self, config: ModelConfig, batch_size: int, device=None, dtype=torch.float32):
        super().__init__(config, batch_size, device, dtype)
        self.decoding = False
        self.column = torch.zeros(1, dtype=torch.long, device=device)  # the slot the next token fills
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # each row's RoPE position
        self.key_mask = torch.zeros(batch_size, config.max_seq_len, dtype=torch.bool, device=device)
        for t in (self.k, self.v, self.column, self.positions, self.key_mask):
            torch._dynamo.mark_static_address(t)  # fixed addresses: CUDA graphs may update them in place

    def start_decoding(self, attention_mask: torch.Tensor):
        """After the prompt (batch, length): mark its real tokens and where the next one goes."""
        self.key_mask[:, :self.length] = attention_mask.bool()
        self.column.fill_(self.length)
        self.positions.copy_(attention_mask.long().sum(-1))  # a row's first real token is position 0
        self.decoding = True

    def update(self, layer_id: int, xk: torch.Tensor, xv: torch.Tensor):
        if not self.decoding:
            return super().update(layer_id, xk, xv)
        self.k[layer_id].index_copy_(2, self.column, xk)
        self.v[layer_id].index_copy_(2, self.column, xv)
        return self.k[layer_id], self.v[layer_id]


def cast_for_inference(model: "Transformer", dtype: torch.dtype) -> "Transformer":
    """The weights (and so the KV cache) in `dtype` for generation; the RoPE tables stay in
    float32, where apply_rotary_emb computes (rounded to bf16, far positions get wrong angles)."""
    model.to(dtype)
    model.freqs_cos, model.freqs_sin = precompute_freqs_cis(model.args.dim // model.args.n_heads,
                                                            model.args.max_seq_len, model.args.rope_theta)
    model.freqs_cos, model.freqs_sin = model.freqs_cos.to(model.device), model.freqs_sin.to(model.device)
    return model


def check_sampling(temperature, top_k=None, top_p=None, repetition_penalty=1.0) -> None:
    """Refuse settings that would sample nonsense (a negative temperature favours the least likely tokens)."""
    if temperature < 0:
        raise ValueError(f"temperature {temperature} < 0; use 0 for greedy, about 0.7 to sample")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k {top_k} < 0; 0 (or None) turns it off")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p {top_p} is outside (0, 1]; 1 turns it off")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty {repetition_penalty} <= 0; 1 turns it off")


def apply_repetition_penalty(logits, context, context_mask, penalty, exempt=None):
    """Make tokens already in the context less likely (CTRL): positive logits / penalty,
    negative ones * penalty. Padding (context_mask 0) does not count, nor the `exempt` ids
    (the stop tokens: every chat prompt holds <|im_end|>, and answers must still end)."""
    counts = torch.zeros_like(logits).scatter_add_(1, context, context_mask.to(logits.dtype))
    if exempt is not None and len(exempt):
        counts[:, exempt] = 0
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)


def top_k_filter(logits, k):
    """Keep the k largest logits of each row; the rest become -inf."""
    kth = torch.topk(logits, min(k, logits.size(-1))).values[:, [-1]]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    remove = probs.cumsum(-1) - probs >= p  # the tokens before this one already reach p
    remove[:, 0] = False  # the most likely token always stays (p <= 0 would leave nothing)
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                      context=None, context_mask=None, generator=None, banned=None, exempt=None):
    """One token id per row from (batch, vocab) logits; greedy at temperature 0."""
    logits = logits.float()
    if repetition_penalty != 1.0 and context is not None:
        mask = context_mask if context_mask is not None else torch.ones_like(context)
        logits = apply_repetition_penalty(logits, context, mask, repetition_penalty, exempt)
    if banned is not None and len(banned):
        logits = logits.index_fill(1, banned, float("-inf"))
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the positions whose target is not IGNORE_INDEX.

    The chapter multiplies an already-averaged loss by a per-token mask; here the mask is in
    the labels. An all-ignored batch gives 0 (not NaN, as a plain mean would) and no gradient.
    """
    loss_sum = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    n_tokens = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return loss_sum / n_tokens


def load_model(path: str, config=None, **kwargs) -> Transformer:
    """Load a save_pretrained directory strictly: every weight must be present and fit.

    `config` (a ModelConfig, or a dict of some architecture fields) is what the caller expects;
    a checkpoint whose architecture differs is refused with the differences named.
    """
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: not a model directory (no config.json); "
                                "train one with ddp_pretrain.py or pass the right path")
    saved = ModelConfig.from_pretrained(path)
    if config is not None:
        wanted = {k: getattr(config, k) for k in ARCH_FIELDS} if isinstance(config, ModelConfig) else config
        unknown = set(wanted) - set(ARCH_FIELDS)
        if unknown:
            raise ValueError(f"not architecture fields: {sorted(unknown)} (known: {', '.join(ARCH_FIELDS)})")
        diff = [f"{k}: checkpoint {getattr(saved, k)} vs requested {v}" for k, v in wanted.items()
                if getattr(saved, k) != v]
        if diff:
            raise ValueError(f"{path}: checkpoint does not match the requested model ({', '.join(diff)})")
    model, info = Transformer.from_pretrained(path, output_loading_info=True, **kwargs)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ValueError(f"{path}: weights do not fit the model: {problems}")
    return model


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, the tied embedding counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
