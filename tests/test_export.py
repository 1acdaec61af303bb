"""Export to a standard Hugging Face Llama: same logits in a fresh process, exact round trip,
the tokenizer's chat template, and generation that stops at <|im_end|>."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch


@pytest.fixture
def tiny_k_dir(tokenizer, tokenizer_dir, tmp_path):
    from k_model import ModelConfig, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(tokenizer),
                                    max_seq_len=128, norm_eps=1e-6, rope_theta=5e4))
    with torch.no_grad():  # distinct, non-trivial weights everywhere, norms included
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    out = tmp_path / "tiny_k"
    model.save_pretrained(str(out))
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), out)
    return str(out)


def test_rope_row_permutation_round_trips():
    from model_io import halves_to_interleaved, interleaved_to_halves
    w = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)  # 2 heads of head_dim 4
    halves = interleaved_to_halves(w, 2)
    # head 0 rows (0, 1, 2, 3) = pairs (0,1), (2,3) -> evens first, then odds: 0, 2, 1, 3
    assert halves[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]
    assert torch.equal(halves_to_interleaved(halves, 2), w)


def test_export_loads_in_a_fresh_process_with_the_same_logits(tiny_k_dir, tmp_path):
    import export_model
    from k_model import load_model
    hf_dir = tmp_path / "hf"
    export_model.main(["--checkpoint", tiny_k_dir, "--save_dir", str(hf_dir)])
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(hf_dir))
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config

    tokens = torch.randint(5, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")
    script = f"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}, dtype=torch.float32).eval()
tokens = torch.load({str(tmp_path / 'tokens.pt')!r})
with torch.no_grad():
    torch.save(model(tokens).logits, {str(tmp_path / 'hf_logits.pt')!r})
    greedy = model.generate(tokens[:1, :10], max_new_tokens=12, do_sample=False, eos_token_id=None)
torch.save(greedy[:, 10:], {str(tmp_path / 'hf_greedy.pt')!r})
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
    assert run.returncode == 0, run.stderr[-2000:]
    ours = load_model(tiny_k_dir).eval()
    with torch.no_grad():
        our_logits = ours(tokens, targets=torch.zeros_like(tokens)).logits
    torch.testing.assert_close(torch.load(tmp_path / "hf_logits.pt"), our_logits, atol=1e-4, rtol=1e-4)
    ours_greedy = ours.generate(tokens[:1, :10], max_new_tokens=12, temperature=0.0)
    assert torch.equal(torch.load(tmp_path / "hf_greedy.pt"), ours_greedy)


def test_round_trip_back_to_tiny_k_is_exact(tiny_k_dir, tmp_path):
    import export_model
    from k_model import load_model
    export_model.main(["--checkpoint", tiny_k_dir, "--save_dir", str(tmp_path / "hf")])
    export_model.main(["--to_tiny_k", "--checkpoint", str(tmp_path / "hf"), "--save_dir", str(tmp_path / "back")])
    a, b = load_model(tiny_k_dir), load_model(str(tmp_path / "back"))
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "max_seq_len", "rope_theta"):
        assert getattr(a.config, field) == getattr(b.config, field), field
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_exported_tokenizer_renders_the_chat_and_generation_stops_at_im_end(tiny_k_dir, tmp_path):
    import export_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    export_model.main(["--checkpoint", tiny_k_dir, "--save_dir", str(tmp_path / "hf")])
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>system\n你是一个AI助手<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id
    # make <|im_end|> the most likely next token everywhere: generation must stop right there
    with torch.no_grad():
        model.lm_head.weight[im_end] = model.model.norm.weight.sign() * 50
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    assert out[0, -1].item() == im_end and out.shape[1] == ids["input_ids"].shape[1] + 1


def test_a_training_checkpoint_file_exports_too(tiny_k_dir, tmp_path):
    import export_model
    from k_model import load_model
    model = load_model(tiny_k_dir)
    path = tmp_path / "step_00000001.pt"
    torch.save({"model": model.state_dict(), "optimizer": {}, "scaler": {}, "step": 1, "epoch": 0,
                "batch_in_epoch": 1, "rng": [], "config": model.config.to_dict(), "tokenizer_sha256": "",
                "world_size": 1}, path)
    export_model.main(["--checkpoint", str(path), "--tokenizer_path", tiny_k_dir, "--save_dir", str(tmp_path / "hf")])
    export_model.main(["--to_tiny_k", "--checkpoint", str(tmp_path / "hf"), "--save_dir", str(tmp_path / "back")])
    back = load_model(str(tmp_path / "back")).state_dict()
    assert all(torch.equal(v, back[k]) for k, v in model.state_dict().items())
    with pytest.raises(SystemExit, match="unreadable checkpoint"):
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
        export_model.main(["--checkpoint", str(tmp_path / "bad.pt"), "--tokenizer_path", tiny_k_dir,
                           "--save_dir", str(tmp_path / "hf2")])
