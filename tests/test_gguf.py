"""GGUF export for llama.cpp and ollama: every tensor against the Hugging Face export (q/k rows
in llama.cpp's layout), the type of each tensor per --outtype, the metadata llama.cpp reads,
the ollama Modelfile, and one-line errors. Running the file in llama.cpp is tests/gguf_check.py."""
import json
import os
import re
import subprocess
import sys

import gguf  # in requirements.txt: a missing gguf fails here rather than skipping the file
import numpy as np
import pytest
import torch

from conftest import CODE

T = gguf.GGMLQuantizationType

N_LAYERS, N_HEADS, N_KV_HEADS, DIM, FFN = 2, 4, 2, 64, 80  # FFN rows of 80: not whole q8_0 blocks of 32


@pytest.fixture(scope="module")
def exported(tokenizer, tokenizer_dir, tmp_path_factory):
    """A random Tiny-K model, its Hugging Face export, and its GGUF in each outtype."""
    import shutil

    import export_model
    from k_model import ModelConfig, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=DIM, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS,
                                    hidden_dim=FFN, vocab_size=len(tokenizer), max_seq_len=96, norm_eps=1e-6,
                                    rope_theta=5e4))
    with torch.no_grad():  # distinct weights everywhere, norms included
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("gguf")
    model.save_pretrained(str(out / "tiny_k"))
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), out / "tiny_k")
    export_model.main(["--checkpoint", str(out / "tiny_k"), "--save_dir", str(out / "hf")])
    for outtype in ("f32", "f16", "q8_0"):
        export_model.main(["--checkpoint", str(out / "tiny_k"), "--gguf", str(out / outtype / "tiny.gguf"),
                           "--outtype", outtype])
    return out


def hf_weights(exported):
    from safetensors.torch import load_file
    return {k: v.float().numpy() for k, v in load_file(str(exported / "hf" / "model.safetensors")).items()}


def halves_to_pairs(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Hugging Face q/k rows: per head, rows (i, i + head_dim/2)
    become neighbours (2i, 2i+1) again, the layout its llama architecture rotates."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def expected_tensors(exported):
    """GGUF name -> the float32 weight llama.cpp's converter would write from the Hugging Face export."""
    hf = hf_weights(exported)
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(N_LAYERS):
        for hf_name, name in names.items():
            w = hf[f"model.layers.{i}.{hf_name}.weight"]
            if name in ("attn_q", "attn_k"):
                w = halves_to_pairs(w, N_HEADS if name == "attn_q" else N_KV_HEADS)
            out[f"blk.{i}.{name}.weight"] = w
    return out


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_every_tensor_matches_the_hugging_face_export(exported, outtype):
    reader = gguf.GGUFReader(str(exported / outtype / "tiny.gguf"))
    expected = expected_tensors(exported)
    tensors = {t.name: t for t in reader.tensors}
    # no output.weight: llama.cpp's llama architecture then uses token_embd, the tie Tiny-K has
    assert set(tensors) == set(expected)
    quantized = 0
    for name, t in tensors.items():
        want = expected[name]
        assert tuple(int(n) for n in reversed(t.shape)) == want.shape, name  # GGUF lists dimensions reversed
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if want.ndim == 1 or outtype == "f32":  # norms stay f32 in every outtype
            assert t.tensor_type == T.F32, name
            np.testing.assert_array_equal(got, want, err_msg=name)
        elif outtype == "f16" or want.shape[1] % 32:  # q8_0 needs rows of whole 32-weight blocks
            assert t.tensor_type == T.F16, name
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
        else:
            assert t.tensor_type == T.Q8_0, name
            quantized += 1
            # within half a step of each block's 8-bit grid (step = block max / 127), plus the
            # rounding of the step itself to f16 (at most 2**-11 of it, times 127 steps)
            step = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            error = np.abs(got - want).reshape(-1, 32)
            assert (error <= step * (0.5 + 127 / 2048)).all(), name
            assert not np.array_equal(got, want), name  # really 8 bits
    if outtype == "q8_0":
        # token_embd and each layer's q, k, v, output, gate, up: not ffn_down's rows of 80, not the norms
        assert quantized == 1 + N_LAYERS * 6


def field(reader, key):
    return reader.fields[key].contents()


def test_metadata_is_what_llama_cpp_reads(exported, tokenizer, tokenizer_dir):
    reader = gguf.GGUFReader(str(exported / "f16" / "tiny.gguf"))
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    hf = json.loads((exported / "hf" / "config.json").read_text())
    for key, value in {"context_length": hf["max_position_embeddings"], "embedding_length": hf["hidden_size"],
                       "block_count": hf["num_hidden_layers"], "feed_forward_length": hf["intermediate_size"],
                       "attention.head_count": hf["num_attention_heads"],
                       "attention.head_count_kv": hf["num_key_value_heads"],
                       "rope.dimension_count": hf["hidden_size"] // hf["num_attention_heads"],
                       "vocab_size": hf["vocab_size"]}.items():
        assert field(reader, f"llama.{key}") == value, key
    assert (hf["max_position_embeddings"], hf["intermediate_size"]) == (96, FFN)
    assert field(reader, "llama.rope.freq_base") == 5e4 == hf["rope_parameters"]["rope_theta"]
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6, rel=1e-6)

    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    assert len(special) == 5
    types = field(reader, "tokenizer.ggml.token_type")
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == sorted(special)
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types) if i not in special)
    ids = {name: field(reader, f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "eot", "unknown", "padding")}
    assert ids == {"bos": tokenizer.convert_tokens_to_ids("<s>"), "eos": tokenizer.convert_tokens_to_ids("<|im_end|>"),
                   "eot": tokenizer.convert_tokens_to_ids("</s>"), "unknown": tokenizer.unk_token_id,
                   "padding": tokenizer.pad_token_id}
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    assert "<|im_start|>" in tokenizer.chat_template

    # vocabulary and merges alone rebuild the tokenizer: same ids as the Hugging Face one
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    merges = field(reader, "tokenizer.ggml.merges")
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        assert len(merges) == len(json.load(f)["model"]["merges"]) > 0
    rebuilt = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rebuilt.decoder = decoders.ByteLevel()
    for text in ["今天天气很好，我们去公园散步。", "Hello, how are you today?", "新年好 hello 123"]:
        assert rebuilt.encode(text).ids == tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_a_model_vocabulary_larger_than_the_tokenizer_is_padded(tokenizer, tokenizer_dir):
    from export_model import gguf_vocab
    tokens, types, _ = gguf_vocab(tokenizer, tokenizer_dir, len(tokenizer) + 3)
    assert tokens[-3:] == [f"[PAD{len(tokenizer) + i}]" for i in range(3)]
    assert types[-3:] == [gguf.TokenType.UNUSED] * 3 and gguf.TokenType.UNUSED not in types[:-3]
    with pytest.raises(ValueError, match=f"{len(tokenizer)} tokens, the model only {len(tokenizer) - 1}"):
        gguf_vocab(tokenizer, tokenizer_dir, len(tokenizer) - 1)


