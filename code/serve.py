r"""Serve a model over an OpenAI-compatible HTTP API, with a chat page at /.

    python code/serve.py --model output/sft                 # http://127.0.0.1:8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"messages": [{"role": "user", "content": "你好"}], "stream": false}'

Endpoints: POST /v1/chat/completions (streaming with "stream": true, as server-sent events),
POST /v1/completions (plain continuation), GET /v1/models (with the model's max_seq_len),
GET /health, GET / (the page). One request generates at a time; up to --max_queue wait, and more
are answered 503 with Retry-After. A client that disconnects stops its generation. A generation
that fails (say, NaN logits from a float16 overflow) answers its request with a 500 naming the
cause, in the stream as an error event, and the server goes on serving.

Serving a network (--host 0.0.0.0)? Set a key: TINYK_API_KEY=... python code/serve.py --host 0.0.0.0.
Then every path but the page (/), /health and /favicon.ico needs "Authorization: Bearer <key>", as
OpenAI clients send it (api_key=...); the page has a field for it. The key travels in clear over plain HTTP: across
a network you do not trust, put a TLS proxy in front.
"""
import argparse
import asyncio
import hmac
import ipaddress
import json
import os
import sys
import threading
import time
import traceback
import uuid
from typing import List, Literal, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

# ---- hyperparameters (CLI flags override) ----
HOST = "127.0.0.1"          # only this machine; --host 0.0.0.0 to serve a network
PORT = 8000
MAX_QUEUE = 16              # requests waiting for the model; more get 503
MAX_TOKENS_LIMIT = 1024     # the most a request may ask for
MAX_BODY_BYTES = 1 << 20    # larger requests get 413
RETRY_AFTER_S = 1           # what a 503 tells the client to wait before trying again
API_KEY_ENV = "TINYK_API_KEY"  # where --api_key comes from when the flag is not given
# no key needed here: the page holds no secret and asks for the key; probes need /health; browsers ask
# for /favicon.ico with every page (a 404, not a 401 that would look like someone guessing keys)
OPEN_PATHS = ("/", "/health", "/favicon.ico")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str = None, param: str = None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind


def error_response(status, message, code=None, param=None, kind="invalid_request_error"):
    """The OpenAI error shape."""
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": code}})


def json_error_message(doc, offset: int, reason: str) -> str:
    """'the body is not valid JSON: <reason> at line L column C' (FastAPI only gives the character offset)."""
    text = doc.decode("utf-8", "replace") if isinstance(doc, (bytes, bytearray)) else str(doc or "")
    offset = max(0, min(int(offset), len(text)))
    line = text.count("\n", 0, offset) + 1
    column = offset - text.rfind("\n", 0, offset)  # 1-based, as Python's json module counts
    return f"the body is not valid JSON: {reason} at line {line} column {column}"


def validation_error_response(e: RequestValidationError):
    """The first problem FastAPI found, as an OpenAI-shaped 400 naming the field at fault."""
    first = e.errors()[0]
    loc = list(first.get("loc", []))
    if first.get("type") == "json_invalid":  # loc is ("body", <character offset>): no field to name
        offset = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        return error_response(400, json_error_message(e.body, offset, reason), code="invalid_json")
    if loc == ["body"] and first.get("type") == "missing":
        return error_response(400, "the request has no body; send a JSON object", code="invalid_json")
    param = ".".join(str(p) for p in loc[1:]) or None
    return error_response(400, f"{param or 'body'}: {first.get('msg')}", code="invalid_value", param=param)


def key_matches(authorization: Optional[str], api_key: str) -> bool:
    """Whether an "Authorization: Bearer <key>" header carries api_key (compared in constant time)."""
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # compare_digest on bytes: on str it refuses non-ASCII, which a client may well send
    return hmac.compare_digest(given.strip().encode("utf-8"), api_key.encode("utf-8"))


