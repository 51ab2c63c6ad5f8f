"""``chat models …``: list aliases and GGUF files found; download one."""

from __future__ import annotations

from pathlib import Path
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
                assert entry is not None
                star = " (default)" if alias == config.default_model else ""
                remote = f"  [remote, engine {(entry.model_extra or {}).get('engine') or 'auto'}]" if entry.url else ""
                echo(f"  {alias}{star} → {entry.location}{remote}")
        files = find_gguf_files(app.paths)
        if files:
            echo("gguf files:")
            for f in files:
                echo(f"  {f.path}  {f.size / 2**20:.1f} MiB  [{f.where}]")
        if not config.models and not files:
            echo("no models found — " + how_to_get_a_model(app.paths))


@models_app.command("show")
def show(
    model: Annotated[str, typer.Argument(help="GGUF file, model folder, or alias from config.")],
    template: Annotated[
        str | None, typer.Option("--template", metavar="NAME|FILE", help="Try this chat template.")
    ] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="Force a backend.")] = None,
) -> None:
    """What a model is and how chat will talk to it: architecture, size, context, chat template and why."""
    with guard():
        from chat.cli.main import flag_name
        from chat.load_options import plan_options
        from chat.models import choose_model, load_backend

        app = AppContext()
        choice = choose_model(model, app.config, app.paths, backend)
        flags = {"context_size": 256} | ({"template": template} if template else {})
        options = plan_options(choice, {}, app.paths.config_file, flags, flag_name)  # the entry's options apply
        loaded = load_backend(choice, options)
        try:
            info = loaded.info()
            stops = getattr(getattr(loaded, "template", None), "stops", ())
        finally:
            loaded.close()
        echo(f"model:        {info.get('model', choice.location)}")
        echo(f"backend:      {info.get('backend', '')}")
        for key in ("name", "architecture", "description", "parameters", "size_bytes", "n_ctx_train"):
            if info.get(key) not in (None, ""):
                echo(f"{key + ':':<13} {info[key]}")
        echo(f"template:     {info.get('template', '?')}")
        if stops:
            echo(f"end of turn:  {' '.join(stops)}")


@models_app.command("pull")
def pull(
    repo: Annotated[str, typer.Argument(help="Hugging Face repo, e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF")],
    file: Annotated[str, typer.Argument(help="The .gguf file in that repo")],
    default: Annotated[bool, typer.Option("--default", help="Make it your default model (in config.toml).")] = False,
) -> None:
    """Download a GGUF file into your model dir (with a progress bar)."""
    with guard():
        from chat.models import pull as do_pull

        app = AppContext()
        path = do_pull(repo, file, app.paths)
        echo(f"saved {path}")
        if default:
            from chat.firstrun import record_default_model

            alias = Path(file).stem
            record_default_model(app.paths, alias, path)
            echo(f"default model: {alias} (in {app.paths.config_file}); run: chat")
        else:
            echo(f"run: chat -m {path}")
