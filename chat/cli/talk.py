"""Running a conversation from the command line: build the session, then answer once or start the REPL."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from chat.cli.common import AppContext
from chat.errors import ChatError, InputError, UsageError


@dataclass
class Request:
    prompt: str | None = None
    model: str | None = None
    persona: str | None = None
    system: str | None = None
    preset: str | None = None
    flags: dict[str, str] = field(default_factory=dict)
    options: list[str] = field(default_factory=list)
    as_json: bool = False
    show_prompt: bool = False
    verbose: bool = False
    plain: bool = False
    assume_yes: bool = False
    no_input: bool = False
    stream: bool = True
    history: bool = True
    cont: bool = False
    cid: str | None = None
    backend: str | None = None
    backend_options: dict = field(default_factory=dict)


def read_stdin() -> str:
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"stdin is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r})",
            "convert it first, e.g. `iconv -f latin1 -t utf-8 file | chat …`",
        ) from None


def stdin_is_terminal() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def build_prompt(request: Request) -> str | None:
    """The one-shot prompt, or None for the REPL."""
    interactive = stdin_is_terminal()
    if request.prompt == "-":
        text = read_stdin()
        if not text.strip():
            raise InputError("`-` was given but stdin is empty", "pipe the prompt in: echo 'question' | chat -")
        return text
    if request.prompt is not None:
        if not interactive:
            piped = read_stdin()
            if piped.strip():
                return f"{piped.rstrip()}\n\n{request.prompt}"
        return request.prompt
    if interactive:
        return None
    text = read_stdin()
    if not text.strip():
        raise InputError("no prompt given and stdin is empty", 'pass a prompt: chat "question", or run `chat` in a terminal for the REPL')
    return text


def run_request(app: AppContext, request: Request) -> int:
    from chat.signals import stop_signals_interrupt

    with stop_signals_interrupt():
        return _run_request(app, request)


def _prompt_to_show(request: Request) -> str | None:
    """``--show-prompt``: the message to show the prompt for; None shows the conversation as it stands."""
    if request.prompt is not None or stdin_is_terminal():
        return build_prompt(request) if request.prompt is not None else None
    piped = read_stdin()
    return piped if piped.strip() else None


def backend_options(config_backend: dict, flags: dict):
    """Config ``[backend]`` with the flags on top, validated; a bad value is one line naming the flag."""
    from pydantic import ValidationError

    from chat.backend import BackendOptions

    try:
        return BackendOptions(**{**config_backend, **flags})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "?"
        flag = FLAG_NAMES.get(key, key)
        where = f"--{flag}" if key in flags else f"config [backend] {key}"
        from chat.tomlfile import quote, shorten

        raise UsageError(f"{shorten(where)} {quote(err.get('input'))}: {err['msg'].removeprefix('Value error, ')}",
                         "see `chat --help`") from None


FLAG_NAMES = {"context_size": "ctx", "gpu_layers": "gpu-layers", "kv_cache_bytes": "kv_cache_bytes"}


def _run_request(app: AppContext, request: Request) -> int:
    from chat.models import load_backend
    from chat.persona import NO_PERSONA
    from chat.plugins import get_registry
    from chat.sampling import resolve_sampling, split_option
    from chat.session import Session

    if request.cont and request.cid:
        raise UsageError("--continue and --cid both given", "use one: -c for the last conversation, --cid ID for a given one")
    get_registry()  # plugin stages must be known before settings are validated
    prompt = _prompt_to_show(request) if request.show_prompt else build_prompt(request)

    flag_sampling: dict[str, str] = dict(request.flags)
    for opt in request.options:
        key, value = split_option(opt)
        if "=" not in opt:
            raise UsageError(f"-o {opt!r}: expected KEY=VALUE", "e.g. -o top_p=0.9")
        flag_sampling[key] = value
    resolve_sampling([("flags", flag_sampling)])  # refuse bad values before a model is loaded
    if request.preset:
        from chat.presets import load_preset

        load_preset(request.preset, app.paths)

    config = app.config
    options = backend_options(config.backend, request.backend_options)
    choice = _model_or_first_run(app, request)
    config = app.config  # the first run may have written a new default model into it
    store, cid, conv_persona = _conversation(app, request, config)

    persona_spec = request.persona or conv_persona or config.default_persona
    persona = app.catalog.resolve(persona_spec) if persona_spec and persona_spec != "default" else NO_PERSONA

    if prompt is None and not request.show_prompt:  # the REPL: say what takes the time before the first prompt appears
        from chat.render import Renderer

        Renderer().dim(f"loading {choice.label}…")
    backend = load_backend(choice, options)
    try:
        session = Session(
            backend,
            catalog=app.catalog,
            store=store,
            persona=persona,
            model_label=choice.label,
            preset=request.preset,
            config_sampling=config.sampling,
            flag_sampling=flag_sampling,
            system=request.system,
            conversation_id=cid,
            paths=app.paths,
        )
        if request.show_prompt:
            return show_prompt(session, prompt)
        if prompt is None:
            from chat.repl import Repl

            return Repl(session, app, verbose=request.verbose, markdown=_markdown(request, config)).run()
        return answer_once(session, prompt, request, markdown=_markdown(request, config))
    finally:
        backend.close()
        if store is not None:
            store.close()


def _model_or_first_run(app: AppContext, request: Request):
    """The model to load; with none given or configured, the first-run offer (chat.firstrun)."""
    from chat.errors import NoModelError
    from chat.models import choose_model

    try:
        return choose_model(request.model, app.config, app.paths, request.backend)
    except NoModelError:
        if request.model:
            raise
    from chat.firstrun import offer_default_model

    alias = offer_default_model(
        app.paths, assume_yes=request.assume_yes, no_input=request.no_input,
        interactive=stdin_is_terminal() and sys.stderr.isatty(),
    )
    app.__dict__.pop("config", None)  # read the config again: it names the new model now
    return choose_model(alias, app.config, app.paths, request.backend)


def _conversation(app: AppContext, request: Request, config):
    """(store or None, conversation id to continue or None, its persona spec or None)."""
    store = app.open_store() if request.history and config.history and not request.show_prompt else None
    if not (request.cont or request.cid):
        return store, None, None
    if store is None and not request.show_prompt:
        raise UsageError("cannot continue a conversation with history off", "drop --no-history")
    store = store or app.open_store()
    cid = request.cid
    if request.cont:
        cid = store.last_conversation_id()
        if cid is None:
            store.close()
            raise UsageError("there is no earlier conversation to continue", "start one without -c")
    conv = store.get_conversation(cid)
    return store, conv.id, conv.persona


def _markdown(request: Request, config) -> bool:
    """Render answers as Markdown: only on a terminal, never with NO_COLOR, --plain or `markdown = false`."""
    import os

    if request.plain or request.as_json or not request.stream or not config.markdown or os.environ.get("NO_COLOR"):
        return False
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def show_prompt(session, text: str | None) -> int:
    """``--show-prompt``: the exact prompt text and its token count, on stdout; nothing is generated or saved."""
    from chat.escapes import make_visible
    from chat.render import is_terminal

    rendered, n_tokens = session.preview(text)
    out = sys.stdout
    out.write(make_visible(rendered) if is_terminal(out) else rendered)
    if not rendered.endswith("\n"):
        out.write("\n")
    out.flush()
    from chat.render import Renderer

    Renderer().dim(f"[{n_tokens} tokens · template {session.backend.info().get('template', '?')}]")
    return 0


def answer_once(session, prompt: str, request: Request, markdown: bool = False) -> int:
    from chat.render import Renderer
    from chat.signals import exit_code

    renderer = Renderer(markdown=markdown)
    for note in session.notes:
        renderer.note(note)
    session.notes.clear()
    chunks = session.send(prompt)
    interrupted: KeyboardInterrupt | None = None
    try:
        if request.stream:
            renderer.stream(chunks)
        else:
            for _ in chunks:
                pass
    except KeyboardInterrupt as exc:
        interrupted = exc
    finally:
        chunks.close()
    for note in session.notes:
        renderer.note(note)
    turn = session.last
    if request.as_json:
        renderer.json(
            {
                "text": turn.text,
                "model": session.model_label,
                "persona": session.persona_name,
                "finish_reason": turn.finish.reason,
                "usage": {
                    "prompt_tokens": turn.finish.usage.prompt_tokens,
                    "completion_tokens": turn.finish.usage.completion_tokens,
                    "cached_tokens": turn.finish.usage.cached_tokens,
                },
                "timings": {
                    "ttft_s": round(turn.finish.timings.ttft_s, 6),
                    "tokens_per_s": round(turn.finish.timings.tokens_per_s, 3),
                },
                "conversation_id": session.conversation_id,
            }
        )
    elif not request.stream:
        from chat.escapes import make_visible
        from chat.render import is_terminal

        text = make_visible(turn.text) if is_terminal(renderer.out) else turn.text
        renderer.out.write(text + ("" if text.endswith("\n") else "\n"))
        renderer.out.flush()
    if request.verbose:
        renderer.stats(turn.finish)
    if interrupted is not None:
        return exit_code(interrupted)
    if turn.finish.reason == "error":
        return 1
    return 0


__all__ = ["Request", "run_request", "ChatError"]
