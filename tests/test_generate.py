"""Inference: KV cache against the chapter's loop, ragged batches, sampling filters, stops,
compiled decoding in batch buckets with one reused cache per bucket, NaN/inf logits stopped before
sampling (and answered with a 500 by the server), streaming decode, the chat prompt's context
policy, and the interactive chat."""
import io
import os
import subprocess
import sys

import pytest
import torch

import k_model
from conftest import CODE
from k_model import (ModelConfig, NonFiniteLogitsError, Transformer, apply_repetition_penalty, cast_for_inference,
                     sample_next_token, top_k_filter, top_p_filter)


def peaky_model(vocab_size=97, max_seq_len=64, seed=0):
    """A random model with large weights: its logits have clear winners, so greedy paths are stable."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                                    max_seq_len=max_seq_len))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("flash", [True, False])
def test_kv_cache_greedy_equals_the_chapter_loop(flash):
    model = peaky_model()
    if not flash:  # the same weights through the manual attention path (mask buffer, repeat_kv)
        manual = Transformer(ModelConfig(**{**model.config.to_dict(), "flash_attn": False})).eval()
        manual.load_state_dict(model.state_dict())
        assert not manual.layers[0].attention.flash
        model = manual
    prompt = torch.randint(5, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt, max_new_tokens=40, temperature=0.0, use_kv_cache=True)
    uncached = model.generate(prompt, max_new_tokens=40, temperature=0.0, use_kv_cache=False)
    assert cached.shape == (1, 40)
    assert torch.equal(cached, uncached)


def left_pad(prompts, pad=0):
    width = max(len(p) for p in prompts)
    idx = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return idx, mask


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_ragged_batch_equals_each_prompt_alone(use_kv_cache):
    model = peaky_model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    idx, mask = left_pad(prompts)
    batched = model.generate(idx, max_new_tokens=12, temperature=0.0, attention_mask=mask, use_kv_cache=use_kv_cache)
    for row, prompt in zip(batched, prompts):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=12, temperature=0.0)[0]
        assert torch.equal(row, alone)


def test_each_row_stops_at_its_own_stop_token():
    model = peaky_model()
    prompts = [[5, 6, 7], [40, 41, 42, 43]]
    solo = [model.generate(torch.tensor([p]), max_new_tokens=10, temperature=0.0)[0].tolist() for p in prompts]
    stop = solo[0][3]  # row 0 stops after 3 tokens (or earlier, if this token came before)
    idx, mask = left_pad(prompts)
    out = model.generate(idx, stop_id=[stop, 96], max_new_tokens=10, temperature=0.0, attention_mask=mask)
    for row, expected in zip(out.tolist(), solo):
        cut = next((i for i, t in enumerate(expected) if t in (stop, 96)), len(expected))
        assert row[:cut] == expected[:cut]
        assert all(t == stop for t in row[cut:])  # finished rows are padded with the first stop id


def test_min_new_tokens_defers_the_stop():
    model = peaky_model()
    prompt = torch.tensor([[5, 6, 7]])
    first = model.generate(prompt, max_new_tokens=1, temperature=0.0)[0, 0].item()
    assert model.generate(prompt, stop_id=first, max_new_tokens=8, temperature=0.0).shape[1] == 0
    out = model.generate(prompt, stop_id=first, max_new_tokens=8, temperature=0.0, min_new_tokens=3)
    assert out.shape[1] >= 3 and first not in out[0, :3].tolist()


def test_seed_makes_sampling_reproducible():
    model = peaky_model()
    prompt = torch.tensor([[5, 6, 7]])
    kwargs = dict(max_new_tokens=20, temperature=1.5, top_k=50, top_p=0.95)
    a = model.generate(prompt, seed=1, **kwargs)
    assert torch.equal(a, model.generate(prompt, seed=1, **kwargs))
    assert not torch.equal(a, model.generate(prompt, seed=2, **kwargs))


def test_top_k_filter_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 6.0]])
    kept = top_k_filter(logits, 2) > float("-inf")
    assert kept.tolist() == [[False, True, True, False], [False, False, True, True]]


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    assert (top_p_filter(logits, 0.5) > float("-inf")).tolist() == [[False, True, False, False]]
    assert (top_p_filter(logits, 0.75) > float("-inf")).tolist() == [[False, True, False, True]]
    assert (top_p_filter(logits, 0.9) > float("-inf")).tolist() == [[False, True, True, True]]
    assert (top_p_filter(logits, 1.0) > float("-inf")).all()
    assert (top_p_filter(logits, 0.0) > float("-inf")).tolist() == [[False, True, False, False]]  # never empty


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    context = torch.tensor([[0, 1, 3]])
    mask = torch.tensor([[1, 1, 0]])  # token 3 is padding here: not penalized
    out = apply_repetition_penalty(logits, context, mask, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    # stop tokens are exempt: a chat prompt is full of <|im_end|>, and the answer must still end
    exempt = apply_repetition_penalty(logits, context, mask, 2.0, exempt=torch.tensor([0]))
    assert exempt.tolist() == [[2.0, -2.0, 0.5, 3.0]]
    # greedy sampling sees it: token 0 (2.0 -> 0.4 with penalty 5) loses to token 2 (0.5)
    assert sample_next_token(torch.tensor([[2.0, -1.0, 0.5]]), 0.0, repetition_penalty=5.0,
                             context=torch.tensor([[0]])).tolist() == [2]


def test_sampling_respects_the_filters():
    logits = torch.tensor([[0.0, 10.0, 9.0, -5.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits, 1.0, top_k=2, generator=g)
    assert set(draws.tolist()) == {1, 2}
    assert set(sample_next_token(logits, 1.0, top_p=0.5, generator=g).tolist()) == {1}
    assert set(sample_next_token(logits, 0.0).tolist()) == {1}


# ---------------------------------------------------------------- compiled decoding

@pytest.fixture
def compile_counter(monkeypatch):
    """Compiled decoding through a backend that counts graphs and runs them as traced (no codegen:
    inductor takes seconds per graph on CPU); the real default stays inductor."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()  # compiled entries live on decode_step's code, shared by every model
    counter = CompileCounter()
    monkeypatch.setattr(k_model, "DECODE_BACKEND", counter)
    yield counter
    torch._dynamo.reset()


