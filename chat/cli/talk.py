"""Running a conversation from the command line: build the session, then answer once or start the REPL."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from chat.cli.common import AppContext
from chat.errors import ChatError, InputError, UsageError

if TYPE_CHECKING:
    from chat.backend import BackendOptions
    from chat.models import ModelChoice
    from chat.persona import Persona
    from chat.samplerlayers import SamplerLayers
    from chat.sampling import SamplerSettings
    from chat.store import Store


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
    greeting: int | None = None  # --greeting N: which of the persona's greetings the REPL opens with


def read_stdin() -> str:
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"stdin is not UTF-8 text (byte {exc.start}: {data[exc.start : exc.start + 1]!r})",
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
        raise InputError(
            "no prompt given and stdin is empty",
            'pass a prompt: chat "question", or run `chat` in a terminal for the REPL',
        )
    return text


def run_request(app: AppContext, request: Request) -> int:
    """Plan the request (every user error is raised there, before a model loads), then carry it out."""
    from chat.signals import stop_signals_interrupt

    with stop_signals_interrupt():
        plan, store = plan_request(app, request)
        try:
            return execute(app, plan, store)
        finally:
            if store is not None:
                store.close()


def _prompt_to_show(request: Request) -> str | None:
    """``--show-prompt``: the message to show the prompt for; None shows the conversation as it stands."""
    if request.prompt is not None or stdin_is_terminal():
        return build_prompt(request) if request.prompt is not None else None
    piped = read_stdin()
    return piped if piped.strip() else None


def backend_options(app: AppContext, choice: ModelChoice, flags: dict) -> BackendOptions:
    """The chosen backend's load options: config.toml's [backend] and model entry, then the flags.

    A key that backend does not declare, or a bad value, is one line naming the flag or config key.
    """
    from chat.cli.main import flag_name
    from chat.load_options import plan_options

    return plan_options(choice, app.config.backend, app.paths.config_file, flags, flag_name)


@dataclass(frozen=True)
class Output:
    """How answers are shown, decided once from the flags, the config and the terminal."""

    json: bool = False
    stream: bool = True
    markdown: bool = False
    verbose: bool = False


@dataclass(frozen=True)
class RequestPlan:
    """What one ``chat`` run does, decided and checked before a model loads; carrying it out only loads the
    model, talks and renders."""

    action: Literal["answer", "repl", "show-prompt"]
    prompt: str | None  # the one-shot message; for show-prompt None shows the conversation as it stands
    model: ModelChoice
    options: BackendOptions
    persona: Persona
    layers: SamplerLayers
    sampling: SamplerSettings  # resolved from the layers and the persona's card
    sampling_sources: Mapping[str, str]
    system: str | None
    conversation_id: str | None  # the saved conversation to continue
    output: Output
    greeting: int = 1  # which greeting the REPL opens with (--greeting N)


def plan_request(app: AppContext, request: Request) -> tuple[RequestPlan, Store | None]:
    """The plan, and the history store it opened (None when nothing is saved or continued).

    Every mistake a user can make — conflicting flags, bad sampler values, an unknown preset,
    persona or conversation, a missing model — is raised here, before a model loads or a
    first model is offered for download.
    """
    from chat.persona import NO_PERSONA
    from chat.samplerlayers import SamplerLayers

    if request.cont and request.cid:
        raise UsageError(
            "--continue and --cid both given", "use one: -c for the last conversation, --cid ID for a given one"
        )
    action: Literal["answer", "repl", "show-prompt"] = "show-prompt"
    if request.show_prompt:
        prompt = _prompt_to_show(request)
    else:
        prompt = build_prompt(request)
        action = "repl" if prompt is None else "answer"
    layers = SamplerLayers.read(
        config=app.config.sampling, preset=request.preset, paths=app.paths, flags=_flag_layer(request)
    )
    store, cid, conv_persona = _conversation(app, request)
    try:
        persona_spec = request.persona or conv_persona or app.config.default_persona
        persona = app.catalog.resolve(persona_spec) if persona_spec and persona_spec != "default" else NO_PERSONA
        settings, sources = layers.resolve(persona.label, persona.sampling)
        greeting = _greeting_number(persona, request.greeting)
        choice = _model_or_first_run(app, _with_card_model(request, persona))
        options = backend_options(app, choice, _with_card_context(request, persona))  # its backend is known now
    except BaseException:
        if store is not None:
            store.close()
        raise
    plan = RequestPlan(
        action=action,
        prompt=prompt,
        model=choice,
        options=options,
        persona=persona,
        layers=layers,
        sampling=settings,
        sampling_sources=MappingProxyType(sources),
        system=request.system,
        conversation_id=cid,
        output=_output(request, app.config),
        greeting=greeting,
    )
    return plan, store


def _greeting_number(persona: Persona, number: int | None) -> int:
    """``--greeting N`` checked against the persona's greetings (1 = its ``greeting``)."""
    if number is None:
        return 1
    count = len(persona.all_greetings)
    if not 1 <= number <= count:
        raise UsageError(
            f"--greeting {number}: {persona.label} has {count} greeting(s)",
            "`chat personas show NAME` lists them" if count else "this persona has no greeting",
        )
    return number


