"""The OpenAI-compatible server: response shapes, streaming equals non-streaming, concurrent
requests, a full queue answers 503, bad input gets a 4xx in the OpenAI error shape, the API key,
the flags' help, and the chat page's history rules (run with node)."""
import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
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
    model = client.get("/v1/models").json()["data"][0]
    assert model["id"] == "model" and model["max_seq_len"] == 128  # the page shows both
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


def test_broken_json_names_the_line_and_column_not_a_param(client):
    body = '{"messages": [\n  {"role": "user",, "content": "hi"}]}'
    with pytest.raises(json.JSONDecodeError) as python_says:
        json.loads(body)
    r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] is None and error["code"] == "invalid_json" and error["type"] == "invalid_request_error"
    e = python_says.value
    assert error["message"] == f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"


def test_an_empty_body_is_named_as_such(client):
    r = client.post("/v1/chat/completions", content="", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request has no body; send a JSON object"


# ---- the API key

KEY = "tk-s3cret"


@pytest.fixture(scope="module")
def keyed_client(model_dir):
    from serve import create_app
    return TestClient(create_app(model_dir, device="cpu", api_key=KEY))


V1 = [("get", "/v1/models", None), ("post", "/v1/chat/completions", {**CHAT, "max_tokens": 2}),
      ("post", "/v1/completions", {"prompt": "今天", "max_tokens": 2})]


@pytest.mark.parametrize("method, path, body", V1)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {KEY}", KEY, f"Bearer {KEY}x"])
def test_v1_without_the_right_key_gets_401(keyed_client, method, path, body, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    r = getattr(keyed_client, method)(path, headers=headers, **({"json": body} if body else {}))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key" and error["message"]


@pytest.mark.parametrize("method, path, body", V1)
def test_v1_with_the_right_key_works(keyed_client, method, path, body):
    r = getattr(keyed_client, method)(path, headers={"Authorization": f"bearer  {KEY} "},
                                      **({"json": body} if body else {}))
    assert r.status_code == 200, r.text


def test_the_page_and_health_stay_open_with_a_key(keyed_client):
    assert keyed_client.get("/").status_code == 200 and keyed_client.get("/health").status_code == 200
    assert keyed_client.get("/openapi.json").status_code == 401  # only the listed paths are open


def test_key_matches_compares_the_bearer_token():
    from serve import key_matches
    assert key_matches(f"Bearer {KEY}", KEY) and not key_matches(None, KEY) and not key_matches("Bearer", KEY)
    assert key_matches("Bearer 密钥", "密钥") and not key_matches("Bearer 密", "密钥")  # non-ASCII: no TypeError


@pytest.mark.parametrize("host, key, warn", [
    ("127.0.0.1", None, False), ("127.0.0.2", None, False), ("localhost", None, False), ("::1", None, False),
    ("[::1]", None, False), ("0.0.0.0", None, True), ("::", None, True), ("192.168.1.5", None, True),
    ("myhost.example", None, True), ("0.0.0.0", KEY, False), ("0.0.0.0", "", True),
])
def test_should_warn_open(host, key, warn):
    from serve import should_warn_open
    assert should_warn_open(host, key) is warn


@pytest.mark.parametrize("argv, env, key, warned", [
    (["--host", "0.0.0.0"], None, None, True),
    (["--host", "0.0.0.0"], KEY, KEY, False),                            # the key from TINYK_API_KEY
    (["--host", "0.0.0.0", "--api_key", "flag"], KEY, "flag", False),    # the flag wins
    ([], None, None, False),                                             # loopback: no warning
])
def test_main_takes_the_key_and_warns_once(monkeypatch, capsys, argv, env, key, warned):
    import uvicorn
    import serve
    seen = {}
    monkeypatch.setattr(serve, "create_app", lambda *a, **kw: seen.update(kw) or "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port: seen.update(host=host))
    if env is None:
        monkeypatch.delenv("TINYK_API_KEY", raising=False)
    else:
        monkeypatch.setenv("TINYK_API_KEY", env)
    serve.main(["--model", "m"] + argv)
    err = capsys.readouterr().err
    assert seen["api_key"] == key
    assert (err.count("\n"), "without an API key" in err) == ((1, True) if warned else (0, False))


def test_every_flag_has_a_help_with_its_default():
    import serve
    parser = serve.build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and action.help.strip(), action.dest
        assert "default" in action.help, action.dest
        if action.choices:
            assert all(str(c) in action.help or "%(choices)s" in action.help for c in action.choices), action.dest
    parser.format_help()  # the %(default)s placeholders format


def test_the_help_does_not_show_the_key(monkeypatch):
    monkeypatch.setenv("TINYK_API_KEY", KEY)
    import serve
    assert KEY not in serve.build_parser().format_help()


# ---- the chat page's history rules, run with node on the functions cut out of chat.html

PAGE_JS_TEST = r"""
const out = {};
const u = (c) => ({role: "user", content: c}), a = (c) => ({role: "assistant", content: c});
let history = [];
out.first = requestMessages(history, "很长的问题");
history = afterExchange(history, "很长的问题", "", true);           // HTTP 400: nothing kept
out.afterError = history;
history = afterExchange(history, "你好", "半句", true);             // error mid-stream: not kept
history = afterExchange(history, "你好", "   ", false);             // stopped before an answer
out.afterStop = history;
history = afterExchange(history, "你好", " 你好！\n", false);       // a completed exchange
out.next = requestMessages(history, "再见");
out.parsed = [parseEvent("[DONE]"), parseEvent('{"error": {"message": "boom"}}'),
              parseEvent('{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}'),
              parseEvent('{"choices": [{"index": 0, "delta": {"content": "嗨"}}]}')];
out.messages = [errorMessage(400, {error: {message: "too long"}}), errorMessage(502, null)];
console.log(JSON.stringify(out));
"""


def page_functions() -> str:
    from serve import PAGE
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()
    block = re.search(r"// ---- history rules.*?// ---- end of history rules ----", page, re.S)
    assert block, "chat.html lost its history-rules markers"
    return block.group(0)


@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed")
def test_the_page_keeps_only_completed_exchanges(tmp_path):
    script = tmp_path / "page_test.js"
    script.write_text(page_functions() + PAGE_JS_TEST, encoding="utf-8")
    run = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    u, a = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
    assert out["first"] == [u("很长的问题")]
    assert out["afterError"] == [] and out["afterStop"] == []
    assert out["next"] == [u("你好"), a("你好！"), u("再见")]  # no empty assistant turn, no failed question
    assert out["parsed"] == [{"done": True}, {"error": "boom"}, {"content": ""}, {"content": "嗨"}]
    assert out["messages"] == ["too long", "HTTP 502"]


def test_the_page_sends_through_the_history_rules(client):
    page = client.get("/").text
    assert "requestMessages(history, prompt)" in page and "history = afterExchange(" in page
    assert "history.push" not in page  # the rules above are the only way into the history
    assert 'type="password"' in page and '"Bearer "' in page and "/v1/models" in page


# ---------------------------------------------------------------- faults (README: "What survives what")

def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_a_busy_server_says_when_to_retry(model_dir):
    from serve import RETRY_AFTER_S, create_app
    app = create_app(model_dir, max_queue=0, device="cpu")
    r = TestClient(app).post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.headers["Retry-After"] == str(RETRY_AFTER_S)


@pytest.mark.parametrize("body", [b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', b'\xc3{"prompt": "x"}'])
def test_invalid_utf8_gets_a_400_naming_the_byte(client, body):
    r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid UTF-8" in r.json()["error"]["message"]
    first_bad = next(i for i, b in enumerate(body) if b >= 0x80)
    assert f"byte 0x{body[first_bad]:02x} at offset {first_bad}" in r.json()["error"]["message"]


def test_memory_stays_flat_over_many_requests(client):
    # 500 here, to keep the suite fast; the README's figure is 1,000 requests to the demo model
    body = dict(CHAT, max_tokens=2)
    for _ in range(100):  # allocator and caches settle
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    before = rss_mib()
    for i in range(400):
        assert client.post("/v1/chat/completions", json=dict(body, seed=i)).status_code == 200
    growth = rss_mib() - before
    assert growth < 10, f"RSS grew {growth:.1f} MiB over 400 requests"


def test_a_client_that_disconnects_mid_stream_frees_the_model(model_dir):
    import socket
    import threading
    import time
    import uvicorn
    from serve import create_app
    app = create_app(model_dir, max_queue=4, device="cpu")
    worker, model = app.state.worker, app.state.worker.generator.model
    generated, real_stream = [], model.generate_stream

    def endless(idx, **kwargs):  # a model that never stops on its own, a token every 20 ms
        while True:
            generated.append(1)
            time.sleep(0.02)
            yield torch.tensor([[5]])
    model.generate_stream = endless
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        body = json.dumps(dict(CHAT, max_tokens=1000, stream=True)).encode()
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b'"content"') < 3:  # three tokens streamed: generation is under way
            received += client.recv(4096)
        assert b"finish_reason\": \"" not in received
        client.close()
        while (worker.waiting or worker.lock.locked()) and time.time() < deadline:
            time.sleep(0.02)
        assert worker.waiting == 0 and not worker.lock.locked(), "the slot was not freed"
        n = len(generated)
        time.sleep(0.2)
        assert len(generated) <= n + 1, "generation went on for a client that had gone"
        model.generate_stream = real_stream
        import urllib.request
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(CHAT).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 200 and json.loads(r.read())["choices"][0]["message"]["content"] is not None
    finally:
        server.should_exit = True
