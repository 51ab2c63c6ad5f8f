"""Every hook a plugin can implement, grouped by what it extends.

Plugins are modules (or objects) with functions marked ``@hookimpl``. Built-ins in
``plugins/`` and ``personas/`` use exactly these hooks, as third-party packages do
through the ``chat`` entry-point group. Each hook receives a ``register`` callback
(simonw/llm's style) and returns nothing; call it once per thing the plugin adds.

A function marked ``@hookimpl`` whose name is not one of these hooks (say
``register_backend``) stops chat with an error naming the plugin and the nearest
hook: pluggy's ``check_pending`` runs after every plugin is registered.
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("chat")
hookimpl = HookimplMarker("chat")


# -------------------------------------------------------------------------
# Models
# -------------------------------------------------------------------------


@hookspec
def register_backends(register):
    """Register backend classes: ``register(BackendClass)``.

    The class follows ``chat.backend.BackendFactory``: a ``name``, a classmethod
    ``can_load(model) -> bool``, and ``BackendClass(model, options)`` returning a
    loaded ``chat.backend.Backend``. Optional class attributes:

    - ``Options``: a pydantic subclass of ``chat.backend.BackendOptions`` declaring the
      backend's own load options (``extra="forbid"``; ``Field(description=..., ge=..., le=...)``).
      Any option the chosen backend's ``Options`` does not declare is refused, from a
      flag, ``-B KEY=VALUE`` or config.toml. ``chat plugins`` lists them.
    - ``priority`` (int, default 0): which backend loads a model, unless ``--backend``
      names one. Among the backends whose ``can_load(model)`` is true, the highest
      priority wins; a tie goes to the name that sorts first. The built-ins have
      priority 0 and do not overlap: llama.cpp claims ``.gguf`` files, transformers
      Hugging Face model folders and ids in the local hub cache. A plugin that wants a
      model ahead of a built-in declares ``priority = 1`` or more.
    """


# -------------------------------------------------------------------------
# Personas
# -------------------------------------------------------------------------


@hookspec
def register_personas(register):
    """Register persona cards: ``register(path_to_card_folder)`` or ``register(path, name=...)``.

    A card of the same name in the user's personas folder overrides a plugin's; a
    plugin's overrides a built-in (``chat personas list`` shows which).
    """


# -------------------------------------------------------------------------
# The REPL
# -------------------------------------------------------------------------


@hookspec
def register_commands(register):
    """Register REPL slash commands: ``register(name, function, help=...)``.

    ``name`` without the slash; ``function(repl, argument)`` gets the REPL and the text
    after the command; ``help`` defaults to the first line of the function's docstring.
    """


# -------------------------------------------------------------------------
# Sampling
# -------------------------------------------------------------------------


@hookspec
def register_samplers(register):
    """Register sampler stages: ``register(chat.stages.SamplerStage(name, description, Params, apply))``.

    ``apply(logits, context, params)`` returns new logits (never edits them in place);
    the stage runs at its place in the ``order`` setting, on every backend, and its
    ``Params`` (a pydantic model) are set as ``-o NAME.KEY=VALUE`` or in a card's ``[sampling]``.
    """