def _with_card_model(request: Request, persona: Persona) -> Request:
    """A card's recorded model (an imported Modelfile's FROM) is -m's default when it names an existing file."""
    import dataclasses
    import os

    if request.model or not persona.model or not os.path.isabs(persona.model) or not os.path.exists(persona.model):
        return request
    return dataclasses.replace(request, model=persona.model)


def _with_card_context(request: Request, persona: Persona) -> dict:
    """The backend flags, with the card's ``context_size`` (an imported num_ctx) when --ctx is not given."""
    if persona.context_size and "context_size" not in request.backend_options:
        return {**request.backend_options, "context_size": persona.context_size}
    return request.backend_options


def _flag_layer(request: Request) -> dict[str, str]:
    """The sampler flags and ``-o KEY=VALUE`` options as one layer (its values are checked with the others)."""
    from chat.sampling import split_option

    flags: dict[str, str] = dict(request.flags)
    for opt in request.options:
        key, value = split_option(opt)
        if "=" not in opt:
            raise UsageError(f"-o {opt!r}: expected KEY=VALUE", "e.g. -o top_p=0.9")
        flags[key] = value
    return flags


def execute(app: AppContext, plan: RequestPlan, store: Store | None) -> int:
    """Load the model, run the session the plan describes, render; the model is closed however it ends."""
    from chat.models import load_backend
    from chat.render import Renderer
    from chat.session import Session

    if plan.action == "repl":  # say what takes the time before the first prompt appears
        Renderer().dim(f"loading {plan.model.label}…")
    backend = load_backend(plan.model, plan.options)
    try:
        session = Session(
            backend,
            catalog=app.catalog,
            store=store,
            persona=plan.persona,
            model_label=plan.model.label,
            layers=plan.layers,
            sampling=(plan.sampling, plan.sampling_sources),
            system=plan.system,
            conversation_id=plan.conversation_id,
            user_name=app.config.user_name,
        )
        if plan.action == "show-prompt":
            return show_prompt(session, plan.prompt)
        if plan.action == "repl":
            from chat.cli.common import debugging
            from chat.repl import Repl

            repl = Repl(
                session,
                input_history=app.paths.input_history,
                verbose=plan.output.verbose,
                markdown=plan.output.markdown,
                debug=debugging(),
            )
            repl.greeting_number = plan.greeting
            return repl.run()
        assert plan.prompt is not None
        return answer_once(session, plan.prompt, plan.output)
    finally:
        backend.close()


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
        app.paths,
        assume_yes=request.assume_yes,
        no_input=request.no_input,
        interactive=stdin_is_terminal() and sys.stderr.isatty(),
    )
    app.__dict__.pop("config", None)  # read the config again: it names the new model now
    return choose_model(alias, app.config, app.paths, request.backend)


