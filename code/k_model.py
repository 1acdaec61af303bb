"""Tiny-K 模型：LLaMA2 风格的纯解码器（Decoder-only）模型，对应第 5.4 节「模型构建」；
其中的 generate 对应第 5.6 节「推理生成」。

组件顺序与章节一致：ModelConfig（5.4.1）-> RMSNorm（5.4.2）-> RoPE 旋转位置编码（5.4.3，
precompute_freqs_cis / apply_rotary_emb）-> GQA 分组查询注意力（5.4.4，Attention 与 repeat_kv）
-> SwiGLU MLP（5.4.5）-> DecoderLayer（5.4.6）-> Transformer（5.4.7）。
模型用 `save_pretrained` 保存，用 `Transformer.from_pretrained(dir)` 加载，或用 `load_model(dir)` 严格加载。
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

hf_logging.disable_progress_bar()  # 训练日志里不要 "Loading weights" 进度条

# 损失计算时跳过的标签值（填充、提示词部分）；它不会是任何真实的 token id。
# 章节的 cross_entropy 用 ignore_index=0（pad 的 id）；这里数据集把不计损失的位置标成 -100。
IGNORE_INDEX = -100


# 5.4.1 模型配置：继承 PretrainedConfig，这样超参数能随 save_pretrained 写进 config.json，加载时再读回。
class ModelConfig(PretrainedConfig):
    model_type = "Tiny-K"

    def __init__(
            self,
            dim: int = 768,           # 模型维度（每个 token 的隐藏向量宽度）
            n_layers: int = 12,       # DecoderLayer 的层数
            n_heads: int = 16,        # 查询（Q）头数
            n_kv_heads: int = 8,      # 键/值（K/V）头数，少于 n_heads 即 GQA
            vocab_size: int = 6144,   # 分词器的词表大小
            hidden_dim: int = None,   # MLP 宽度；None 表示按 LLaMA 规则由 dim 推出
            multiple_of: int = 64,    # MLP 宽度向上取整到它的倍数
            norm_eps: float = 1e-5,   # RMSNorm 的 epsilon
            max_seq_len: int = 512,   # 最长序列（决定 RoPE 表和因果掩码的大小）
            dropout: float = 0.0,     # dropout 概率
            flash_attn: bool = True,  # 可用时使用 F.scaled_dot_product_attention
            rope_theta: float = 10000.0,  # RoPE 的底数（即章节的默认值，单独命名以便导出）
            **kwargs,
    ):
        # 把超参数存成属性：PretrainedConfig 会把它们序列化进 config.json
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
        # 我们分词器（train_tokenizer.py）的特殊 token id：<unk>=0 兼作 pad，<s>=1，</s>=2。
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        kwargs.setdefault("tie_word_embeddings", True)  # 词嵌入与输出层共享权重（见 5.4.7）
        super().__init__(**kwargs)
        check_architecture(self)  # 尺寸不合法时在建模型之前就报错


def check_architecture(config) -> None:
    """检查模型尺寸能否搭建。

    A one-line ValueError for sizes the model cannot be built with (instead of an assert deep
    inside Attention)."""
    n_kv_heads = config.n_kv_heads or config.n_heads
    if config.dim % config.n_heads:
        raise ValueError(f"dim {config.dim} is not a multiple of n_heads {config.n_heads} (each head gets dim / n_heads)")
    if (config.dim // config.n_heads) % 2:
        raise ValueError(f"head size dim / n_heads = {config.dim // config.n_heads} is odd; RoPE rotates pairs")
    if config.n_heads % n_kv_heads:
        raise ValueError(f"n_heads {config.n_heads} is not a multiple of n_kv_heads {n_kv_heads} (GQA shares "
                         "each key/value head among n_heads / n_kv_heads query heads)")


# 决定模型结构的字段：checkpoint 必须与它们完全一致才能加载。
ARCH_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
               "multiple_of", "norm_eps", "max_seq_len", "rope_theta")


# 5.4.2 RMSNorm：只用均方根做缩放、不减均值，比 LayerNorm 少一步计算，效果相当；LLaMA2 各层都用它。
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps  # 加在分母里，防止除以 0
        self.weight = nn.Parameter(torch.ones(dim))  # 每一维一个可学习的缩放系数，初始为 1

    def _norm(self, x):
        # x / sqrt(mean(x^2) + eps)：与 LayerNorm 不同，不减去均值
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        # 即使在 bf16 autocast 下也用 fp32 做归一化（平方再求均值在低精度下容易失准），再转回输入的 dtype
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


# 5.4.3 RoPE 旋转位置编码：不加位置向量，而是把 q、k 按位置旋转一个角度，q·k 因此只取决于相对位置，且不需要参数。
def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0):
    """预先算好位置 0..end-1 的 cos/sin 表，形状为 (end, dim // 2)。"""
    # 每对维度一个频率 1 / theta^(2i/dim)：越靠后的维度转得越慢，能分辨更远的距离
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device).float()  # 位置 0..end-1
    freqs = torch.outer(t, freqs).float()  # 外积：位置 m 在第 i 对维度上的旋转角 m * freq_i
    return torch.cos(freqs), torch.sin(freqs)