def random_batch(batch, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (batch,), generator=g).tolist()
    return left_pad([torch.randint(5, 97, (n,), generator=g).tolist() for n in lengths])


def test_ten_batch_sizes_decode_like_eager_in_five_compiled_graphs(compile_counter):
    """Compiling every batch size anew died at the 9th (torch's recompile limit is 8, and
    fullgraph=True raises there); padded to buckets 1, 2, 4, 8, 16 they need five graphs."""
    model = peaky_model()
    for batch in range(1, 11):
        idx, mask = random_batch(batch, seed=batch)
        eager = model.generate(idx, max_new_tokens=12, temperature=0.0, attention_mask=mask)
        compiled = model.generate(idx, max_new_tokens=12, temperature=0.0, attention_mask=mask, compile_decode=True)
        assert torch.equal(compiled, eager), f"batch {batch}"
    assert compile_counter.frame_count == 5
    assert sorted(model._static_kv_caches) == [1, 2, 4, 8, 16]


def test_a_batch_over_the_largest_bucket_decodes_eagerly(compile_counter, monkeypatch):
    monkeypatch.setattr(k_model, "DECODE_BUCKETS", (1, 2, 4))
    model = peaky_model()
    idx, mask = random_batch(5, seed=0)
    compiled = model.generate(idx, max_new_tokens=8, temperature=0.0, attention_mask=mask, compile_decode=True)
    assert torch.equal(compiled, model.generate(idx, max_new_tokens=8, temperature=0.0, attention_mask=mask))
    assert compile_counter.frame_count == 0 and not getattr(model, "_static_kv_caches", None)


def test_requests_reuse_their_bucket_cache_and_inherit_nothing(compile_counter):
    model = peaky_model()
    long_idx, long_mask = random_batch(3, seed=1)
    long_idx, long_mask = torch.cat((long_idx, long_idx), 1), torch.cat((long_mask, long_mask), 1)
    model.generate(long_idx, max_new_tokens=30, temperature=0.0, attention_mask=long_mask, compile_decode=True)
    cache = model._static_kv_caches[4]
    addresses = [t.data_ptr() for t in (cache.k, cache.v, cache.column, cache.positions, cache.key_mask)]
    idx, mask = random_batch(4, seed=2)  # the same bucket, a shorter prompt: the first one's slots lie past it
    alone = model.generate(idx, max_new_tokens=20, temperature=0.9, seed=5, attention_mask=mask)
    second = model.generate(idx, max_new_tokens=20, temperature=0.9, seed=5, attention_mask=mask, compile_decode=True)
    assert torch.equal(second, alone)
    # what an overflowed request could leave behind: NaN keys and values, every slot visible, stray positions
    with torch.inference_mode():  # the cache was made inside generate's inference mode
        for t, junk in ((cache.k, float("nan")), (cache.v, float("nan")), (cache.key_mask, True),
                        (cache.positions, 7), (cache.column, 5)):
            t.fill_(junk)
    cache.length, cache.decoding = 9, True
    third = model.generate(idx, max_new_tokens=20, temperature=0.9, seed=5, attention_mask=mask, compile_decode=True)
    assert torch.equal(third, alone)
    assert model._static_kv_caches[4] is cache
    assert [t.data_ptr() for t in (cache.k, cache.v, cache.column, cache.positions, cache.key_mask)] == addresses
    assert compile_counter.frame_count == 1  # all three requests (batches 3 and 4) ran bucket 4's one graph


