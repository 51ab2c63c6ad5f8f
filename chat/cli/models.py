"""``chat models …``: list aliases and GGUF files found; download one."""

from __future__ import annotations

from typing import Annotated

import typer

from chat.cli.common import AppContext, echo, guard

models_app = typer.Typer(help="List and download models.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")


@models_app.command("list")
def list_models() -> None:
    """Aliases from your config, and GGUF files in your model dir and the Hugging Face cache."""
    with guard():
        from chat.config import model_entry
        from chat.models import find_gguf_files, how_to_get_a_model

        app = AppContext()
        config = app.config
        if config.models:
            echo("aliases:")
            for alias in sorted(config.models):
                entry = model_entry(config, alias)
                star = " (default)" if alias == config.default_model else ""
                echo(f"  {alias}{star} → {entry.path}")
        files = find_gguf_files(app.paths)
        if files:
            echo("gguf files:")
            for f in files:
                echo(f"  {f.path}  {f.size / 2**20:.1f} MiB  [{f.where}]")
        if not config.models and not files:
            echo("no models found — " + how_to_get_a_model(app.paths))


@models_app.command("pull")
def pull(
    repo: Annotated[str, typer.Argument(help="Hugging Face repo, e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF")],
    file: Annotated[str, typer.Argument(help="The .gguf file in that repo")],
) -> None:
    """Download a GGUF file into your model dir (with a progress bar)."""
    with guard():
        from chat.models import pull as do_pull

        app = AppContext()
        path = do_pull(repo, file, app.paths)
        echo(f"saved {path}")
        echo(f"run: chat -m {path}")
