"""`diffbench serve MODEL`: an OpenAI-compatible HTTP server over a diffbench backend.

`/v1/chat/completions` (the model's chat template, when it has one), `/v1/completions` (raw
text) and `/v1/models`, so that any local checkpoint can be the `llm` judge and the official
`openai` client works against it. Generation is the backend's own: greedy, a token budget
(`max_tokens`) and stop strings; sampling parameters are accepted and ignored (the backend is
greedy), and `n` > 1 or `stream` are refused. Bad requests get OpenAI's error shape and a 4xx.
FastAPI and uvicorn are imported only when the command runs.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime, and
# `Request` is imported inside make_app.
import logging
import threading
import time
import uuid
from typing import Any

from diffbench.errors import DiffbenchError

log = logging.getLogger("diffbench")

DEFAULT_MAX_TOKENS = 256


def add_command(sub: Any) -> None:
    """Add `diffbench serve` to the CLI's subcommands."""
    s = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (loopback by default)"
    )
    s.add_argument("model", metavar="MODEL", help="a folder, .gguf file, hub id or built-in name")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    s.add_argument("--name", default="", help="the model id clients use (default: MODEL)")
    s.add_argument(
        "--model-args", default="", metavar="KEY=VALUE,...", help="backend options of the model"
    )


class RequestError(Exception):
    """A bad request: its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(status: int, message: str, param: Any = None, code: Any = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 4:
        return tuple(s for s in value if s)
    raise RequestError(400, "stop must be a string or a list of at most 4 strings", "stop")


def _budget(body: dict[str, Any], default: int) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(400, "max_tokens must be a positive integer", "max_tokens")
    return value


def _check_common(body: dict[str, Any], model_id: str) -> None:
    if body.get("model") != model_id:
        raise RequestError(
            404, f"The model {body.get('model')!r} does not exist; this server serves "
            f"{model_id!r}", "model", "model_not_found",
        )  # fmt: skip
    if body.get("stream"):
        raise RequestError(400, "streaming is not supported by diffbench serve", "stream")
    if body.get("n", 1) != 1:
        raise RequestError(400, "n must be 1 (generation is greedy)", "n")


class Server:
    """The backend behind one lock (a model generates one batch at a time)."""

    def __init__(self, backend: Any, model_id: str) -> None:
        self.backend, self.model_id = backend, model_id
        self.view = backend.tokenizer_view()
        self.lock = threading.Lock()
        self.created = int(time.time())

    def chat_prompt(self, messages: Any) -> str:
        """The messages rendered as the model's prompt."""
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages must be a non-empty list", "messages")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(
                    400, f"messages[{i}] needs a role of system, user or assistant", "messages"
                )
            content = m.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise RequestError(400, f"messages[{i}].content must be text", "messages")
            turns.append({"role": m["role"], "content": content})
        tokenizer = getattr(self.backend, "tokenizer", None)
        if self.view.has_chat_template and tokenizer is not None:
            return str(
                tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            )
        if len(turns) == 1 and turns[0]["role"] == "user":
            return self.view.render(turns[0]["content"], chat=False)
        # No template: the conversation as plain labelled turns, ending where the reply starts.
        text = "\n\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in turns)
        return f"{text}\n\nAssistant:"

    def generate(self, prompt: str, max_tokens: int, stop: tuple[str, ...]) -> Any:
        """One greedy generation; a prompt beyond the context is a 400."""
        from diffbench.api import GenerateRequest

        n_prompt = self.view.prompt_tokens(prompt)
        if n_prompt + max_tokens > self.view.max_context:
            raise RequestError(
                400, f"This model's maximum context length is {self.view.max_context} tokens; "
                f"the request needs {n_prompt} prompt tokens plus max_tokens={max_tokens}",
                "messages", "context_length_exceeded",
            )  # fmt: skip
        with self.lock:
            return self.backend.generate([GenerateRequest(prompt, max_tokens, stop)])[0]

    @staticmethod
    def finish_reason(gen: Any, max_tokens: int) -> str:
        return "length" if gen.n_new_tokens >= max_tokens else "stop"

    def usage(self, gen: Any) -> dict[str, int]:
        return {
            "prompt_tokens": gen.n_prompt_tokens,
            "completion_tokens": gen.n_new_tokens,
            "total_tokens": gen.n_prompt_tokens + gen.n_new_tokens,
        }

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """A /v1/chat/completions reply."""
        _check_common(body, self.model_id)
        prompt = self.chat_prompt(body.get("messages"))
        max_tokens = _budget(body, DEFAULT_MAX_TOKENS)
        gen = self.generate(prompt, max_tokens, _stops(body.get("stop")))
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": gen.text},
                "logprobs": None, "finish_reason": self.finish_reason(gen, max_tokens),
            }],
            "usage": self.usage(gen),
        }  # fmt: skip

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """A /v1/completions reply (the prompt as given, no chat template)."""
        _check_common(body, self.model_id)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(400, "prompt must be a string (or a list of one)", "prompt")
        max_tokens = _budget(body, 16)
        gen = self.generate(prompt, max_tokens, _stops(body.get("stop")))
        text = (prompt if body.get("echo") else "") + gen.text
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": self.finish_reason(gen, max_tokens)}],
            "usage": self.usage(gen),
        }  # fmt: skip

    def models(self) -> dict[str, Any]:
        """The /v1/models listing."""
        entry = {"id": self.model_id, "object": "model", "created": self.created,
                 "owned_by": "diffbench"}  # fmt: skip
        return {"object": "list", "data": [entry]}


def make_app(server: Server) -> Any:
    """The FastAPI application over a server."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="diffbench serve", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def _bad_request(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(
            _error_body(err.status, err.message, err.param, err.code or None), err.status
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(_error_body(400, f"invalid request: {err.errors()[:1]}"), 400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(_error_body(err.status_code, str(err.detail)), err.status_code)

    async def _json(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise RequestError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def _run(fn: Any, body: dict[str, Any]) -> Any:
        try:
            return fn(body)
        except DiffbenchError as err:  # the backend refused the request's input
            raise RequestError(400, str(err)) from None

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return server.models()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_run, server.chat, await _json(request))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_run, server.completion, await _json(request))

    return app


def run_command(args: Any) -> int:
    """`diffbench serve`: load the model, then serve until interrupted."""
    from diffbench.models import ModelSpec, check_spec, load_backend, parse_model_args

    if not 0 < args.port < 65536:
        raise DiffbenchError(f"--port must lie in 1..65535, not {args.port}")
    name = args.name or args.model
    options = parse_model_args([f"{name}:{args.model_args}"])[name] if args.model_args else {}
    spec = ModelSpec("served", args.model, options)
    check_spec(spec)
    backend = load_backend(spec)
    import uvicorn

    app = make_app(Server(backend, name))
    log.info("serving %s as %r on http://%s:%d/v1", args.model, name, args.host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    try:
        uvicorn.Server(config).run()
    finally:
        backend.close()
    return 0