def test_a_generation_that_loses_its_cache_to_another_says_so(compile_counter):
    model = peaky_model()
    idx, mask = random_batch(2, seed=3)
    first = model.generate_stream(idx, max_new_tokens=10, temperature=0.0, attention_mask=mask, compile_decode=True)
    next(first)
    model.generate(idx, max_new_tokens=3, temperature=0.0, attention_mask=mask, compile_decode=True)  # same bucket
    with pytest.raises(RuntimeError, match="one compiled generation at a time"):
        next(first)


# ---------------------------------------------------------------- NaN / inf logits

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits_raise_a_clear_error_before_sampling(temperature):
    logits = torch.tensor([[0.0, 1.0, 3.0], [0.0, float("nan"), 1.0]])
    with pytest.raises(NonFiniteLogitsError, match="NaN or inf") as e:
        sample_next_token(logits, temperature, top_k=2)
    assert "float16" not in str(e.value)
    with pytest.raises(NonFiniteLogitsError, match="--dtype bfloat16 or --dtype float32"):
        sample_next_token(logits.half(), temperature)
    with pytest.raises(NonFiniteLogitsError):
        sample_next_token(torch.tensor([[0.0, float("inf"), 1.0]]), temperature)


def fp16_model_with_a_poisoned_token(prompt):
    """An fp16 model whose greedy first token has an inf embedding: the step that feeds it back
    turns into NaN, as a float16 overflow would. Returns (model, that token)."""
    model = cast_for_inference(peaky_model(), torch.float16)
    model.output.weight = torch.nn.Parameter(model.output.weight.detach().clone())  # untie: logits stay finite
    first = model.generate(prompt, max_new_tokens=1, temperature=0.0)[0, 0].item()
    assert first not in prompt[0].tolist()
    with torch.no_grad():
        model.tok_embeddings.weight[first] = float("inf")
    return model, first


@pytest.mark.parametrize("compile_decode", [False, True])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=1, seed=0)])
def test_generation_stops_with_the_clear_error_when_logits_turn_non_finite(compile_counter, compile_decode,
                                                                            sampling):
    prompt = torch.tensor([[5, 6, 7, 8]])
    model, first = fp16_model_with_a_poisoned_token(prompt)
    for stop_id in (None, 96):  # with a stop token the check shares the sync of "all rows finished?"
        stream = model.generate_stream(prompt, stop_id=stop_id, max_new_tokens=10, compile_decode=compile_decode,
                                       **sampling)
        assert next(stream).tolist() == [[first]]
        with pytest.raises(NonFiniteLogitsError, match="float16.*--dtype bfloat16 or --dtype float32"):
            next(stream)


def test_a_finished_row_going_non_finite_does_not_stop_the_others():
    model = peaky_model()
    idx, mask = left_pad([[5, 6, 7], [40, 41, 42, 43]])
    solo = [model.generate(idx[i:i + 1, -n:], max_new_tokens=6, temperature=0.0)[0].tolist()
            for i, n in enumerate((3, 4))]
    stop = solo[0][0]  # row 0 stops at once
    assert stop not in solo[1]
    model.output.weight = torch.nn.Parameter(model.output.weight.detach().clone())
    with torch.no_grad():
        model.tok_embeddings.weight[stop] = float("inf")  # ...and its stop token fed back is NaN from then on
    out = model.generate(idx, stop_id=stop, max_new_tokens=6, temperature=0.0, attention_mask=mask)
    assert out[1].tolist() == solo[1] and set(out[0].tolist()) == {stop}


# ---------------------------------------------------------------- TextGenerator

@pytest.fixture
def model_dir(tokenizer, tokenizer_dir, tmp_path):
    import shutil
    model = peaky_model(vocab_size=len(tokenizer), max_seq_len=256)
    model.save_pretrained(str(tmp_path / "model"))
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), tmp_path / "model")
    return str(tmp_path / "model")


@pytest.fixture
def generator(model_dir):
    from model_sample import TextGenerator
    return TextGenerator(model_dir, device="cpu")


