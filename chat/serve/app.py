"""The OpenAI-compatible HTTP app: every persona card is a model, all on one loaded base.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.
A request's ``model`` names a card, a mix (``teacher:0.7,pirate:0.3``), or the base model itself
(the default persona). Its parameter pack is attached to the slot it gets, its prompt parts are
assembled by :func:`chat.prompt.assemble` exactly as for a conversation in the terminal — a system
message in the request replaces the card's system text — and its sampler values are layered over
the defaults, config.toml's ``[sampling]`` and the card's, then validated as on the command line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from chat.backend import Finish, Message
from chat.errors import ChatError, ContextOverflowError, PersonaError, SamplingError
from chat.escapes import make_visible
from chat.persona import NO_PERSONA, Persona
from chat.serve.api import (
    MAX_BODY_BYTES,
    APIError,
    ChatRequest,
    CommonRequest,
    CompletionRequest,
    chat_messages,
    param_of,
    parse,
    sampler_layer,
)
from chat.serve.pool import Generation, SlotPool


@dataclass
class ServerState:
    """What every request needs: the model, the cards, the config's sampler layer, the slots."""

    backend: Any
    catalog: Any
    model_id: str
    pool: SlotPool
    config_sampling: dict[str, Any] = field(default_factory=dict)
    default_persona: str | None = None
    user_name: str = "User"
    api_key: str | None = None
    stages: Any = None
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    _knowledge: dict[tuple[str, ...], Any] = field(default_factory=dict)  # by note roots, oldest first

    def persona(self, model: str) -> Persona:
        """The persona a request's ``model`` names; an unknown one is a 404.

        Only the catalog's cards (and mixes of them): a client never makes the server read a path.
        """
        names = [part.rpartition(":")[0] if ":" in part else part for part in model.split(",")]
        if any(_looks_like_path(n.strip()) for n in names):
            raise APIError(404, f"model {model!r} does not exist", code="model_not_found", param="model")
        if model in (self.model_id, "default"):
            spec = self.default_persona
            return self.catalog.resolve(spec) if spec and spec != "default" else NO_PERSONA
        try:
            return self.catalog.resolve(model)
        except PersonaError as exc:
            if "unknown" in exc.message or "no persona" in exc.message or "not found" in exc.message:
                raise APIError(
                    404, f"model {model!r} does not exist: {exc.message}", code="model_not_found", param="model"
                ) from None
            raise APIError(400, f"model {model!r}: {exc.message}", param="model") from None

    def settings(self, persona: Persona, layer: dict[str, Any]) -> Any:
        from chat.sampling import resolve_sampling

        try:
            settings, _ = resolve_sampling(
                [
                    ("defaults", {}),
                    ("config", self.config_sampling),
                    (f"card {persona.label}", persona.sampling),
                    ("request", layer),
                ],
                stages=self.stages,
            )
        except SamplingError as exc:
            raise APIError(400, exc.message, param=param_of(exc.message)) from None
        return settings

    def assemble(self, persona: Persona, conversation: list[Message], system: str | None) -> list[Message]:
        from chat.prompt import assemble, knowledge_state

        roots = tuple(sorted(str(k.path) for k in persona.knowledge if k.path is not None and k.enabled))
        knowledge = self._knowledge.pop(roots, None)
        if knowledge is None:
            knowledge = knowledge_state(persona)
            while len(self._knowledge) >= 32:  # bounded: each retriever holds a database connection
                old = self._knowledge.pop(next(iter(self._knowledge)))
                index = getattr(old.retriever, "index", None)
                if index is not None:
                    index.close()
        self._knowledge[roots] = knowledge  # most recently used last
        prompt = assemble(
            persona,
            conversation,
            user_name=self.user_name,
            system=system,
            retriever=knowledge.retriever,
            rng=knowledge.rng,
        )
        return prompt.messages