def apply_rotary_emb(xq, xk, freqs_cos, freqs_sin):
    """把 q、k 的每一对（偶数位, 奇数位）分量按所在位置的角度旋转。

    xq, xk：(batch, seq, heads, head_dim)；freqs_*：(seq, head_dim // 2)，当每行有各自的位置时
    （左填充的批量生成）则为 (batch, seq, head_dim // 2)。
    """
    # 把 head_dim 拆成 head_dim / 2 对，每对当作一个复数的实部 r 和虚部 i（在 fp32 中计算）
    xq_r, xq_i = xq.float().reshape(xq.shape[:-1] + (-1, 2)).unbind(-1)
    xk_r, xk_i = xk.float().reshape(xk.shape[:-1] + (-1, 2)).unbind(-1)

    # 让 cos/sin 表在各个头（以及 batch）上广播：(batch 或 1, seq, 1, head_dim // 2)
    freqs_cos = freqs_cos.view(-1, xq.shape[1], 1, freqs_cos.shape[-1])
    freqs_sin = freqs_sin.view(-1, xq.shape[1], 1, freqs_sin.shape[-1])

    # 复数乘法 (r + i*j) * (cos + i*sin)：相当于把每对分量在平面上旋转该位置的角度
    xq_out_r = xq_r * freqs_cos - xq_i * freqs_sin
    xq_out_i = xq_r * freqs_sin + xq_i * freqs_cos
    xk_out_r = xk_r * freqs_cos - xk_i * freqs_sin
    xk_out_i = xk_r * freqs_sin + xk_i * freqs_cos

    # 把旋转后的实部、虚部交错拼回 head_dim，再转回原来的 dtype
    xq_out = torch.stack([xq_out_r, xq_out_i], dim=-1).flatten(3)
    xk_out = torch.stack([xk_out_r, xk_out_i], dim=-1).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """GQA 用：把每个 K/V 头复制 n_rep 份，使头数与 Q 对齐。

    (batch, seq, n_kv_heads, head_dim) -> (batch, seq, n_kv_heads * n_rep, head_dim)。
    """
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:  # K/V 头数与 Q 相同（普通多头注意力），无需复制
        return x
    # 先插入一维并 expand 出 n_rep 份（只是视图），再 reshape 合并：每个 K/V 头相邻重复 n_rep 次
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)
    )


# 5.4.4 GQA 分组查询注意力：n_heads 个查询头分成 n_kv_heads 组，每组共享一对 K/V 头，
# K/V 投影的参数和推理时的 KV cache 都按 n_heads / n_kv_heads 倍缩小，效果接近普通多头注意力。
class Attention(nn.Module):
    def __init__(self, args: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id  # 本层在 KVCache 里占哪一格
        # n_kv_heads 为 None 时 K/V 头数与 Q 相同，即普通多头注意力
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        # 每组 K/V 要被整数个查询头共享；dim 要能平均分给每个头
        assert args.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        assert args.dim % args.n_heads == 0, "dim must be a multiple of n_heads"
        self.n_heads = args.n_heads
        self.head_dim = args.dim // args.n_heads  # 每个头的维度
        self.n_rep = args.n_heads // self.n_kv_heads  # 每个 K/V 头要服务几个查询头

        # Q 投影出 n_heads 个头，K/V 只投影出 n_kv_heads 个头（GQA 省下的就在这里）；wo 把多头结果投影回 dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.wo.is_residual_proj = True  # 缩放初始化，见 Transformer._init_weights

        # 章节代码用到了 self.dropout 和 self.mask，却没有定义它们
        self.dropout = args.dropout  # 交给 SDPA 的 dropout_p
        self.attn_dropout = nn.Dropout(args.dropout)  # 手写路径：作用在注意力权重上
        self.resid_dropout = nn.Dropout(args.dropout)  # 作用在输出投影之后、进入残差之前

        # 有 SDPA 且 flash_attn=True 时走融合内核（更快、省显存）；否则手写注意力，需要一张因果掩码表
        self.flash = args.flash_attn and hasattr(F, "scaled_dot_product_attention")
        if not self.flash:
            self.register_buffer("mask", causal_mask(args.max_seq_len), persistent=False)

    def forward(self, x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor,
                kv_cache: "KVCache" = None, mask: Optional[torch.Tensor] = None):
        """mask：None 表示只在 x 自身上做因果注意力（训练时）；否则为 (batch, 1, seq, keys) 的 bool 张量，True = 可以关注。"""
        bsz, seqlen, _ = x.shape
        # 算出 Q、K、V 并拆成多头：Q 有 n_heads 个头，K/V 只有 n_kv_heads 个
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_kv_heads, self.head_dim)

        # 在 (batch, seq, heads, head_dim) 上施加 RoPE，即在把头挪到第 1 维之前；只旋转 Q、K，V 不动
        xq, xk = apply_rotary_emb(xq, xk, freqs_cos, freqs_sin)

        # 换成 (batch, heads, seq, head_dim)，每个头各自做矩阵乘
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        # 不传 mask 时：K 就是这些 token 本身（没有缓存，或缓存为空）时用因果掩码；缓存之后的单个新 token
        # 可以看到全部。这由 Python 层面的事实决定，而不比较张量形状：在 torch.compile 下形状比较会变成
        # 符号表达式，使计算图在 SDPA 处断开。
        causal = mask is None and (kv_cache is None or kv_cache.length == 0)
        if kv_cache is not None:  # KV cache：关注之前的每个位置，它们的 K/V 只算一次
            xk, xv = kv_cache.update(self.layer_id, xk, xv)
        if self.flash:
            gqa = self.n_rep > 1
            if gqa and x.is_cuda and (mask is not None or xq.dtype == torch.float32 or not cuda_has_flash_attention()):
                # CUDA 上只有 FlashAttention（sm80+、16 位、无 mask）接受 enable_gqa；其他情况下 SDPA 会退回
                # math 内核，带着 seq x seq 的大矩阵。把每个 K/V 头为它的 n_rep 个查询头各复制一份，
                # 就能改用 memory-efficient 内核。
                xk, xv = xk.repeat_interleave(self.n_rep, dim=1), xv.repeat_interleave(self.n_rep, dim=1)
                gqa = False
            # enable_gqa：SDPA 让每个 K/V 头直接服务 n_rep 个查询头，无需复制
            # is_causal：因果掩码，每个位置只能看到自己和之前的 token
            output = F.scaled_dot_product_attention(
                xq, xk, xv, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=causal, enable_gqa=gqa)
        else:
            # GQA：每个 K/V 头服务 n_rep 个查询头（repeat_kv 要的是 (batch, seq, heads, head_dim)，故先转置再转回）
            xk = repeat_kv(xk.transpose(1, 2), self.n_rep).transpose(1, 2)
            xv = repeat_kv(xv.transpose(1, 2), self.n_rep).transpose(1, 2)
            # 缩放点积：除以 sqrt(head_dim)，免得点积过大把 softmax 推向饱和
            scores = torch.matmul(xq, xk.transpose(2, 3)) / math.sqrt(self.head_dim)
            if causal:
                scores = scores + self.mask[:, :, :seqlen, :seqlen]  # 因果掩码：看不到后面的 token
            elif mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))  # 按给定 mask 屏蔽填充和未来位置
            scores = F.softmax(scores.float(), dim=-1).type_as(xq)  # softmax 在 fp32 中算，数值更稳
            scores = self.attn_dropout(scores)
            output = torch.matmul(scores, xv)  # 按注意力权重对 V 加权求和

        # 合并多头：(batch, seq, n_heads * head_dim)，再由 wo 投影回 dim
        output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.resid_dropout(self.wo(output))