def is_loopback(host: str) -> bool:
    """Whether binding to host serves this machine only (127.x, ::1, localhost)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost, or "": may resolve to anything
        return False


def should_warn_open(host: str, api_key: Optional[str]) -> bool:
    """Warn when anyone on the network could use the model: bound beyond loopback, and no key."""
    return not api_key and not is_loopback(host)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    max_tokens: int = Field(256, ge=1, le=MAX_TOKENS_LIMIT)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    model: Optional[str] = None


class ChatRequest(Sampling):
    messages: List[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)


class ModelWorker:
    """Runs one generation at a time on a thread, so the event loop stays free to stream."""

    def __init__(self, generator, max_queue: int):
        self.generator, self.max_queue = generator, max_queue
        self.lock = threading.Lock()  # one generation at a time
        self.count_lock = threading.Lock()  # `waiting` changes on the event loop and on worker threads
        self.waiting = 0

    def admit(self):
        with self.count_lock:
            if self.waiting >= self.max_queue:
                raise APIError(503, f"the server is busy ({self.waiting} requests waiting); try again later",
                               code="server_busy", kind="server_error")
            self.waiting += 1

    def stream(self, input_ids, stop_id, sampling: Sampling, loop, queue, cancel: threading.Event):
        """Thread body: push (text piece, None) per token, then (None, {finish_reason, completion_tokens,
        error}); error is the message of what stopped generation, else None."""
        from model_sample import StreamDecoder
        model, tokenizer = self.generator.model, self.generator.tokenizer
        stops = [sampling.stop] if isinstance(sampling.stop, str) else (sampling.stop or [])
        decoder, text, finish, n_tokens, error = StreamDecoder(tokenizer), "", "length", 0, None
        try:
            with self.lock:
                idx = torch.tensor([input_ids], device=self.generator.device)
                for column in model.generate_stream(
                        idx, stop_id=stop_id, max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
                        top_k=sampling.top_k or None, top_p=sampling.top_p, seed=sampling.seed,
                        compile_decode=self.generator.compile_decode):
                    if cancel.is_set():  # the client went away (the page's Stop button)
                        break
                    n_tokens += 1
                    piece = decoder.push(int(column[0, 0]))
                    if stops and any(s in text + piece for s in stops):  # cut at the first stop string
                        full = text + piece
                        cut = min(full.index(s) for s in stops if s in full)
                        piece, finish = full[len(text):cut], "stop"
                    if piece:
                        text += piece
                        loop.call_soon_threadsafe(queue.put_nowait, (piece, None))
                    if finish == "stop":
                        break
                else:
                    limit = min(sampling.max_tokens, self.generator.max_seq_len - len(input_ids))
                    finish = "length" if n_tokens >= limit else "stop"
        except Exception as e:  # this request fails, not the server: its client is told why
            traceback.print_exc()
            error = f"generation failed: {e}"
        finally:
            with self.count_lock:
                self.waiting -= 1
            loop.call_soon_threadsafe(queue.put_nowait, (None, {"finish_reason": finish, "completion_tokens": n_tokens,
                                                                "error": error}))

    async def pieces(self, input_ids, stop_id, sampling):
        """Async iterator of text pieces; the last item is a dict with finish_reason, token count and error."""
        loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        threading.Thread(target=self.stream, args=(input_ids, stop_id, sampling, loop, queue, cancel),
                         daemon=True).start()
        try:
            while True:
                piece, done = await queue.get()
                if done is not None:
                    yield done
                    return
                yield piece
        finally:
            cancel.set()


def create_app(model_dir: str, max_queue: int = MAX_QUEUE, device: str = "auto",
               compile_decode: bool = False, api_key: Optional[str] = None, dtype: str = "auto") -> FastAPI:
    """api_key: when set, every path but OPEN_PATHS needs "Authorization: Bearer <api_key>"."""
    from model_sample import TextGenerator
    generator = TextGenerator(model_dir, device=device, compile_decode=compile_decode, dtype=dtype)
    worker = ModelWorker(generator, max_queue)
    model_name = os.path.basename(os.path.normpath(model_dir))
    app = FastAPI(title="Tiny-K", docs_url=None, redoc_url=None)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        response = error_response(e.status, e.message, e.code, e.param, e.kind)
        if e.status == 503:  # busy, not broken: clients with retries (OpenAI's) wait and try again
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return validation_error_response(e)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return error_response(413, f"request body over {MAX_BODY_BYTES} bytes", code="body_too_large")
        if request.method == "POST":  # FastAPI answers bad bytes with a bare "error parsing the body"
            try:
                (await request.body()).decode("utf-8")
            except UnicodeDecodeError as e:
                return error_response(400, f"the body is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset "
                                           f"{e.start})", code="invalid_json")
        return await call_next(request)

    @app.middleware("http")  # added last, so it runs first: no key, no work done
    async def check_api_key(request: Request, call_next):
        # everything but the listed open paths is protected, so a new endpoint cannot be left open by mistake
        if api_key and request.url.path not in OPEN_PATHS:
            authorization = request.headers.get("authorization")
            if not key_matches(authorization, api_key):
                message = ("incorrect API key provided" if authorization else
                           "no API key provided; send it as the header 'Authorization: Bearer <key>'")
                response = error_response(401, message, code="invalid_api_key")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "waiting": worker.waiting}

    @app.get("/v1/models")
    async def models():
        # max_seq_len is ours (the page shows it); OpenAI clients ignore fields they do not know
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "tiny-k",
                                            "max_seq_len": generator.max_seq_len}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read()

    async def respond(kind, input_ids, stop_id, sampling: Sampling):
        worker.admit()
        rid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        pieces = worker.pieces(input_ids, stop_id, sampling)

        def usage(done):
            return {"prompt_tokens": len(input_ids), "completion_tokens": done["completion_tokens"],
                    "total_tokens": len(input_ids) + done["completion_tokens"]}

        def chunk(delta=None, finish=None, text=None):
            choice = {"index": 0, "finish_reason": finish}
            choice.update({"delta": delta or {}} if kind == "chat" else {"text": text or ""})
            return {"id": rid, "object": obj + ".chunk" if kind == "chat" else obj, "created": created,
                    "model": model_name, "choices": [choice]}

        if sampling.stream:
            async def events():
                if kind == "chat":
                    yield f"data: {json.dumps(chunk(delta={'role': 'assistant'}), ensure_ascii=False)}\n\n"
                async for item in pieces:
                    if isinstance(item, dict):
                        if item["error"]:  # the 200 is sent already: the error comes as an event, as OpenAI's do
                            last = {"error": {"message": item["error"], "type": "server_error", "param": None,
                                              "code": "generation_failed"}}
                        else:
                            last = chunk(finish=item["finish_reason"])
                            last["usage"] = usage(item)
                        yield f"data: {json.dumps(last, ensure_ascii=False)}\n\n"
                        break
                    body = chunk(delta={"content": item}) if kind == "chat" else chunk(text=item)
                    yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        text, done = "", None
        async for item in pieces:
            if isinstance(item, dict):
                done = item
            else:
                text += item
        if done["error"]:
            raise APIError(500, done["error"], code="generation_failed", kind="server_error")
        choice = {"index": 0, "finish_reason": done["finish_reason"]}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text.strip()}
        else:
            choice["text"] = text
        return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice],
                "usage": usage(done)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        messages = [m.model_dump() for m in body.messages]
        if messages[-1]["role"] != "user":
            raise APIError(400, "the last message must come from the user", param="messages")
        try:
            input_ids = generator.chat_prompt_ids(messages[-1]["content"], messages[:-1], body.max_tokens)
        except ValueError as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="messages")
        return await respond("chat", input_ids, generator.im_end_id, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        tokenizer = generator.tokenizer
        input_ids = [tokenizer.bos_token_id] + tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
        if len(input_ids) >= generator.max_seq_len:
            raise APIError(400, f"the prompt is {len(input_ids)} tokens long; this model reads at most "
                                f"{generator.max_seq_len}", code="context_length_exceeded", param="prompt")
        return await respond("completion", input_ids, tokenizer.eos_token_id, body)

    return app


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="output/sft",
                        help="a Tiny-K or exported Hugging Face Llama directory (default: %(default)s)")
    parser.add_argument("--host", default=HOST,
                        help="address to bind; 0.0.0.0 serves the network, so set a key (default: %(default)s)")
    parser.add_argument("--port", type=int, default=PORT, help="port to listen on (default: %(default)s)")
    parser.add_argument("--max_queue", type=int, default=MAX_QUEUE,
                        help="requests that may wait for the model; more get 503 (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda if there is one), cpu, cuda, cuda:N (default: %(default)s)")
    parser.add_argument("--compile_decode", action="store_true",
                        help="torch.compile the decode step (CUDA graphs on CUDA); the first request waits "
                             "for it (default: off)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="inference precision: auto (bfloat16 on CUDA, float16 where bf16 is missing; float32 "
                             "on CPU), float32, bfloat16 or float16 (default: %(default)s)")
    # the default is not printed by --help: it would show the key
    parser.add_argument("--api_key", default=None,
                        help=f"Bearer key required on all but / and /health (default: ${API_KEY_ENV}, else "
                             f"none: open to all who reach the port); prefer the variable, ps shows flags")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    api_key = (args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)) or None
    if should_warn_open(args.host, api_key):
        print(f"warning: serving {args.host}:{args.port} without an API key: anyone who can reach it can use the "
              f"model (set {API_KEY_ENV} or --api_key)", file=sys.stderr)
    try:
        app = create_app(args.model, args.max_queue, args.device, args.compile_decode, api_key=api_key,
                         dtype=args.dtype)
    except (FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    import uvicorn
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
