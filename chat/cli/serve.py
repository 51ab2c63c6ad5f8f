"""``chat serve``: every persona card as a model over the OpenAI API, on one loaded base."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from chat.cli.common import AppContext, echo, guard, set_debug


def register(app: typer.Typer) -> None:
    app.command(name="serve", context_settings={"help_option_names": ["-h", "--help"]})(serve)


def serve(
    model: Annotated[
        str | None, typer.Option("-m", "--model", metavar="MODEL", help="GGUF file, model folder, or alias.")
    ] = None,
    host: Annotated[
        str, typer.Option("--host", metavar="ADDRESS", help="Address to bind (others can reach it only if you say so).")
    ] = ("127.0.0.1"),
    port: Annotated[int, typer.Option("--port", min=0, max=65535, metavar="PORT", help="TCP port.")] = 8000,
    slots: Annotated[
        int,
        typer.Option(
            "--slots",
            min=1,
            max=64,
            metavar="N",
            help="Requests generating at once (independent sequences on the one model).",
        ),
    ] = 2,
    queue: Annotated[
        int,
        typer.Option(
            "--queue",
            min=0,
            max=10000,
            metavar="N",
            help="Requests that may wait for a slot; beyond them the answer is 503.",
        ),
    ] = 64,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            "--api-key-env",
            metavar="VAR",
            help="Require `Authorization: Bearer $VAR` (the key is read from VAR).",
        ),
    ] = None,
    ctx: Annotated[int | None, typer.Option("--ctx", metavar="INT", help="Context window per slot.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", metavar="INT", help="CPU threads.")] = None,
    backend: Annotated[
        str | None, typer.Option("--backend", metavar="NAME", help="Force a backend (see `chat plugins`).")
    ] = None,
    backend_option: Annotated[
        list[str] | None,
        typer.Option(
            "-B",
            "--backend-option",
            metavar="KEY=VALUE",
            help="Any load option of the model's backend (repeatable).",
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Serve the personas as models over the OpenAI API (chat completions and completions)."""
    set_debug(debug)
    with guard():
        from chat.cli.main import backend_flags, flag_name
        from chat.errors import UsageError
        from chat.load_options import plan_options
        from chat.localbackend import LocalBackend
        from chat.models import choose_model, load_backend
        from chat.plugins import get_registry
        from chat.serve.app import ServerState, create_app
        from chat.serve.pool import SlotPool

        key = None
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise UsageError(f"--api-key-env {api_key_env}: the variable is not set", f"export {api_key_env}=…")
        app = AppContext()
        choice = choose_model(model, app.config, app.paths, backend)
        flags = backend_flags(backend_option, context_size=ctx, threads=threads)
        options = plan_options(choice, app.config.backend, app.paths.config_file, flags, flag_name)
        loaded = load_backend(choice, options)
        if not isinstance(loaded, LocalBackend):
            loaded.close()
            raise UsageError(f"{choice.label}: its backend has no slots to serve from", "serve a local model")
        while len(loaded.slots) < slots:
            loaded.new_slot()
        state = ServerState(
            backend=loaded,
            catalog=app.catalog,
            model_id=choice.label,
            pool=SlotPool(loaded.slots[:slots], queue),
            config_sampling=dict(app.config.sampling),
            default_persona=app.config.default_persona,
            user_name=getattr(app.config, "user_name", "User"),
            api_key=key,
            stages=get_registry().samplers,
        )
        echo(
            f"serving {choice.label} with {slots} slot(s) on http://{host}:{port}/v1 — "
            f"models: {', '.join([choice.label, *app.catalog.names()])}",
            err=True,
        )
        try:
            import uvicorn

            uvicorn.run(
                create_app(state),
                host=host,
                port=port,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=30,
            )
        finally:
            # Answers still running (a forced exit, the drain timeout) use the model from their threads:
            # stop them first; a model freed under a running llama_decode would crash the process.
            if state.pool.stop_all():
                loaded.close()
