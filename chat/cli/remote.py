"""``chat models served`` and ``chat personas serve-args``: what an engine serves, and how to serve a card on one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chat.cli.common import AppContext, echo, guard


def register(models_app: typer.Typer, personas_app: typer.Typer) -> None:
    models_app.command("served")(served)
    personas_app.command("serve-args")(serve_args)


def served(
    target: Annotated[str, typer.Argument(help="A serving engine's URL (http://host:8000/v1) or a [models] alias.")],
) -> None:
    """The models (and adapters) a serving engine offers, from its /v1/models, and what chat found out about it."""
    with guard():
        from chat.cli.main import flag_name
        from chat.errors import UsageError
        from chat.load_options import plan_options
        from chat.models import choose_model, load_backend

        app = AppContext()
        choice = choose_model(target, app.config, app.paths)
        options = plan_options(choice, app.config.backend, app.paths.config_file, {}, flag_name)
        backend = load_backend(choice, options)
        try:
            listing = getattr(backend, "served", None)
            if listing is None:
                raise UsageError(f"{target}: not a serving engine", "give its URL or a [models] entry with url")
            info = backend.info()
            echo(f"url:      {info['url']}")
            echo(f"engine:   {info['engine']}")
            echo(f"context:  {info['context_size']}")
            for m in listing():
                extra = f"  (adapter on {m['parent']}: {m.get('root') or '?'})" if m.get("parent") else ""
                echo(f"  {m.get('id')}{extra}")
            for a in getattr(backend, "lora_adapters", lambda: [])():
                echo(f"  lora id {a.get('id')}: {a.get('path')} (llama.cpp adapter)")
        finally:
            backend.close()


def serve_args(
    name: Annotated[str, typer.Argument(help="Card name, path, or mix.")],
    engine: Annotated[str, typer.Option("--engine", help="vllm or llamacpp (llama.cpp's llama-server).")] = "vllm",
) -> None:
    """The command-line arguments that make an engine serve this card's adapters, for `chat -m URL -p NAME`."""
    with guard():
        from chat.errors import UsageError

        if engine not in ("vllm", "llamacpp"):
            raise UsageError(f"--engine {engine!r}: not an engine with adapters", "choose vllm or llamacpp")
        persona = AppContext().catalog.resolve(name)
        args = _vllm_args(persona) if engine == "vllm" else _llamacpp_args(persona)
        for note in args[1]:
            echo(note, err=True)
        if args[0]:
            echo(" ".join(args[0]))


def _vllm_args(persona) -> tuple[list[str], list[str]]:
    from chat.convert.adapter import is_gguf_file
    from chat.parts.peft import read_peft

    notes: list[str] = []
    if len(persona.adapters) > 1 or any(a.scale != 1.0 for a in persona.adapters):
        notes.append(
            f"note: vLLM applies one adapter per request at scale 1; merge this card's with "
            f"`chat personas export {persona.name} --merged-lora -o {persona.name}-merged.gguf`, convert it "
            f"(chat convert adapter … --base BASE -o DIR) and serve that folder as {persona.name}"
        )
    if persona.steering:
        notes.append("note: control vectors are carried only by `chat serve`; vLLM will refuse this card")
    modules, rank = [], 0
    for a in persona.adapters:
        if is_gguf_file(a.path):
            notes.append(
                f"note: {a.path} is a GGUF; vLLM loads PEFT folders: chat convert adapter {a.path} --base BASE"
            )
            continue
        rank = max(rank, read_peft(Path(a.path)).rank)
        modules.append(f"{a.name}={a.path}")
    if not modules:
        return [], notes or [f"{persona.label} has no adapters to serve"]
    return ["--enable-lora", "--max-lora-rank", str(max(8, rank)), "--lora-modules", *modules], notes


def _llamacpp_args(persona) -> tuple[list[str], list[str]]:
    from chat.convert.adapter import is_gguf_file

    notes: list[str] = []
    if persona.steering:
        notes.append("note: control vectors are carried only by `chat serve`; llama.cpp's server will refuse this card")
    args: list[str] = []
    for a in persona.adapters:
        if not is_gguf_file(a.path):
            notes.append(f"note: {a.path} is a PEFT folder; convert it: chat convert adapter {a.path} --base BASE.gguf")
            continue
        args += ["--lora", str(a.path)]
    if not args:
        return [], notes or [f"{persona.label} has no adapters to serve"]
    return [*args, "--lora-init-without-apply"], notes