def render_ollama_template(template: str, messages) -> str:
    """Just enough of Go's text/template for the Modelfile: {{- range .Messages }}...{{ end }}
    with {{ .Role }} and {{ .Content }} inside. Anything else fails the test."""
    loop = re.fullmatch(r"\{\{- range \.Messages \}\}(.*?)\{\{ end \}\}(.*)", template, re.S)
    assert loop, template
    body, after = loop.groups()
    out = "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages)
    assert "{{" not in out + after
    return out + after


def test_modelfile_writes_the_chat_template_for_ollama(exported, tokenizer):
    text = (exported / "q8_0" / "Modelfile").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "FROM ./tiny.gguf" and (exported / "q8_0" / "tiny.gguf").is_file()
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER num_ctx 96" in lines
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.M).group(1)
    from train_tokenizer import SYSTEM_PROMPT
    assert system == SYSTEM_PROMPT
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
            {"role": "user", "content": "写一首诗"}]
    # ollama puts SYSTEM first when a chat has no system turn; the chat template does the same
    for messages, shown in ((chat, [{"role": "system", "content": system}] + chat),
                            ([{"role": "system", "content": "你是诗人"}] + chat, None)):
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_ollama_template(template, shown or messages) == want


def run(*args):
    return subprocess.run([sys.executable, os.path.join(CODE, "export_model.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_bad_outtype_and_missing_checkpoint_stop_with_one_line(tmp_path, capsys):
    import export_model  # in this process: the same exits as from the command line, without two interpreter starts
    with pytest.raises(SystemExit) as exit_:
        export_model.main(["--gguf", str(tmp_path / "x.gguf"), "--outtype", "q4_0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid choice: 'q4_0'" in err and "q8_0" in err
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(SystemExit) as exit_:  # a SystemExit with a message: one line on stderr, status 1
        export_model.main(["--checkpoint", missing, "--gguf", str(tmp_path / "x.gguf")])
    message = str(exit_.value.code)
    assert message.startswith("error:") and "\n" not in message.strip() and missing in message
    assert not (tmp_path / "x.gguf").exists()