# 判断 GPU 是否支持 FlashAttention（决定能否直接用 enable_gqa）。
@torch.compiler.assume_constant_result  # a fact of the machine: torch.compile need not trace it
def cuda_has_flash_attention() -> bool:
    """FlashAttention, the one fused SDPA kernel that takes enable_gqa, needs compute capability 8.0+."""
    return torch.cuda.get_device_capability() >= (8, 0)


def causal_mask(n: int) -> torch.Tensor:
    """因果掩码（加到注意力分数上）：形状 (1, 1, n, n)，对角线及以下为 0，以上为 -inf。"""
    return torch.full((1, 1, n, n), float("-inf")).triu(diagonal=1)


def mlp_hidden_dim(dim: int, hidden_dim: int = None, multiple_of: int = 64) -> int:
    """MLP 的宽度：给了 hidden_dim 就用它，否则按 LLaMA 规则由 dim 推出。"""
    if hidden_dim is None:
        # LLaMA 规则：SwiGLU 有三个矩阵，取 4*dim 的 2/3，参数量就与普通 4*dim 的 MLP 相同
        hidden_dim = 4 * dim
        hidden_dim = int(2 * hidden_dim / 3)
        # 再向上取整到 multiple_of 的倍数，矩阵尺寸规整，硬件算得更快
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
    return hidden_dim