def _conversation(app: AppContext, request: Request) -> tuple[Store | None, str | None, str | None]:
    """(the history store or None, the conversation id to continue or None, its persona spec or None)."""
    store = app.open_store() if request.history and app.config.history and not request.show_prompt else None
    if not (request.cont or request.cid):
        return store, None, None
    if store is None and not request.show_prompt:
        raise UsageError("cannot continue a conversation with history off", "drop --no-history")
    store = store or app.open_store()
    try:
        cid = store.last_conversation_id() if request.cont else request.cid
        if cid is None:
            raise UsageError("there is no earlier conversation to continue", "start one without -c")
        conv = store.get_conversation(cid)
    except BaseException:
        store.close()
        raise
    return store, conv.id, conv.persona


def _output(request: Request, config) -> Output:
    """``--json``, ``--no-stream``, ``--verbose`` and whether a terminal gets Markdown."""
    return Output(
        json=request.as_json, stream=request.stream, markdown=_markdown(request, config), verbose=request.verbose
    )


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
    prompt = getattr(session, "last_prompt", None)
    for line in prompt.knowledge_lines() if prompt is not None else []:  # which knowledge fired, and why
        Renderer().dim(f"[{line}]")
    return 0


def answer_once(session, prompt: str, output: Output) -> int:
    """Send one message and render the answer; the exit code says how it ended.

    A failure inside the backend that is not a ChatError (a plugin's bug) still ends the
    answer cleanly: what was said is saved, marked ``error``, ``--json`` still prints, and
    the failure is one red line with exit code 1 (``--debug`` shows its traceback instead).
    """
    from chat.cli.common import debugging
    from chat.render import Renderer
    from chat.signals import exit_code

    renderer = Renderer(markdown=output.markdown)
    for note in session.notes:
        renderer.note(note)
    session.notes.clear()
    chunks = session.send(prompt)
    interrupted: KeyboardInterrupt | None = None
    failure: Exception | None = None
    try:
        if output.stream:
            renderer.stream(chunks)
        else:
            for _ in chunks:
                pass
    except KeyboardInterrupt as exc:
        interrupted = exc
    except ChatError:
        raise
    except Exception as exc:
        if debugging():
            raise
        failure = exc
    finally:
        chunks.close()
    for note in session.notes:
        renderer.note(note)
    _render_answer(renderer, session, output)
    if interrupted is not None:
        return exit_code(interrupted)
    if failure is not None:
        from chat.tomlfile import shorten

        raise ChatError(
            f"the answer failed: {failure.__class__.__name__}: {shorten(str(failure), 200)}",
            "the partial answer is kept in history, marked as an error; --debug shows the traceback",
        ) from failure
    return 1 if session.last.finish.reason == "error" else 0


def _render_answer(renderer, session, output: Output) -> None:
    """After the answer: ``--json``'s object, or the whole text with ``--no-stream``, and ``--verbose``'s stats."""
    turn = session.last
    if output.json:
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
                    "virtual_tokens": turn.finish.usage.virtual_tokens,
                },
                "timings": {
                    "ttft_s": round(turn.finish.timings.ttft_s, 6),
                    "tokens_per_s": round(turn.finish.timings.tokens_per_s, 3),
                },
                "conversation_id": session.conversation_id,
            }
        )
    elif not output.stream:
        from chat.escapes import make_visible
        from chat.render import is_terminal

        text = make_visible(turn.text) if is_terminal(renderer.out) else turn.text
        renderer.out.write(text + ("" if text.endswith("\n") else "\n"))
        renderer.out.flush()
    if output.verbose:
        renderer.stats(turn.finish)


__all__ = ["Request", "RequestPlan", "execute", "plan_request", "run_request"]