def test_the_dtype_option_sets_the_inference_precision(model_dir):
    from model_sample import TextGenerator
    assert TextGenerator(model_dir, device="cpu").model.dtype == torch.float32  # auto, on CPU
    half = TextGenerator(model_dir, device="cpu", dtype="float16")  # what auto picks on a V100 or T4
    assert half.model.dtype == torch.float16 and half.model.freqs_cos.dtype == torch.float32
    assert half.chat("你好", max_new_tokens=4, temperature=0.0) is not None
    with pytest.raises(ValueError, match="'float8' is not one of auto, float32, bfloat16, float16"):
        TextGenerator(model_dir, device="cpu", dtype="float8")


def test_stream_decoder_never_splits_a_character(tokenizer):
    from model_sample import StreamDecoder
    text = "今天天气很好，我们去公园散步。Hello！"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens hold only part of a character


def test_chat_stream_concatenates_to_chat(generator):
    kwargs = dict(max_new_tokens=20, temperature=0.8, seed=3)
    assert "".join(generator.chat_stream("你好", **kwargs)).strip() == generator.chat("你好", **kwargs)


def test_chat_batch_equals_one_by_one(generator):
    prompts = ["你好", "今天天气很好，我们去公园散步吗？", "Hello"]
    kwargs = dict(max_new_tokens=15, temperature=0.0)
    assert generator.chat_batch(prompts, **kwargs) == [generator.chat(p, **kwargs) for p in prompts]


def test_long_history_drops_the_oldest_turns_and_keeps_the_system_prompt(generator):
    system = {"role": "system", "content": "你是Tiny-K"}
    history = [system]
    for i in range(12):
        history += [{"role": "user", "content": f"第{i}个问题"}, {"role": "assistant", "content": f"第{i}个回答"}]
    ids = generator.chat_prompt_ids("最后的问题", history, max_new_tokens=20)
    text = generator.tokenizer.decode(ids)
    assert len(ids) <= generator.max_seq_len - 20
    assert text.startswith("<|im_start|>system\n你是Tiny-K<|im_end|>")
    assert "最后的问题" in text and "第11个回答" in text and "第0个问题" not in text
    with pytest.raises(ValueError, match="at most 256"):
        generator.chat_prompt_ids("很长的问题" * 200)


def test_interactive_chat_keeps_history_and_resets(generator, monkeypatch, capsys):
    from model_sample import interactive_chat
    seen = []

    def fake_stream(prompt, history, **kwargs):
        seen.append((prompt, list(history)))
        yield f"答{len(seen)}"
    monkeypatch.setattr(generator, "chat_stream", fake_stream)
    interactive_chat(generator, {}, stdin=io.StringIO("你好\n再见\n/reset\nHello\n/exit\n"))
    assert [p for p, _ in seen] == ["你好", "再见", "Hello"]
    assert seen[1][1] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "答1"}]
    assert seen[2][1] == []
    assert "答1" in capsys.readouterr().out


def test_chat_cli_driven_through_stdin(generator, tmp_path):
    model_dir = str(tmp_path / "model")
    result = subprocess.run([sys.executable, os.path.join(CODE, "model_sample.py"), "--chat", "--checkpoint",
                             model_dir, "--max_new_tokens", "8", "--device", "cpu"],
                            input="你好\nHello\n", capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("assistant> ") == 2


def test_a_failed_generation_is_a_500_and_the_server_goes_on(model_dir):
    """On CUDA, NaN reaching torch.multinomial used to end the CUDA context while /health still
    answered; now the request gets the reason and the next one is served."""
    import json
    from fastapi.testclient import TestClient
    from serve import create_app
    app = create_app(model_dir, device="cpu")
    client, model = TestClient(app), app.state.worker.generator.model
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 8, "temperature": 0.8, "seed": 1}
    before = client.post("/v1/chat/completions", json=body).json()["choices"]
    norm = model.norm.weight.detach().clone()
    with torch.no_grad():
        model.norm.weight.fill_(float("inf"))  # every logit turns NaN
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
    assert "NaN or inf" in r.json()["error"]["message"]
    streamed = client.post("/v1/chat/completions", json=dict(body, stream=True))
    events = [line[len("data: "):] for line in streamed.text.split("\n\n") if line.startswith("data: ")]
    assert "NaN or inf" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
    with torch.no_grad():
        model.norm.weight.copy_(norm)
    assert client.post("/v1/chat/completions", json=body).json()["choices"] == before
    assert client.get("/health").json()["waiting"] == 0
