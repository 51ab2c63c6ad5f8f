"""The default command: one-shot prompts and the interactive REPL."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from chat.cli.common import AppContext, guard, set_debug

HELP = """Chat with a local model, as yourself or as a persona.

With a PROMPT (or text on stdin) it answers once and exits; without one it starts
the interactive REPL. Use `-` as PROMPT to read the whole prompt from stdin;
piped text with a PROMPT is passed as context before it."""


def register(app: typer.Typer) -> None:
    app.command(name="talk", hidden=True, help=HELP, context_settings={"help_option_names": ["-h", "--help"]})(talk)


def talk(
    prompt: Annotated[Optional[list[str]], typer.Argument(help="The message; `-` reads it from stdin.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("-m", "--model", help="GGUF file, model folder, or alias from config.")] = None,
    persona: Annotated[Optional[str], typer.Option("-p", "--persona", help="Card name, path, or mix like teacher:0.7,pirate:0.3.")] = None,
    system: Annotated[Optional[str], typer.Option("-s", "--system", help="System prompt (replaces the persona's).")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="Sampler preset: greedy, precise, balanced, creative, or yours.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Most tokens to generate.")] = None,
    temperature: Annotated[Optional[str], typer.Option("--temperature", "-t", help="0 = greedy (reproducible).")] = None,
    top_k: Annotated[Optional[str], typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")] = None,
    top_p: Annotated[Optional[str], typer.Option("--top-p", help="Nucleus sampling (1 = off).")] = None,
    seed: Annotated[Optional[str], typer.Option("--seed", help="Random seed for reproducible sampling.")] = None,
    option: Annotated[Optional[list[str]], typer.Option("-o", "--option", help="Any sampler setting: -o KEY=VALUE (repeatable; `chat samplers`).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with text, usage and timings.")] = False,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the answer when it is complete.")] = False,
    no_history: Annotated[bool, typer.Option("--no-history", help="Do not save this conversation.")] = False,
    cont: Annotated[bool, typer.Option("-c", "--continue", help="Continue the last conversation.")] = False,
    cid: Annotated[Optional[str], typer.Option("--cid", help="Continue the conversation with this id.")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="Force a backend (see `chat plugins`).")] = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help="Context window in tokens.")] = None,
    gpu_layers: Annotated[Optional[int], typer.Option("--gpu-layers", help="Layers to offload to the GPU (-1 = all).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="torch device (transformers backend).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="torch dtype (transformers backend).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    set_debug(debug)
    if version:
        from chat import __version__

        typer.echo(f"chat {__version__}")
        return
    with guard():
        from chat.cli.talk import Request, run_request

        flags: dict[str, str] = {}
        for key, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("seed", seed)):
            if value is not None:
                flags[key] = value
        if max_tokens is not None:
            flags["max_tokens"] = str(max_tokens)
        request = Request(
            prompt=" ".join(prompt) if prompt else None,
            model=model,
            persona=persona,
            system=system,
            preset=preset,
            flags=flags,
            options=list(option or []),
            as_json=as_json,
            stream=not no_stream and not as_json,
            history=not no_history,
            cont=cont,
            cid=cid,
            backend=backend,
            backend_options={
                k: v
                for k, v in (("context_size", ctx), ("gpu_layers", gpu_layers), ("threads", threads), ("device", device), ("dtype", dtype))
                if v is not None
            },
        )
        code = run_request(AppContext(), request)
    if code:
        raise typer.Exit(code)

