"""The plugin manager: built-ins and third-party plugins through the same hooks.

Third-party plugins come from the ``chat`` entry-point group; built-ins are a
fixed list of modules, registered the same way, so they load even when entry
points are switched off (``CHAT_LOAD_PLUGINS=''`` or in tests).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Callable

import pluggy

from chat import hookspecs

DEFAULT_PLUGINS: tuple[str, ...] = (
    "chat_plugins.llamacpp",
    "chat_plugins.transformers_backend",
    "chat_plugins.word_filter",
    "chat_personas",
)


@cache
def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("chat")
    pm.add_hookspecs(hookspecs)
    allow = os.environ.get("CHAT_LOAD_PLUGINS")
    if allow is None:
        pm.load_setuptools_entrypoints("chat")
    elif allow.strip():
        from importlib.metadata import entry_points

        wanted = {n.strip() for n in allow.split(",") if n.strip()}
        for ep in entry_points(group="chat"):
            if ep.name in wanted and not pm.get_plugin(ep.name):
                pm.register(ep.load(), name=ep.name)
    for name in DEFAULT_PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # a built-in not shipped in this install
            raise
        pm.register(module, name=name)
    return pm


@dataclass
class Registry:
    """Everything the loaded plugins registered, with the plugin each came from."""

    backends: dict[str, Any] = field(default_factory=dict)
    personas: list[tuple[Any, dict[str, Any], str]] = field(default_factory=list)
    commands: dict[str, tuple[Callable, str, str]] = field(default_factory=dict)
    samplers: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # "backend:NAME" → plugin name


def _collect(hook_name: str, add: Callable[[str, tuple, dict], None]) -> None:
    pm = get_plugin_manager()
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        plugin = impl.plugin_name

        def register(*args: Any, _plugin: str = plugin, **kwargs: Any) -> None:
            add(_plugin, args, kwargs)

        impl.function(register=register)


@cache
def get_registry() -> Registry:
    from chat.sampling import set_plugin_stages

    reg = Registry()

    def add_backend(plugin: str, args: tuple, kwargs: dict) -> None:
        cls = args[0]
        reg.backends[cls.name] = cls
        reg.sources[f"backend:{cls.name}"] = plugin

    def add_persona(plugin: str, args: tuple, kwargs: dict) -> None:
        reg.personas.append((args[0], kwargs, plugin))

    def add_command(plugin: str, args: tuple, kwargs: dict) -> None:
        name, fn = args[0].lstrip("/"), args[1]
        reg.commands[name] = (fn, kwargs.get("help", (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""), plugin)
        reg.sources[f"command:{name}"] = plugin

    def add_sampler(plugin: str, args: tuple, kwargs: dict) -> None:
        stage = args[0]
        reg.samplers[stage.name] = stage
        reg.sources[f"sampler:{stage.name}"] = plugin

    _collect("register_backends", add_backend)
    _collect("register_personas", add_persona)
    _collect("register_commands", add_command)
    _collect("register_samplers", add_sampler)
    set_plugin_stages(reg.samplers)
    return reg


def plugin_summary() -> list[dict[str, Any]]:
    """For ``chat plugins``: each loaded plugin and the hooks it implements."""
    pm = get_plugin_manager()
    out = []
    for name, plugin in pm.list_name_plugin():
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        dist = next((d for p, d in pm.list_plugin_distinfo() if p is plugin), None)
        out.append({
            "name": name,
            "hooks": hooks,
            "builtin": name in DEFAULT_PLUGINS,
            "version": getattr(dist, "version", None) if dist else None,
        })
    return out
