"""``chat plugins`` and ``chat samplers``: what is loaded, and every sampler setting."""

from __future__ import annotations

from pathlib import Path

import typer

from chat.cli.common import echo, guard


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins)
    app.add_typer(samplers_app, name="samplers")


def plugins() -> None:
    """Loaded plugins, the hooks they implement, what they registered, and each backend's load options."""
    with guard():
        from chat.plugins import get_registry, plugin_summary

        reg = get_registry()
        for p in plugin_summary():
            kind = "built-in" if p["builtin"] else "third-party"
            ver = f" {p['version']}" if p["version"] else ""
            echo(f"{p['name']}{ver}  [{kind}]  hooks: {', '.join(p['hooks'])}")
            provided = [k for k, v in reg.sources.items() if v == p["name"]]
            provided += [f"persona:{kw.get('name') or Path(t).name}" for t, kw, src in reg.personas if src == p["name"]]
            if provided:
                echo("    provides: " + ", ".join(sorted(provided)))
            for name, cls in sorted(reg.backends.items()):
                if reg.sources.get(f"backend:{name}") == p["name"]:
                    _backend_options(name, cls)


def _backend_options(name: str, cls: type) -> None:
    """A backend's load options (given as flags, ``-B KEY=VALUE`` or in config.toml's [backend])."""
    from chat.cli.main import flag_name
    from chat.load_options import describe_options

    echo(f"    backend {name} (priority {getattr(cls, 'priority', 0)}) options:")
    for key, kind, default, description in describe_options(cls):
        flag = flag_name(key)
        echo(f"      {key} ({flag}): {kind} = {default!r}  {description}")


samplers_app = typer.Typer(help="Sampler settings, stages and presets.", invoke_without_command=True)


@samplers_app.callback()
def samplers(ctx: typer.Context) -> None:
    """Every sampler setting with its default and range, the stages, and the presets."""
    if ctx.invoked_subcommand:
        return
    with guard():
        from chat.cli.common import AppContext
        from chat.plugins import get_registry
        from chat.presets import all_presets
        from chat.sampling import DEFAULT_ORDER, STAGE_PARAMS, describe_fields

        reg = get_registry()
        fields = {name: (default, desc) for name, default, desc in describe_fields()}
        echo("stages (run in `order`; each with its settings = default: meaning):")
        for stage, params in STAGE_PARAMS.items():
            echo(f"  {stage}  [built-in]")
            for name in params:
                default, desc = fields.pop(name)
                echo(f"      {name} = {default!r}: {desc}")
        for name, stage in reg.samplers.items():
            echo(f"  {name}  [{reg.sources.get('sampler:' + name)}]  {stage.description}")
            for pname, f in stage.params.model_fields.items():
                default = f.default_factory() if f.default_factory else f.default
                echo(f"      {name}.{pname} = {default!r}: {f.description or ''}")
        echo(f"default order: {','.join(DEFAULT_ORDER)}")
        echo("")
        echo("settings for the whole chain:")
        for name, (default, desc) in fields.items():
            echo(f"  {name} = {default!r}: {desc}")
        echo("")
        echo("presets:")
        for name, (values, src) in sorted(all_presets(AppContext().paths).items()):
            echo(f"  {name}  [{src}]  " + ", ".join(f"{k}={v}" for k, v in values.items()))


@samplers_app.command("show")
def show(
    persona: str = typer.Option(None, "-p", "--persona", help="Include this card's [sampling]."),
    preset: str = typer.Option(None, "--preset", help="Include this preset."),
    option: list[str] = typer.Option(None, "-o", "--option", help="KEY=VALUE flags."),  # noqa: B008
) -> None:
    """The effective settings for a persona/preset/flags, and where each value comes from."""
    with guard():
        from chat.cli.common import AppContext
        from chat.plugins import get_registry
        from chat.presets import load_preset
        from chat.sampling import resolve_sampling, split_option

        app = AppContext()
        layers = [("defaults", {}), ("config", app.config.sampling)]
        if preset:
            layers.append((f"preset {preset}", load_preset(preset, app.paths)))
        if persona:
            p = app.catalog.resolve(persona)
            layers.append((f"card {p.label}", p.sampling))
        layers.append(("flags", dict(split_option(o) for o in option or [])))
        stages = get_registry().samplers
        settings, sources = resolve_sampling(layers, stages=stages)
        for name, value in settings.model_dump().items():
            echo(f"  {name} = {value!r}  ({sources.get(name, 'default')})")
        echo(f"active stages: {', '.join(settings.active_stages())}")
