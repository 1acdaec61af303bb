"""Behaviour of code/k_model.py: RoPE, GQA, attention paths, loss, init, save/load, generate."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from k_model import (IGNORE_INDEX, MLP, ModelConfig, Transformer, apply_rotary_emb, load_model,
                     masked_cross_entropy, precompute_freqs_cis, repeat_kv)


def make_model(config, seed=0, std=None):
    """A model in eval mode; with `std`, every matrix is redrawn from N(0, std): the default init
    is so small that a fresh model just repeats its last token, which makes generation tests moot."""
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, std)
    return model


def small_config(**overrides):
    kwargs = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def full_logits(model, tokens):
    """Logits of every position (forward only returns them all when targets are given)."""
    return model(tokens, tokens).logits


# ---------------------------------------------------------------- RoPE

def rope_reference(x, theta=10000.0, positions=None):
    """Rotate (x[2i], x[2i+1]) as the complex number x[2i] + j x[2i+1] by pos * theta^(-2i/d), in float64."""
    _b, seq, _h, d = x.shape
    pos = torch.arange(seq, dtype=torch.float64) if positions is None else positions.double()
    inv_freq = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    angles = pos[:, None] * inv_freq[None, :]  # (seq, d/2)
    rot = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).flatten(3)


def test_precompute_freqs_cis_shapes_and_position_zero():
    cos, sin = precompute_freqs_cis(16, 10)
    assert cos.shape == (10, 8) and sin.shape == (10, 8)
    assert torch.equal(cos[0], torch.ones(8)) and torch.equal(sin[0], torch.zeros(8))
    # position 1, pair i: angle theta^(-2i/d)
    expected = torch.tensor([10000.0 ** (-2 * i / 16) for i in range(8)])
    torch.testing.assert_close(cos[1], torch.cos(expected))
    torch.testing.assert_close(sin[1], torch.sin(expected))


def test_precompute_freqs_cis_uses_theta():
    cos_a, _ = precompute_freqs_cis(8, 4, theta=10000.0)
    cos_b, sin_b = precompute_freqs_cis(8, 4, theta=500.0)
    assert not torch.allclose(cos_a[1:], cos_b[1:])
    expected = torch.tensor([3 * 500.0 ** (-2 * i / 8) for i in range(4)])
    torch.testing.assert_close(sin_b[3], torch.sin(expected))


@pytest.mark.parametrize("theta", [10000.0, 100.0])
def test_apply_rotary_emb_matches_complex_multiplication(theta):
    torch.manual_seed(0)
    bsz, seq, d = 2, 7, 8
    xq = torch.randn(bsz, seq, 4, d)
    xk = torch.randn(bsz, seq, 2, d)  # fewer kv heads, as under GQA
    cos, sin = precompute_freqs_cis(d, seq, theta)
    q_out, k_out = apply_rotary_emb(xq, xk, cos, sin)
    assert q_out.shape == xq.shape and k_out.shape == xk.shape
    assert q_out.dtype == xq.dtype
    torch.testing.assert_close(q_out.double(), rope_reference(xq, theta), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out.double(), rope_reference(xk, theta), atol=1e-5, rtol=1e-5)


def test_apply_rotary_emb_position_zero_is_identity_and_norm_preserved():
    torch.manual_seed(1)
    xq, xk = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    cos, sin = precompute_freqs_cis(8, 5)
    q_out, k_out = apply_rotary_emb(xq, xk, cos, sin)
    torch.testing.assert_close(q_out[:, 0], xq[:, 0])
    torch.testing.assert_close(k_out[:, 0], xk[:, 0])
    assert not torch.allclose(q_out[:, 1:], xq[:, 1:])
    # a rotation keeps the length of every pair
    pairs_in = xq.reshape(1, 5, 2, 4, 2).norm(dim=-1)
    pairs_out = q_out.reshape(1, 5, 2, 4, 2).norm(dim=-1)
    torch.testing.assert_close(pairs_out, pairs_in)


def test_rope_score_depends_only_on_relative_position():
    torch.manual_seed(2)
    d, seq = 16, 40
    q, k = torch.randn(d), torch.randn(d)
    xq = q.expand(1, seq, 1, d).contiguous()
    xk = k.expand(1, seq, 1, d).contiguous()
    cos, sin = precompute_freqs_cis(d, seq)
    rq, rk = apply_rotary_emb(xq, xk, cos, sin)
    rq, rk = rq[0, :, 0].double(), rk[0, :, 0].double()

    def score(m, n):
        return torch.dot(rq[m], rk[n]).item()

    for m, n in [(5, 2), (3, 9), (0, 0), (12, 1)]:
        for shift in (1, 7, 20):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)
    # ... and does depend on the relative position
    assert abs(score(5, 2) - score(5, 3)) > 1e-3


# ---------------------------------------------------------------- repeat_kv

def test_repeat_kv_shape_and_head_mapping():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, 5)
    out = repeat_kv(x, 3)
    assert out.shape == (2, 3, 6, 5)
    for h in range(6):
        assert torch.equal(out[:, :, h], x[:, :, h // 3])


def test_repeat_kv_n_rep_one_returns_input():
    x = torch.randn(1, 4, 3, 2)
    assert torch.equal(repeat_kv(x, 1), x)


# ---------------------------------------------------------------- attention

def test_attention_matches_independent_reference():
    """One Attention module against a from-scratch GQA attention (RoPE via complex numbers)."""
    cfg = small_config(n_heads=4, n_kv_heads=2)
    model = make_model(cfg)
    attn = model.layers[0].attention
    torch.manual_seed(3)
    bsz, seq, dim, hd = 2, 6, cfg.dim, cfg.dim // cfg.n_heads
    x = torch.randn(bsz, seq, dim)
    with torch.no_grad():
        out = attn(x, model.freqs_cos[:seq], model.freqs_sin[:seq])

        xd = x.double()
        q = (xd @ attn.wq.weight.double().T).view(bsz, seq, 4, hd)
        k = (xd @ attn.wk.weight.double().T).view(bsz, seq, 2, hd)
        v = (xd @ attn.wv.weight.double().T).view(bsz, seq, 2, hd)
        q, k = rope_reference(q), rope_reference(k)
        k = k.repeat_interleave(2, dim=2)  # query head h uses kv head h // 2
        v = v.repeat_interleave(2, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        ctx = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(bsz, seq, dim)
        expected = ctx @ attn.wo.weight.double().T
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_sdpa_path_equals_manual_path(n_kv_heads):
    flash = make_model(small_config(n_kv_heads=n_kv_heads, flash_attn=True), std=0.3)
    manual = Transformer(small_config(n_kv_heads=n_kv_heads, flash_attn=False)).eval()
    assert flash.layers[0].attention.flash and not manual.layers[0].attention.flash
    manual.load_state_dict(flash.state_dict())
    torch.manual_seed(4)
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        a, b = full_logits(flash, tokens), full_logits(manual, tokens)
    assert a.shape == (2, 20, 97)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("flash_attn", [True, False])
def test_causality_later_token_does_not_change_earlier_logits(flash_attn):
    model = make_model(small_config(flash_attn=flash_attn), std=0.3)
    torch.manual_seed(5)
    tokens = torch.randint(0, 97, (1, 12))
    changed = tokens.clone()
    changed[0, 8] = (tokens[0, 8] + 1) % 97
    with torch.no_grad():
        a, b = full_logits(model, tokens), full_logits(model, changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_forward_without_targets_returns_last_position_only():
    model = make_model(small_config())
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        out = model(tokens)
        full = full_logits(model, tokens)
    assert out.loss is None
    assert out.logits.shape == (2, 1, 97)
    torch.testing.assert_close(out.logits[:, 0], full[:, -1])


def test_forward_all_logits_returns_every_position_without_a_loss():
    model = make_model(small_config())
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        out = model(tokens, all_logits=True)
    assert out.loss is None and out.logits.shape == (2, 9, 97)
    torch.testing.assert_close(out.logits, full_logits(model, tokens), rtol=0, atol=0)


def test_forward_rejects_sequence_longer_than_max_seq_len():
    model = make_model(small_config(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    model(torch.zeros(1, 16, dtype=torch.long))  # exactly max_seq_len is fine


# ---------------------------------------------------------------- loss

def hand_loss(logits, targets):
    logp = torch.log_softmax(logits.double(), dim=-1)
    keep = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked[keep]).sum() / keep.sum()


def test_model_loss_averages_over_non_ignored_targets_only():
    model = make_model(small_config())
    torch.manual_seed(6)
    tokens = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    targets[0, 6:] = IGNORE_INDEX  # rows with different numbers of ignored positions
    targets[1, :2] = IGNORE_INDEX
    out = model(tokens, targets)
    assert out.logits.shape == (2, 10, 97)
    expected = hand_loss(out.logits.detach(), targets)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # it is not the mean over all positions (ignored ones counted as zero loss)
    all_pos = hand_loss(out.logits.detach(), targets) * (targets != IGNORE_INDEX).sum() / targets.numel()
    assert out.loss.item() != pytest.approx(all_pos.item(), rel=1e-3)


def test_all_ignored_targets_give_zero_loss_and_zero_gradients():
    model = make_model(small_config())
    model.train()
    tokens = torch.randint(0, 97, (2, 8))
    targets = torch.full((2, 8), IGNORE_INDEX)
    loss = model(tokens, targets).loss
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is None or (torch.isfinite(g).all() and g.abs().max() == 0) for g in grads)


def test_masked_cross_entropy_directly():
    torch.manual_seed(7)
    logits = torch.randn(3, 5, 11)
    targets = torch.randint(0, 11, (3, 5))
    targets[0, :4] = IGNORE_INDEX
    targets[2, 3] = IGNORE_INDEX
    loss = masked_cross_entropy(logits, targets)
    assert loss.item() == pytest.approx(hand_loss(logits, targets).item(), rel=1e-5)
    ref = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    zero = masked_cross_entropy(logits, torch.full_like(targets, IGNORE_INDEX))
    assert zero.item() == 0.0


def test_masked_cross_entropy_gradient_only_on_kept_positions():
    torch.manual_seed(8)
    logits = torch.randn(1, 4, 6, requires_grad=True)
    targets = torch.tensor([[1, IGNORE_INDEX, 3, IGNORE_INDEX]])
    masked_cross_entropy(logits, targets).backward()
    assert logits.grad[0, 1].abs().max() == 0 and logits.grad[0, 3].abs().max() == 0
    assert logits.grad[0, 0].abs().max() > 0 and logits.grad[0, 2].abs().max() > 0


# ---------------------------------------------------------------- init and architecture

def test_init_std_scaled_for_residual_projections_and_tied_embeddings():
    n_layers = 2
    model = make_model(ModelConfig(dim=256, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=300,
                                   max_seq_len=8))
    residual_std = 0.02 / math.sqrt(2 * n_layers)
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            expected = residual_std if name.endswith(("wo", "w3")) else 0.02
            std = module.weight.std().item()
            assert std == pytest.approx(expected, rel=0.15), name
            assert abs(module.weight.mean().item()) < expected * 0.1, name
            checked += 1
    assert checked == 1 + n_layers * 7  # output + (wq wk wv wo w1 w2 w3) per layer
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert model.output.weight is model.tok_embeddings.weight
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name


def test_mlp_hidden_dim_rule():
    dim, multiple_of = 256, 64
    rule = int(2 * (4 * dim) / 3)
    expected = multiple_of * math.ceil(rule / multiple_of)
    mlp = MLP(dim, None, multiple_of, 0.0)
    assert mlp.w1.weight.shape == (expected, dim)
    assert mlp.w2.weight.shape == (expected, dim)
    assert mlp.w3.weight.shape == (dim, expected)
    assert expected % multiple_of == 0 and expected >= rule
    explicit = MLP(dim, 100, multiple_of, 0.0)
    assert explicit.w1.weight.shape == (100, dim) and explicit.w3.weight.shape == (dim, 100)


def test_config_hidden_dim_reaches_every_layer():
    model = make_model(small_config(hidden_dim=48))
    for layer in model.layers:
        assert layer.feed_forward.w1.out_features == 48


# ---------------------------------------------------------------- save / load

@pytest.mark.parametrize("flash_attn", [True, False])
def test_save_and_load_round_trip(tmp_path, flash_attn):
    cfg = small_config(flash_attn=flash_attn, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = make_model(cfg, std=0.3)
    model.save_pretrained(str(tmp_path))
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json"} <= files

    loaded = load_model(str(tmp_path)).eval()
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of",
                  "norm_eps", "max_seq_len", "rope_theta", "flash_attn", "pad_token_id", "bos_token_id",
                  "eos_token_id"):
        assert getattr(loaded.config, field) == getattr(cfg, field), field
    assert loaded.output.weight is loaded.tok_embeddings.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # non-persistent buffers are rebuilt, not left uninitialised
    torch.testing.assert_close(loaded.freqs_cos, precompute_freqs_cis(8, 32)[0])
    torch.testing.assert_close(loaded.freqs_sin, precompute_freqs_cis(8, 32)[1])
    if not flash_attn:
        n = cfg.max_seq_len
        above = torch.ones(n, n, dtype=torch.bool).triu(1)
        for layer in loaded.layers:
            mask = layer.attention.mask[0, 0]
            assert mask.shape == (n, n)
            assert torch.isneginf(mask[above]).all()
            assert (mask[~above] == 0).all()
    torch.manual_seed(9)
    tokens = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        assert torch.equal(full_logits(model, tokens), full_logits(loaded, tokens))


def test_tied_weights_stay_tied_after_training_step_and_reload(tmp_path):
    model = make_model(small_config())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tokens = torch.randint(0, 97, (2, 8))
    model(tokens, tokens).loss.backward()
    opt.step()
    model.save_pretrained(str(tmp_path))
    loaded = load_model(str(tmp_path))
    assert loaded.output.weight is loaded.tok_embeddings.weight
    assert torch.equal(loaded.tok_embeddings.weight, model.tok_embeddings.weight)


def test_load_model_without_config_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_model(str(tmp_path))


def test_load_model_with_different_requested_config_raises(tmp_path):
    make_model(small_config()).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="dim"):
        load_model(str(tmp_path), small_config(dim=64))
    # the same architecture (flash_attn is not architecture) loads
    loaded = load_model(str(tmp_path), small_config(flash_attn=False))
    assert loaded.config.dim == 32


def test_load_model_with_dict_of_expected_fields(tmp_path):
    make_model(small_config()).save_pretrained(str(tmp_path))
    assert load_model(str(tmp_path), {"dim": 32, "n_layers": 2}).config.n_layers == 2
    with pytest.raises(ValueError) as exc:
        load_model(str(tmp_path), {"n_layers": 3, "vocab_size": 50})
    assert "n_layers" in str(exc.value) and "vocab_size" in str(exc.value)
    assert str(tmp_path) in str(exc.value)
    with pytest.raises(ValueError, match="not architecture fields.*flash_attn"):
        load_model(str(tmp_path), {"flash_attn": False})


def test_load_model_with_missing_weight_raises(tmp_path):
    from safetensors.torch import load_file, save_file
    make_model(small_config()).save_pretrained(str(tmp_path))
    path = os.path.join(tmp_path, "model.safetensors")
    weights = load_file(path)
    key = "layers.1.feed_forward.w2.weight"
    assert key in weights
    del weights[key]
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="w2"):
        load_model(str(tmp_path))


# ---------------------------------------------------------------- generate

def greedy_reference(model, idx, n):
    seq = idx
    with torch.no_grad():
        for _ in range(n):
            nxt = full_logits(model, seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[:, idx.shape[1]:]


def test_generate_greedy_matches_argmax_loop():
    model = make_model(small_config(), std=0.3)
    torch.manual_seed(10)
    prompt = torch.randint(3, 97, (2, 5))
    out = model.generate(prompt, max_new_tokens=7, temperature=0.0)
    assert out.shape == (2, 7)
    assert torch.equal(out, greedy_reference(model, prompt, 7))


def test_generate_stop_id_first_token_returns_empty():
    model = make_model(small_config(), std=0.3)
    prompt = torch.tensor([[5, 9, 13, 2 + 20]])
    first = greedy_reference(model, prompt, 1)[0, 0].item()
    out = model.generate(prompt, stop_id=first, max_new_tokens=5, temperature=0.0)
    assert out.shape == (1, 0)


def test_generate_stops_at_stop_id_without_returning_it():
    model = make_model(small_config(), std=0.3)
    prompt = torch.tensor([[7, 8, 9]])
    ref = greedy_reference(model, prompt, 8)[0].tolist()
    stop = ref[4]
    k = ref.index(stop)  # first time the stop token would be produced
    assert k >= 2, ref  # the test needs a few tokens before the stop
    out = model.generate(prompt, stop_id=stop, max_new_tokens=8, temperature=0.0)
    assert out[0].tolist() == ref[:k]


def test_generate_top_k_one_equals_greedy():
    model = make_model(small_config(), std=0.3)
    prompt = torch.tensor([[4, 40, 60], [11, 12, 13]])
    torch.manual_seed(11)
    sampled = model.generate(prompt, max_new_tokens=6, temperature=1.0, top_k=1)
    assert torch.equal(sampled, greedy_reference(model, prompt, 6))


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_generate_never_grows_past_max_seq_len(use_kv_cache):
    model = make_model(small_config(max_seq_len=16), std=0.3)
    prompt = torch.randint(3, 97, (1, 12))
    out = model.generate(prompt, max_new_tokens=10, temperature=0.0, use_kv_cache=use_kv_cache)
    assert out.shape == (1, 4)  # cut to what fits in 16 positions
    assert torch.equal(out, greedy_reference(model, prompt, 4))
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        model.generate(torch.randint(3, 97, (1, 17)), max_new_tokens=1, use_kv_cache=use_kv_cache)


@pytest.mark.parametrize("stop_from", [(0, 0), (1, 2), (0, 3)])
def test_generate_batch_pads_finished_rows_with_stop_id(stop_from):
    model = make_model(small_config(), std=0.3)
    prompt = torch.tensor([[7, 8, 9], [30, 31, 32]])
    max_new = 6
    ref = greedy_reference(model, prompt, max_new).tolist()
    assert ref[0] != ref[1]
    stop = ref[stop_from[0]][stop_from[1]]
    firsts = [row.index(stop) if stop in row else None for row in ref]
    length = max(firsts) if None not in firsts else max_new  # stops once every row has finished
    expected = [row[:k] + [stop] * (length - k) if k is not None else row[:length]
                for row, k in zip(ref, firsts)]
    out = model.generate(prompt, stop_id=stop, max_new_tokens=max_new, temperature=0.0)
    assert out.tolist() == expected