# 5.4.5 SwiGLU 前馈网络：一路经 SiLU（Swish）后作为门控，逐元素乘到另一路上，再投影回 dim。
class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, dropout: float):
        super().__init__()
        hidden_dim = mlp_hidden_dim(dim, hidden_dim, multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # 门控（gate）
        self.w2 = nn.Linear(dim, hidden_dim, bias=False)  # 升维（up）
        self.w3 = nn.Linear(hidden_dim, dim, bias=False)  # 降维（down），回到 dim
        self.w3.is_residual_proj = True  # 输出进入残差求和，用缩放初始化
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        # SwiGLU：silu(w1 x) 作门控乘上 w2 x（即章节修正后的版本）
        return self.dropout(self.w3(F.silu(self.w1(x)) * self.w2(x)))


# 5.4.6 Transformer 块：注意力子层 + SwiGLU 子层，每个子层前先做 RMSNorm（Pre-norm），外面包残差连接。
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
        # 两个子层各配一个 RMSNorm，放在子层之前（Pre-norm），深层网络训练更稳定
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs_cos, freqs_sin, kv_cache=None, mask=None):
        # Pre-norm 残差块：先归一化再进子层，子层输出加回输入（残差连接），梯度可沿残差直接回传
        h = x + self.attention(self.attention_norm(x), freqs_cos, freqs_sin, kv_cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


# 5.4.7 完整模型：词嵌入 -> n_layers 个 DecoderLayer -> RMSNorm -> 输出层（与词嵌入共享权重）。
# 继承 PreTrainedModel，从而可以用 save_pretrained / from_pretrained 保存和加载。
class Transformer(PreTrainedModel):
    config_class = ModelConfig
    base_model_prefix = "tiny_k"
    # 在这里声明，save_pretrained（safetensors）就只存一份共享矩阵，加载时再重新绑定
    _tied_weights_keys = {"output.weight": "tok_embeddings.weight"}
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def __init__(self, args: ModelConfig = None):
        args = args if args is not None else ModelConfig()  # 不给配置时用默认的 ModelConfig
        super().__init__(args)
        self.args = args

        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)  # 词嵌入：token id -> dim 维向量
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList([DecoderLayer(i, args) for i in range(args.n_layers)])  # n_layers 个 Transformer 块
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)  # 最后一个块之后的归一化
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)  # 输出层：dim -> 词表上的 logits

        # 预计算 RoPE 的 cos/sin 表（按每个头的维度 dim // n_heads）；persistent=False：不存进 checkpoint，随时可重算
        freqs_cos, freqs_sin = precompute_freqs_cis(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)
        self.register_buffer("freqs_cos", freqs_cos, persistent=False)
        self.register_buffer("freqs_sin", freqs_sin, persistent=False)

        self.post_init()  # 初始化权重（_init_weights），并把 output 绑定到 tok_embeddings（权重共享）

    @torch.no_grad()
    def _init_weights(self, module):
        """权重取 normal(0, 0.02)；输出进入残差求和的投影取 0.02/sqrt(2*n_layers)（GPT-2 的做法），
        这样层数再多，残差流的方差也不会越加越大。"""
        std = 0.02
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_proj", False):  # Attention.wo 与 MLP.w3
                std = std / math.sqrt(2 * self.args.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)  # RMSNorm 起初不改变尺度
        elif isinstance(module, Attention) and not module.flash:
            # 非持久 buffer 不在 checkpoint 里：from_pretrained 在这里把它们建出来
            module.mask.copy_(causal_mask(self.args.max_seq_len))
        elif isinstance(module, Transformer):
            # RoPE 的 cos/sin 表同理，在这里重算
            cos, sin = precompute_freqs_cis(self.args.dim // self.args.n_heads, self.args.max_seq_len,
                                            self.args.rope_theta)
            module.freqs_cos.copy_(cos)
            module.freqs_sin.copy_(sin)

    # transformers 通过下面四个方法找到词嵌入和输出层（例如用于权重绑定）
    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, value):
        self.output = value

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                kv_cache: Optional["KVCache"] = None, attention_mask: Optional[torch.Tensor] = None,
                all_logits: bool = False, **kwargs):
        """给出 `targets` 时返回每个位置的 logits 和平均损失（跳过 IGNORE_INDEX 的位置）；否则只返回
        最后一个位置的 logits（生成时更省）。all_logits=True：返回每个位置的 logits、不算损失
        （DPO、GRPO 自己逐 token 打分，用不着这个平均损失）。

        生成时会传入 KVCache（此时 tokens 是 kv_cache.length 之后的那些 token）和
        attention_mask (batch, kv_cache.length + seq)，它在左填充处为 0。
        """
        _bsz, seqlen = tokens.shape
        past = kv_cache.length if kv_cache is not None else 0  # 缓存里已有的位置数
        # RoPE 表和因果掩码只有 max_seq_len 长，更长的序列无从计算
        if past + seqlen > self.args.max_seq_len:
            raise ValueError(f"sequence of {past + seqlen} tokens is longer than max_seq_len={self.args.max_seq_len}")
        h = self.dropout(self.tok_embeddings(tokens))  # 词嵌入 + dropout
        if attention_mask is None and (past == 0 or seqlen == 1):
            # 没有填充：对这些 token 做因果注意力，或者是一个能看到整个缓存的新 token；RoPE 表从位置 past 起切片
            freqs_cos, freqs_sin, mask = self.freqs_cos[past:past + seqlen], self.freqs_sin[past:past + seqlen], None
        else:
            # 有填充（或缓存之后又来了多个 token）：按每行的真实位置取 RoPE，并构造显式的 mask
            if attention_mask is None:
                attention_mask = torch.ones(_bsz, past + seqlen, dtype=torch.long, device=tokens.device)
            # 每行第一个真实 token 的位置为 0，不论它前面有多少填充
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            freqs_cos, freqs_sin = self.freqs_cos[positions], self.freqs_sin[positions]
            mask = generation_mask(attention_mask, past, seqlen)
        for layer in self.layers:  # 依次经过每个 Transformer 块
            h = layer(h, freqs_cos, freqs_sin, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.length += seqlen  # 所有层都写完同一段位置后，缓存长度才前移
        h = self.norm(h)  # 最后的 RMSNorm

        if targets is not None or all_logits:
            # 训练（或 all_logits）：算出所有位置的 logits；给了 targets 才算损失
            logits = self.output(h)
            loss = masked_cross_entropy(logits, targets) if targets is not None else None
        else:
            # 推理：只算最后一个位置的 logits，省下 (seq, vocab) 的大矩阵
            logits = self.output(h[:, [-1], :])
            loss = None
        # 用 transformers 的标准输出类型返回（章节返回的是 dict）
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def decode_step(self, tokens: torch.Tensor, kv_cache: "StaticKVCache") -> torch.Tensor:
        """编译解码用的单步前向：每行一个新 token，形状全部固定。

        Logits (batch, vocab) of one new token per row, written into a StaticKVCache. Every
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
        """编译后的 decode_step（每个模型只编译一次，每个批大小档位各一张图），用于加速逐 token 解码。

        decode_step under torch.compile, made once per model; on CUDA with CUDA graphs
        (mode="reduce-overhead"), which replay the whole step as one launch. Shapes are static, so
        each bucket of DECODE_BUCKETS compiles once: at most len(DECODE_BUCKETS) graphs."""
        if getattr(self, "_compiled_decode_step", None) is None:
            cuda = self.tok_embeddings.weight.is_cuda
            inductor = DECODE_BACKEND == "inductor"  # mode 只对 inductor 有意义
            self._compiled_decode_step = torch.compile(self.decode_step, backend=DECODE_BACKEND, fullgraph=True,
                                                       dynamic=False,
                                                       mode="reduce-overhead" if cuda and inductor else None)
        return self._compiled_decode_step

    def static_kv_cache(self, batch: int) -> "StaticKVCache":
        """编译解码用的 StaticKVCache：每个档位一个，留在模型上，每个请求重置后接着用。

        The StaticKVCache of batch's bucket, made on first use and kept on the model: a new
        request resets it in place rather than allocating another, because CUDA graphs are
        recorded on the cache's addresses (a new address re-records, and the old graphs stay).
        One compiled generation at a time per model (serve.py holds a lock around each)."""
        bucket = decode_bucket(batch)
        if getattr(self, "_static_kv_caches", None) is None:
            self._static_kv_caches = {}
        cache = self._static_kv_caches.get(bucket)
        # 模型换了设备或 dtype（如 cast_for_inference）时，旧缓存用不上了，重新分配
        if cache is None or cache.k.device != self.device or cache.k.dtype != self.dtype:
            cache = self._static_kv_caches[bucket] = StaticKVCache(self.args, bucket, self.device, self.dtype)
        cache.reset()
        return cache

    @torch.inference_mode()
    def generate(self, idx, stop_id=None, max_new_tokens=256, temperature=1.0, top_k=None, top_p=None,
                 repetition_penalty=1.0, min_new_tokens=0, seed=None, attention_mask=None, use_kv_cache=True,
                 compile_decode=False):
        """5.6.1 自回归生成：在 idx (batch, seq) 之后最多采样 max_new_tokens 个 token，只返回新生成的部分。

        temperature 为 0 时是贪婪解码。stop_id 是一个 token id 或它们的列表；每行在遇到第一个停止 token
        时结束，该 token 不返回（提前结束的行用它填充），所有行都结束时生成停止。min_new_tokens 禁止在
        生成这么多个 token 之前停止。attention_mask (batch, seq) 在左填充处为 0。use_kv_cache=False 时
        每生成一个 token 都重跑整个序列，和章节的循环一样。compile_decode=True 时，提示词之后的每一步都经
        compiled_decode_step 运行：批量补齐到 DECODE_BUCKETS 中的一档，每档第一次用到时编译一次，超过
        最大一档的批量用 eager 解码。序列不会超过 max_seq_len：max_new_tokens 会被截到放得下的数量。
        logits 出现 NaN 或 inf（如 fp16 上溢）时抛出 NonFiniteLogitsError。
        """
        # 逐步产出的各列拼成 (batch, 新 token 数)；一个都没生成时返回 (batch, 0)
        columns = list(self.generate_stream(idx, stop_id, max_new_tokens, temperature, top_k, top_p,
                                            repetition_penalty, min_new_tokens, seed, attention_mask, use_kv_cache,
                                            compile_decode))
        return torch.cat(columns, dim=1) if columns else idx.new_zeros((idx.shape[0], 0))

    @torch.inference_mode()
    def generate_stream(self, idx, stop_id=None, max_new_tokens=256, temperature=1.0, top_k=None, top_p=None,
                        repetition_penalty=1.0, min_new_tokens=0, seed=None, attention_mask=None,
                        use_kv_cache=True, compile_decode=False):
        """逐步执行的 generate()：每一步产出一列新 token，形状为 (batch, 1)。"""
        check_sampling(temperature, top_k, top_p, repetition_penalty)  # 先拒绝无意义的采样参数
        batch, prompt_len = idx.shape
        if prompt_len > self.args.max_seq_len:
            raise ValueError(f"prompt of {prompt_len} tokens is longer than max_seq_len={self.args.max_seq_len}")
        # 章节在超长时截掉序列开头；这里改为只生成 max_seq_len 放得下的数量
        max_new_tokens = min(max_new_tokens, self.args.max_seq_len - prompt_len)
        # 停止 token 统一成一个张量（可以没有、一个或多个）
        stop_ids = torch.tensor([] if stop_id is None else [stop_id] if isinstance(stop_id, int) else list(stop_id),
                                dtype=torch.long, device=idx.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)  # 没给就视为全是真实 token
        padded = not bool(attention_mask.all())  # 没有填充时模型完全不需要 mask
        # 给了 seed 就用独立的随机数发生器，采样结果可复现
        generator = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
        # 用 KV cache 且要编译解码时，换成形状固定的 StaticKVCache（批量补齐到所在的档位）；
        # 比最大一档还大的批量走 eager 解码（见 DECODE_BUCKETS）
        static = use_kv_cache and compile_decode and decode_bucket(batch) is not None
        if static:
            kv_cache = self.static_kv_cache(batch)
            ticket = kv_cache.ticket  # 这次生成的编号：同一缓存被另一次生成拿去时，下面会发现
        else:
            kv_cache = KVCache(self.args, batch, idx.device, self.dtype) if use_kv_cache else None
        finished = torch.zeros(batch, dtype=torch.bool, device=idx.device)  # 每行是否已遇到停止 token
        # sequence：到目前为止的完整序列；step_input：这一步要喂给模型的 token（第一步是整段提示词）
        sequence, step_input = idx, idx
        for i in range(max_new_tokens):
            mask = attention_mask if padded else None
            if static and i > 0:  # 提示词已按普通方式跑过；之后每一步的形状都相同
                if kv_cache.ticket != ticket:
                    raise RuntimeError("another compiled generation on this model took over its cache: "
                                       "run one compiled generation at a time per model")
                if idx.is_cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                # 补上哑行（token 0）凑满档位，它们的输出丢掉；clone：CUDA graph 下一次重放会覆盖它的输出
                tokens = F.pad(step_input, (0, 0, 0, kv_cache.batch_size - batch))
                logits = self.compiled_decode_step()(tokens, kv_cache)[:batch].clone()
            elif kv_cache is not None:  # 只喂缓存还没见过的 token
                logits = self(step_input, kv_cache=kv_cache, attention_mask=mask).logits[:, -1, :]
            else:
                # 不用缓存：像章节那样每一步都重跑整个序列，只取最后一个位置的 logits
                logits = self(sequence, attention_mask=mask).logits[:, -1, :]
            if static and i == 0:
                kv_cache.start_decoding(attention_mask)  # 提示词已写进缓存，转入固定形状的逐 token 解码
            # fp16 的前向会上溢成 inf、再算出 NaN；NaN 一旦进入 torch.multinomial，CUDA 上就是设备端断言，
            # 整个 CUDA 上下文随之作废（服务进程还活着，却再也算不了）。这里先在设备上记下还在生成的行里哪些
            # 坏了，到下面每步本来就有的那次同步时再读回（不为它多同步一次）；在那之前把坏行换成全 0（均匀分布），
            # 采样就不会碰到 NaN，这些行的结果反正不用。
            finite = torch.isfinite(logits).all(-1)
            broken = ~finite & ~finished
            logits = torch.where(finite[:, None], logits, 0.0)
            # 采样下一个 token：未满 min_new_tokens 时禁止停止 token；重复惩罚不罚停止 token
            next_token = sample_next_token(
                logits, temperature, top_k, top_p, repetition_penalty, sequence, attention_mask, generator,
                banned=stop_ids if i < min_new_tokens else None, exempt=stop_ids, check_finite=False)
            if len(stop_ids):
                # 已结束的行继续填停止 token
                next_token[finished] = stop_ids[0]
                finished |= torch.isin(next_token, stop_ids)
            # 每步与主机同步一次，同时读回两件事：有没有行的 logits 坏了，是否所有行都已结束
            any_broken, all_finished = torch.stack((broken.any(), finished.all())).tolist()
            if any_broken:
                raise NonFiniteLogitsError(logits.dtype)
            if all_finished:
                return  # 所有行都结束就停止（这一步的停止 token 不返回）
            # 新 token 追加到序列末尾，mask 同步加一列 1，再交给调用者
            step_input = next_token[:, None]
            sequence = torch.cat((sequence, step_input), dim=1)
            attention_mask = torch.cat((attention_mask, torch.ones_like(step_input)), dim=1)
            yield step_input


def generation_mask(attention_mask: torch.Tensor, past: int, seqlen: int) -> torch.Tensor:
    """生成时用的注意力 mask：因果 + 屏蔽左填充。

    (batch, 1, seqlen, past + seqlen) bool: causal, padded keys hidden, and each position
    sees at least itself (a padding row with nothing to attend to would turn into NaN)."""
    keys = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :]
    queries = torch.arange(past, past + seqlen, device=attention_mask.device)[:, None]
    mask = (keys <= queries)[None] & attention_mask.bool()[:, None, :]
    return (mask | (keys == queries)[None])[:, None]


class KVCache:
    """KV cache：缓存每层已算过的 K/V，生成新 token 时不必重算整个前缀（章节的生成循环没有它）。

    Keys and values of every layer for a batch, preallocated for max_seq_len positions and
    filled left to right: a new token attends to them instead of recomputing the prefix."""

    def __init__(self, config: ModelConfig, batch_size: int, device=None, dtype=torch.float32):
        n_kv_heads = config.n_kv_heads or config.n_heads
        shape = (config.n_layers, batch_size, n_kv_heads, config.max_seq_len, config.dim // config.n_heads)
        self.batch_size = batch_size
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled; Transformer.forward advances it after all layers

    def update(self, layer_id: int, xk: torch.Tensor, xv: torch.Tensor):
        """Store this step's (batch, kv_heads, seq, head_dim) keys/values; return all so far.

        The batch fills the cache's first rows: a StaticKVCache has a bucket's rows, and the
        prompt runs on the real ones only."""
        bsz, end = xk.shape[0], self.length + xk.shape[2]
        self.k[layer_id, :bsz, :, self.length:end] = xk
        self.v[layer_id, :bsz, :, self.length:end] = xv
        return self.k[layer_id, :bsz, :, :end], self.v[layer_id, :bsz, :, :end]


class StaticKVCache(KVCache):
    """形状固定的 KV cache，供 torch.compile / CUDA graphs 编译后的解码使用。

    A KVCache whose shapes never change, for compiled decoding. The prompt fills it as usual
    (KVCache.update); after start_decoding, each step writes one position at `column` (a tensor,
    not a Python int that torch.compile would specialise on) and attention reads all max_seq_len
    slots, with key_mask hiding those not written yet and the left padding. It has a bucket's
    rows (DECODE_BUCKETS); those past the real batch are dummies whose outputs are dropped."""

    def __init__(self, config: ModelConfig, batch_size: int, device=None, dtype=torch.float32):
        super().__init__(config, batch_size, device, dtype)
        self.decoding = False
        self.ticket = 0  # counts the generations that used it (Transformer.static_kv_cache)
        self.column = torch.zeros(1, dtype=torch.long, device=device)  # the slot the next token fills
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # each row's RoPE position
        self.key_mask = torch.zeros(batch_size, config.max_seq_len, dtype=torch.bool, device=device)
        for t in (self.k, self.v, self.column, self.positions, self.key_mask):
            torch._dynamo.mark_static_address(t)  # fixed addresses: CUDA graphs may update them in place

    def reset(self):
        """为新请求清空，地址不变（CUDA graphs 就在这些地址上重放）：上一个请求什么也留不下。

        Empty for a new request, in place. K/V are zeroed too: key_mask hides stale slots, but a
        hidden NaN left by an overflowed request would still spread (its weight 0 times NaN)."""
        for t in (self.k, self.v, self.column, self.positions, self.key_mask):
            t.zero_()
        self.length, self.decoding = 0, False
        self.ticket += 1

    def start_decoding(self, attention_mask: torch.Tensor):
        """After the prompt (batch, length): mark its real tokens and where the next one goes.

        The prompt filled the first `batch` rows; the dummy rows after them hold no token."""
        batch = attention_mask.shape[0]
        self.key_mask.zero_()
        self.key_mask[:batch, :self.length] = attention_mask.bool()
        self.column.fill_(self.length)
        self.positions.zero_()
        self.positions[:batch] = attention_mask.long().sum(-1)  # a row's first real token is position 0
        self.decoding = True

    def update(self, layer_id: int, xk: torch.Tensor, xv: torch.Tensor):
        if not self.decoding:
            return super().update(layer_id, xk, xv)
        self.k[layer_id].index_copy_(2, self.column, xk)
        self.v[layer_id].index_copy_(2, self.column, xv)
        return self.k[layer_id], self.v[layer_id]


# 编译解码的批大小档位：批量补齐到不小于它的最小一档，每档只编译一次（CUDA 上录一张 CUDA graph），
# 也只占一份 StaticKVCache。7 档，少于 torch._dynamo 的重编译上限（recompile_limit，默认 8，记在 decode_step
# 的代码上、同一进程的模型共用；fullgraph=True 时超过上限就报错，而不是退回 eager）。更大的批量用 eager 解码：那时每一步都是大矩阵乘，
# CUDA graphs 省下的 kernel 启动时间微不足道，不值得再编译一张图、再分配一份缓存。
DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# 编译解码步用的 torch.compile 后端。默认 inductor（CUDA 上加 CUDA graphs）；测试换成只数图、不生成代码的后端，
# 免得每张图都在 CPU 上编译好几秒。
DECODE_BACKEND = "inductor"


def decode_bucket(batch: int) -> Optional[int]:
    """批量所在的档位：不小于 batch 的最小一档；比最大一档还大时为 None（走 eager 解码）。"""
    return next((b for b in DECODE_BUCKETS if b >= batch), None)


def cast_for_inference(model: "Transformer", dtype: torch.dtype) -> "Transformer":
    """推理前把权重转成给定的 dtype（如 bf16），但 RoPE 表保持 float32。

    The weights (and so the KV cache) in `dtype` for generation; the RoPE tables stay in
    float32, where apply_rotary_emb computes (rounded to bf16, far positions get wrong angles)."""
    model.to(dtype)
    model.freqs_cos, model.freqs_sin = precompute_freqs_cis(model.args.dim // model.args.n_heads,
                                                            model.args.max_seq_len, model.args.rope_theta)
    model.freqs_cos, model.freqs_sin = model.freqs_cos.to(model.device), model.freqs_sin.to(model.device)
    return model


def check_sampling(temperature, top_k=None, top_p=None, repetition_penalty=1.0) -> None:
    """拒绝会采样出无意义结果的设置（负温度会偏向最不可能的 token）。"""
    if temperature < 0:
        raise ValueError(f"temperature {temperature} < 0; use 0 for greedy, about 0.7 to sample")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k {top_k} < 0; 0 (or None) turns it off")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p {top_p} is outside (0, 1]; 1 turns it off")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty {repetition_penalty} <= 0; 1 turns it off")


def apply_repetition_penalty(logits, context, context_mask, penalty, exempt=None):
    """重复惩罚：降低上下文里已出现过的 token 的概率，让生成的内容少重复。

    Make tokens already in the context less likely (CTRL): positive logits / penalty,
    negative ones * penalty. Padding (context_mask 0) does not count, nor the `exempt` ids
    (the stop tokens: every chat prompt holds <|im_end|>, and answers must still end)."""
    counts = torch.zeros_like(logits).scatter_add_(1, context, context_mask.to(logits.dtype))
    if exempt is not None and len(exempt):
        counts[:, exempt] = 0
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)


def top_k_filter(logits, k):
    """Top-k 采样：每行只保留最大的 k 个 logits，其余置为 -inf（概率变成 0）。"""
    kth = torch.topk(logits, min(k, logits.size(-1))).values[:, [-1]]  # 每行第 k 大的值作门槛
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Top-p（核采样）：只保留概率累计达到 p 的最少一组最可能的 token。

    Keep the smallest set of most likely tokens whose probability reaches p (nucleus)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    remove = probs.cumsum(-1) - probs >= p  # the tokens before this one already reach p
    remove[:, 0] = False  # the most likely token always stays (p <= 0 would leave nothing)
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


class NonFiniteLogitsError(RuntimeError):
    """logits 里出现了 NaN 或 inf，无从采样（多半是 fp16 的前向上溢了）。

    Logits holding NaN or inf: no token can be sampled. Raised in Python, never left to
    torch.multinomial, whose device-side assert would end the process's CUDA context."""

    def __init__(self, dtype: torch.dtype):
        hint = ("float16 overflows past 65504: run the model in bfloat16 or float32 (--dtype bfloat16 or "
                "--dtype float32)" if dtype == torch.float16 else "do the weights hold NaN or inf?")
        super().__init__(f"the model's logits ({str(dtype).replace('torch.', '')}) hold NaN or inf, "
                         f"so no token can be sampled; {hint}")


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                      context=None, context_mask=None, generator=None, banned=None, exempt=None, check_finite=True):
    """从 (batch, vocab) 的 logits 为每行选出一个 token id；temperature 为 0 时贪婪解码（5.6.1 的采样步骤）。

    check_finite：logits 里有 NaN/inf 就抛出 NonFiniteLogitsError，而不是让 NaN 进入 multinomial（CUDA 上那是
    设备端断言）；检查要与设备同步一次。generate_stream 传入 False：它自己把坏行挡在外面，并把检查并进每步已有的那次同步。
    """
    if check_finite and not torch.isfinite(logits).all():
        raise NonFiniteLogitsError(logits.dtype)
    logits = logits.float()  # 采样计算统一用 fp32
    if repetition_penalty != 1.0 and context is not None:
        mask = context_mask if context_mask is not None else torch.ones_like(context)
        logits = apply_repetition_penalty(logits, context, mask, repetition_penalty, exempt)
    if banned is not None and len(banned):
        logits = logits.index_fill(1, banned, float("-inf"))  # 被禁止的 token（如过早的停止 token）概率为 0
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)  # 贪婪解码：直接取最可能的 token
    logits = logits / temperature  # 温度：小于 1 分布更尖、更确定，大于 1 更平、更随机
    if top_k is not None and top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    # 转成概率后按概率随机抽一个
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """对 target 不是 IGNORE_INDEX 的位置，求下一个 token 预测损失的平均值。

    章节把一个已经求过平均的损失再乘以逐 token 的 mask；这里 mask 放在标签里。整批都被忽略时
    得到 0（而不是普通均值给出的 NaN），也没有梯度。
    """
    # 先对计入的位置求和，再除以它们的个数；clamp 保证分母至少为 1
    loss_sum = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    n_tokens = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return loss_sum / n_tokens


def load_model(path: str, config=None, **kwargs) -> Transformer:
    """严格加载 save_pretrained 保存的目录，结构或权重对不上就报错。

    Load a save_pretrained directory strictly: every weight must be present and fit.

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
    """可训练参数的个数，共享的词嵌入只算一次。"""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
