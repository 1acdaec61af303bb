"""The OpenAI-compatible server: response shapes, streaming equals non-streaming, concurrent
requests, a full queue answers 503, bad input gets a 4xx in the OpenAI error shape."""
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from test_generate import peaky_model


@pytest.fixture(scope="module")
def model_dir(tokenizer, tokenizer_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve") / "model"
    peaky_model(vocab_size=len(tokenizer), max_seq_len=128).save_pretrained(str(d))
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), d)
    return str(d)


@pytest.fixture(scope="module")
def app(model_dir):
    from serve import create_app
    return create_app(model_dir, max_queue=16, device="cpu")


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


CHAT = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 12, "seed": 7, "temperature": 0.8}


def sse_events(response):
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_completion_has_the_openai_shape(client):
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == CHAT["max_tokens"]


def test_streaming_concatenates_to_the_non_streaming_answer(client):
    whole = client.post("/v1/chat/completions", json=CHAT).json()
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(r)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip() == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_completions_models_and_health(client):
    r = client.post("/v1/completions", json={"prompt": "今天", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    assert isinstance(r.json()["choices"][0]["text"], str)
    assert client.get("/v1/models").json()["data"][0]["id"] == "model"
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "getReader" in page.text


def test_stop_strings_cut_the_answer(client):
    whole = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20}).json()
    text = whole["choices"][0]["message"]["content"]
    if len(text) < 3:
        pytest.skip("the random model ended too early for this check")
    stop = text[2]
    cut = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20, "stop": [stop]}).json()
    assert cut["choices"][0]["message"]["content"] == text[:text.index(stop)].strip()
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_eight_concurrent_requests_get_their_own_answers(client):
    prompts = [{**CHAT, "seed": i, "messages": [{"role": "user", "content": f"第{i}个问题"}]} for i in range(8)]
    alone = [client.post("/v1/chat/completions", json=p).json()["choices"][0]["message"]["content"] for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: client.post("/v1/chat/completions", json=p).json(), prompts))
    assert [t["choices"][0]["message"]["content"] for t in together] == alone


def test_a_full_queue_answers_503(model_dir):
    import time
    from serve import create_app
    app = create_app(model_dir, max_queue=1, device="cpu")
    client, worker = TestClient(app), app.state.worker
    with worker.lock:  # the model is busy: the first request waits in the queue
        first = ThreadPoolExecutor(1).submit(client.post, "/v1/chat/completions", json=CHAT)
        deadline = time.time() + 30
        while worker.waiting < 1 and time.time() < deadline:
            time.sleep(0.01)
        second = client.post("/v1/chat/completions", json=CHAT)
    assert second.status_code == 503 and second.json()["error"]["code"] == "server_busy"
    assert first.result(timeout=60).status_code == 200  # served once the model was free


@pytest.mark.parametrize("body, param", [
    ('{"messages": [', None),                                                     # invalid JSON
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),       # unknown role
    ({"messages": []}, "messages"),                                                # empty messages
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 5}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "很长的问题" * 200}]}, "messages"),   # over the context window
])
def test_bad_input_gets_a_400_in_the_openai_shape(client, body, param):
    r = client.post("/v1/chat/completions", content=body if isinstance(body, str) else json.dumps(body),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param


def test_an_oversized_body_gets_413(client):
    r = client.post("/v1/chat/completions", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_serves_an_exported_hugging_face_directory_too(model_dir, tmp_path):
    import export_model
    from serve import create_app
    export_model.main(["--checkpoint", model_dir, "--save_dir", str(tmp_path / "hf")])
    hf_client = TestClient(create_app(str(tmp_path / "hf"), device="cpu"))
    ours = TestClient(create_app(model_dir, device="cpu"))
    greedy = {**CHAT, "temperature": 0}
    assert hf_client.post("/v1/chat/completions", json=greedy).json()["choices"] == \
        ours.post("/v1/chat/completions", json=greedy).json()["choices"]
