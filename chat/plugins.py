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
from chat.errors import ChatError

DEFAULT_PLUGINS: tuple[str, ...] = (
    "chat_plugins.llamacpp",
    "chat_plugins.transformers_backend",
    "chat_plugins.remote",
    "chat_plugins.word_filter",
    "chat_personas",
)


class PluginError(ChatError):
    """A plugin that pluggy refuses: a hook that does not exist, or one with arguments its spec lacks."""

    exit_code = 1


@cache
def get_plugin_manager() -> pluggy.PluginManager:
    """Third-party plugins (entry points, or only those named in ``CHAT_LOAD_PLUGINS``), then the built-ins.

    ``check_pending`` runs last, so a plugin implementing a hook that is not in ``chat.hookspecs``
    (a typo such as ``register_backend``) is a :class:`PluginError` naming it, not a hook never called.
    """
    pm = pluggy.PluginManager("chat")
    pm.add_hookspecs(hookspecs)
    try:
        _register_all(pm)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise _refused(pm, exc) from None
    return pm


def _register_all(pm: pluggy.PluginManager) -> None:
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


def _refused(pm: pluggy.PluginManager, exc: pluggy.PluginValidationError) -> PluginError:
    """pluggy's multi-line complaint as one line: the plugin, the hook, and the hook it probably meant."""
    import difflib

    name = pm.get_name(exc.plugin) or getattr(exc.plugin, "__name__", repr(exc.plugin))
    specs = sorted(n for n, caller in vars(pm.hook).items() if not n.startswith("_") and caller.has_spec())
    unknown = [h.name for h in pm.get_hookcallers(exc.plugin) or [] if not h.has_spec()]
    hint = f"hooks: {', '.join(specs)} (chat/hookspecs.py); leave the plugin out with CHAT_LOAD_PLUGINS"
    if unknown:
        near = difflib.get_close_matches(unknown[0], specs, n=1)
        guess = f" — did you mean {near[0]}?" if near else ""
        return PluginError(f"plugin {name!r} implements an unknown hook {unknown[0]!r}{guess}", hint)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    definition = next((x.removeprefix("hookimpl definition:").strip() for x in lines if x.startswith("hookimpl")), "")
    detail = f"{definition}: {lines[-1]}" if definition and len(lines) > 1 else " ".join(lines)
    return PluginError(f"plugin {name!r}: {detail}", hint)


@dataclass
class Registry:
    """Everything the loaded plugins registered, with the plugin each came from."""

    backends: dict[str, Any] = field(default_factory=dict)
    personas: list[tuple[Any, dict[str, Any], str]] = field(default_factory=list)
    commands: dict[str, tuple[Callable, str, str]] = field(default_factory=dict)
    samplers: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # "backend:NAME" → plugin name


def _collect(hook_name: str, add: Callable[[str, tuple, dict], None]) -> None:
    """Call one hook through pluggy, a plugin at a time, so each registration is known by its plugin.

    ``get_hookimpls`` only says which plugins implement the hook and in what order; the call
    itself is pluggy's, on the subset of plugins that is just this one.
    """
    pm = get_plugin_manager()
    everyone = pm.get_plugins()
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        only_this = pm.subset_hook_caller(hook_name, remove_plugins=everyone - {impl.plugin})
        only_this(register=lambda *args, _plugin=impl.plugin_name, **kwargs: add(_plugin, args, kwargs))


@cache
def get_registry() -> Registry:
    reg = Registry()

    def add_backend(plugin: str, args: tuple, kwargs: dict) -> None:
        cls = args[0]
        reg.backends[cls.name] = cls
        reg.sources[f"backend:{cls.name}"] = plugin

    def add_persona(plugin: str, args: tuple, kwargs: dict) -> None:
        reg.personas.append((args[0], kwargs, plugin))

    def add_command(plugin: str, args: tuple, kwargs: dict) -> None:
        name, fn = args[0].lstrip("/"), args[1]
        doc_line = (fn.__doc__ or "").strip().splitlines()[0] if (fn.__doc__ or "").strip() else ""
        reg.commands[name] = (fn, kwargs.get("help", doc_line), plugin)
        reg.sources[f"command:{name}"] = plugin

    def add_sampler(plugin: str, args: tuple, kwargs: dict) -> None:
        stage = args[0]
        reg.samplers[stage.name] = stage
        reg.sources[f"sampler:{stage.name}"] = plugin

    _collect("register_backends", add_backend)
    _collect("register_personas", add_persona)
    _collect("register_commands", add_command)
    _collect("register_samplers", add_sampler)
    return reg


def plugin_summary() -> list[dict[str, Any]]:
    """For ``chat plugins``: each loaded plugin and the hooks it implements."""
    pm = get_plugin_manager()
    out = []
    for name, plugin in pm.list_name_plugin():
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        dist = next((d for p, d in pm.list_plugin_distinfo() if p is plugin), None)
        out.append(
            {
                "name": name,
                "hooks": hooks,
                "builtin": name in DEFAULT_PLUGINS,
                "version": getattr(dist, "version", None) if dist else None,
            }
        )
    return out