def create_app(state: ServerState) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def health(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "model": state.model_id,
                "slots": len(state.pool.slots),
                "busy": state.pool.busy,
                "context_size": getattr(state.backend, "context_size", None),  # for remote clients' accounting
            }
        )

    async def models(request: Request) -> Response:
        check_key(request)
        ids = [state.model_id, *state.catalog.names()]
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": i, "object": "model", "created": 0, "owned_by": "chat"} for i in dict.fromkeys(ids)],
            }
        )

    async def chat_completions(request: Request) -> Response:
        check_key(request)
        req: ChatRequest = parse(ChatRequest, await read_json(request))
        persona = state.persona(req.model)
        settings = state.settings(persona, sampler_layer(req))
        conversation, system = chat_messages(req)
        if req.persona_prompt:
            messages = state.assemble(persona, conversation, system)
        else:  # the client assembled the prompt itself (chat's remote backend): only the parameter parts apply
            messages = ([Message("system", system)] if system else []) + conversation

        def start(slot: Any, cancel: Callable[[], bool]) -> Iterator[str | Finish]:
            slot.apply(persona)
            return slot.stream(messages, settings, cancel=cancel)

        return await respond(request, req, start, chat=True, persona_label=persona.label)

    async def completions(request: Request) -> Response:
        check_key(request)
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        persona = state.persona(req.model)
        settings = state.settings(persona, sampler_layer(req))
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt: one prompt per request is supported", param="prompt")
        text = prompts[0]

        def start(slot: Any, cancel: Callable[[], bool]) -> Iterator[str | Finish]:
            slot.apply(persona)  # the card's parameter parts; a raw completion has no prompt parts
            return slot.stream_tokens(slot.text_tokens(text), settings, cancel=cancel)

        return await respond(
            request, req, start, chat=False, persona_label=persona.label, echo=text if req.echo else ""
        )

    async def respond(
        request: Request,
        req: CommonRequest,
        start: Callable[[Any, Callable[[], bool]], Iterator[str | Finish]],
        *,
        chat: bool,
        persona_label: str,
        echo: str = "",
    ) -> Response:
        """Wait for a slot, start the generation, answer; a client that leaves stops it at the next token."""
        from starlette.responses import StreamingResponse

        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, gone))
        try:
            slot = await _unless_gone(state.pool.acquire(persona_label), gone)
            generation = state.pool.start(slot, start)
            items = generation.items()
            try:
                first = await _unless_gone(items.__anext__(), gone)
            except StopAsyncIteration:  # pragma: no cover - a stream always ends with a Finish
                first = Finish("stop")
            except BaseException as exc:
                generation.cancel.set()
                if isinstance(exc, (asyncio.CancelledError, ClientGone)):
                    raise
                raise _api_error(exc) from None
            ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            created = int(time.time())
            if req.stream:
                watcher.cancel()  # the streaming response watches for the client itself
                return StreamingResponse(
                    sse(req, generation, items, first, ident, created, chat, echo),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            parts = [echo] if echo else []
            finish = first if isinstance(first, Finish) else None
            if finish is None:
                parts.append(str(first))
                try:
                    while finish is None:
                        item = await _unless_gone(items.__anext__(), gone)
                        if isinstance(item, Finish):
                            finish = item
                        else:
                            parts.append(item)
                except StopAsyncIteration:
                    pass
                except BaseException as exc:
                    generation.cancel.set()
                    if isinstance(exc, (asyncio.CancelledError, ClientGone)):
                        raise
                    raise _api_error(exc) from None
            finish = finish or Finish("stop")
            text = "".join(parts)
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}}
                if chat
                else {"index": 0, "text": text, "logprobs": None}
            )
            choice["finish_reason"] = _reason(finish)
            log_request(req, 200, finish)
            return JSONResponse(
                {
                    "id": ident,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": req.model,
                    "choices": [choice],
                    "usage": _usage(finish),
                }
            )
        except ClientGone:
            state.log(make_visible(f"client gone: model={req.model}"))
            return Response(status_code=499)
        finally:
            watcher.cancel()

    async def sse(
        req: CommonRequest,
        generation: Generation,
        items: AsyncIterator[str | Finish],
        first: Any,
        ident: str,
        created: int,
        chat: bool,
        echo: str,
    ) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict[str, Any] | str, reason: str | None = None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
            if chat:
                choice["delta"] = delta
            else:
                choice["text"], choice["logprobs"] = delta, None
            body = {"id": ident, "object": kind, "created": created, "model": req.model, "choices": [choice]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

        finish: Finish | None = None
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            if echo:
                yield chunk(echo)
            pending: list[Any] = [first]
            while True:
                item = pending.pop() if pending else await items.__anext__()
                if isinstance(item, Finish):
                    finish = item
                    break
                yield chunk({"content": item} if chat else item)
            yield chunk({} if chat else "", _reason(finish))
            if req.include_usage():
                body = {
                    "id": ident,
                    "object": kind,
                    "created": created,
                    "model": req.model,
                    "choices": [],
                    "usage": _usage(finish),
                }
                yield f"data: {json.dumps(body)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        except StopAsyncIteration:
            yield b"data: [DONE]\n\n"
        except Exception as exc:  # the stream has started: report the error in it, then end
            error = _api_error(exc)
            yield f"data: {json.dumps(error.body())}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            generation.cancel.set()  # a client that went away stops generation at the next token
            log_request(req, 200, finish)

    def check_key(request: Any) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if given != f"Bearer {state.api_key}":
            raise APIError(
                401,
                "missing or wrong API key (send Authorization: Bearer KEY)",
                "authentication_error",
                code="invalid_api_key",
            )

    async def read_json(request: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > MAX_BODY_BYTES:
                raise APIError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the body is not JSON: {exc}") from None
        except RecursionError:
            raise APIError(400, "the body is not JSON this server takes: nested too deeply") from None

    def log_request(req: CommonRequest, status: int, finish: Finish | None) -> None:
        used = (
            f" {finish.usage.prompt_tokens}+{finish.usage.completion_tokens} tokens {finish.reason}" if finish else ""
        )
        state.log(make_visible(f"{status} model={req.model}{' stream' if req.stream else ''}{used}"))

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        state.log(make_visible(f"{exc.status} {request.method} {request.url.path}: {exc.message}"))
        return JSONResponse(exc.body(), status_code=exc.status)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        error = APIError(
            status, f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}", code="not_found"
        )
        return JSONResponse(error.body(), status_code=status)

    def guarded(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """Every failure is an OpenAI error object and one log line; no traceback reaches the log."""

        async def run(request: Request) -> Response:
            try:
                response: Response = await handler(request)
                return response
            except Exception as exc:
                return await api_error(request, _api_error(exc))

        return run

    from starlette.exceptions import HTTPException

    routes = [
        Route("/health", guarded(health)),
        Route("/v1/models", guarded(models)),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


async def _watch_disconnect(request: Any, gone: asyncio.Event) -> None:
    """Set ``gone`` when the client disconnects (the body has been read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            gone.set()
            return


async def _unless_gone(awaitable: Any, gone: asyncio.Event) -> Any:
    """Await ``awaitable``, or raise ClientGone (cancelling it) as soon as the client has left."""
    task = asyncio.ensure_future(awaitable)
    waiter = asyncio.ensure_future(gone.wait())
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone


def _api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return APIError(400, exc.message, param="messages", code="context_length_exceeded")
    if isinstance(exc, SamplingError):
        return APIError(400, exc.message, param=param_of(exc.message))
    if isinstance(exc, ChatError):
        return APIError(500, exc.message, "server_error")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def _looks_like_path(name: str) -> bool:
    return "/" in name or "\\" in name or name.startswith((".", "~")) or name.endswith(".toml")


def _reason(finish: Finish | None) -> str:
    return "length" if finish is not None and finish.reason == "length" else "stop"


def _usage(finish: Finish | None) -> dict[str, int]:
    usage = finish.usage if finish else None
    prompt = usage.prompt_tokens if usage else 0
    completion = usage.completion_tokens if usage else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
