"""Every hook a plugin can implement. Each receives a ``register`` callback.

Plugins are modules (or objects) with functions marked ``@hookimpl``; built-ins in
``plugins/`` and ``personas/`` use exactly these hooks, as third-party packages do
through the ``chat`` entry-point group.
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("chat")
hookimpl = HookimplMarker("chat")


@hookspec
def register_backends(register):
    """Register backend classes: ``register(BackendClass)`` (see chat.backend.BackendFactory)."""


@hookspec
def register_personas(register):
    """Register persona cards: ``register(path_to_card_folder)`` or ``register(path, name=...)``."""


@hookspec
def register_commands(register):
    """Register REPL slash commands: ``register(name, function, help=...)``; the function gets (repl, argument)."""


@hookspec
def register_samplers(register):
    """Register sampler stages: ``register(chat.stages.SamplerStage(name, description, Params, apply))``; ``apply(logits, context, params)`` returns new logits, and the stage runs at its place in ``order`` on every backend."""
