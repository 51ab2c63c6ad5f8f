"""The default command: one-shot prompts and the interactive REPL."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand

from chat.cli.common import AppContext, guard, set_debug

HELP = """Chat with a local model, as yourself or as a persona.

With a PROMPT (or text on stdin) it answers once and exits; without one it starts
the interactive REPL. Use `-` as PROMPT to read the whole prompt from stdin;
piped text with a PROMPT is passed as context before it. An answer runs until the
model ends its turn, --max-tokens, or the context is full."""


class TalkCommand(TyperCommand):
    """The default command answers to the name ``chat``: usage lines and errors never name a hidden ``chat talk``."""

    def make_context(self, info_name: Any, args: list[str], parent: Any = None, **extra: Any) -> Any:
        if parent is not None:
            extra.setdefault("obj", parent.obj)
        return super().make_context("chat", args, None, **extra)


def register(app: typer.Typer) -> None:
    app.command(
        name="talk", cls=TalkCommand, hidden=True, help=HELP, context_settings={"help_option_names": ["-h", "--help"]}
    )(talk)


def talk(
    prompt: Annotated[
        Optional[list[str]], typer.Argument(help="The message; `-` reads it from stdin.", show_default=False)
    ] = None,
    model: Annotated[
        Optional[str], typer.Option("-m", "--model", help="GGUF file, model folder, or alias from config.")
    ] = None,
    persona: Annotated[
        Optional[str], typer.Option("-p", "--persona", help="Card name, path, or mix like teacher:0.7,pirate:0.3.")
    ] = None,
    system: Annotated[
        Optional[str], typer.Option("-s", "--system", help="System prompt (replaces the persona's).")
    ] = None,
    preset: Annotated[
        Optional[str], typer.Option("--preset", help="Sampler preset: greedy, precise, balanced, creative, or yours.")
    ] = None,
    max_tokens: Annotated[
        Optional[int],
        typer.Option(
            "--max-tokens",
            metavar="INT",
            help="Most tokens to generate (default: until the end of the turn or a full context).",
        ),
    ] = None,
    temperature: Annotated[
        Optional[str], typer.Option("--temperature", "-t", metavar="FLOAT", help="0 = greedy (reproducible).")
    ] = None,
    top_k: Annotated[
        Optional[str], typer.Option("--top-k", metavar="INT", help="Keep the k most likely tokens (0 = off).")
    ] = None,
    top_p: Annotated[
        Optional[str], typer.Option("--top-p", metavar="FLOAT", help="Nucleus sampling (1 = off).")
    ] = None,
    seed: Annotated[
        Optional[str], typer.Option("--seed", metavar="INT", help="Random seed for reproducible sampling.")
    ] = None,
    beams: Annotated[
        Optional[str],
        typer.Option(
            "--beams",
            metavar="INT",
            help="Beam search with N beams (2-8; -o length_penalty=F) instead of sampling; "
            "the best beam is printed when it is final, not streamed.",
        ),
    ] = None,
    option: Annotated[
        Optional[list[str]],
        typer.Option("-o", "--option", help="Any sampler setting: -o KEY=VALUE (repeatable; `chat samplers`)."),
    ] = None,
    template: Annotated[
        Optional[str],
        typer.Option(
            "--template",
            metavar="NAME|FILE",
            help="Chat template: a well-known name (gemma, llama3, chatml, …) or a Jinja file.",
        ),
    ] = None,
    greeting: Annotated[
        Optional[int],
        typer.Option(
            "--greeting", metavar="N", help="Open the REPL with the persona's greeting N (1 = its first; /greeting N)."
        ),
    ] = None,
    show_prompt: Annotated[
        bool,
        typer.Option(
            "--show-prompt", help="Print the exact prompt the model would get, with its token count, and exit."
        ),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="After each answer, one line of stats: tokens, tokens/s, time to first token, cached prompt tokens.",
        ),
    ] = False,
    plain: Annotated[
        bool, typer.Option("--plain", help="Print answers as plain text (no Markdown rendering) on a terminal too.")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Answer yes to questions (e.g. downloading a first model).")
    ] = False,
    no_input: Annotated[
        bool, typer.Option("--no-input", help="Never ask a question; fail with a message instead.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with text, usage and timings.")
    ] = False,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the answer when it is complete.")] = False,
    no_history: Annotated[bool, typer.Option("--no-history", help="Do not save this conversation.")] = False,
    cont: Annotated[bool, typer.Option("-c", "--continue", help="Continue the last conversation.")] = False,
    cid: Annotated[Optional[str], typer.Option("--cid", help="Continue the conversation with this id.")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="Force a backend (see `chat plugins`).")] = None,
    ctx: Annotated[
        Optional[int],
        typer.Option(
            "--ctx",
            metavar="INT",
            help="Context window in tokens (default: the model's own, at most 8192).",
        ),
    ] = None,
    gpu_layers: Annotated[
        Optional[int],
        typer.Option(
            "--gpu-layers",
            metavar="INT",
            help="Layers to offload to the GPU (-1 = all; llama.cpp backend).",
        ),
    ] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="INT", help="CPU threads.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="torch device (transformers backend).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="torch dtype (transformers backend).")] = None,
    backend_option: Annotated[
        Optional[list[str]],
        typer.Option(
            "-B",
            "--backend-option",
            metavar="KEY=VALUE",
            help="Any load option of the model's backend, e.g. -B kv_cache_bytes=0 (repeatable; `chat plugins`).",
        ),
    ] = None,
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
        for key, value in (
            ("temperature", temperature),
            ("top_k", top_k),
            ("top_p", top_p),
            ("seed", seed),
            ("beams", beams),
        ):
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
            show_prompt=show_prompt,
            verbose=verbose,
            plain=plain,
            assume_yes=yes,
            no_input=no_input,
            stream=not no_stream and not as_json,
            history=not no_history,
            cont=cont,
            cid=cid,
            backend=backend,
            greeting=greeting,
            backend_options=backend_flags(
                backend_option,
                context_size=ctx,
                gpu_layers=gpu_layers,
                threads=threads,
                device=device,
                dtype=dtype,
                template=template,
            ),
        )
        code = run_request(AppContext(), request)
    if code:
        raise typer.Exit(code)


BACKEND_FLAGS = {
    "context_size": "--ctx",
    "gpu_layers": "--gpu-layers",
    "threads": "--threads",
    "device": "--device",
    "dtype": "--dtype",
    "template": "--template",
}


def flag_name(key: str) -> str:
    """How the command line spells a backend option: its own flag, or ``-B KEY``."""
    return BACKEND_FLAGS.get(key) or f"-B {key}"


def backend_flags(pairs: list[str] | None, **flags: Any) -> dict[str, Any]:
    """The backend options given on the command line; which backend takes them is checked once it is chosen."""
    from chat.errors import UsageError

    given = {k: v for k, v in flags.items() if v is not None}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"-B {pair!r}: expected KEY=VALUE", "e.g. -B kv_cache_bytes=0; `chat plugins` lists them")
        if key in BACKEND_FLAGS:
            raise UsageError(f"-B {key}: use {BACKEND_FLAGS[key]}", f"e.g. {BACKEND_FLAGS[key]} {value or 'VALUE'}")
        given[key] = value
    return given
