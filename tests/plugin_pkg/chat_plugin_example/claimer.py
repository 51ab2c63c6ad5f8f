"""A third-party backend that claims .gguf files ahead of the built-in llama.cpp (priority 1).

Not among the example package's entry points: tests register it through a temporary
dist-info of their own (tests/plugin_dist.py), so only those tests see it.
"""

from chat.hookspecs import hookimpl

from .scripted import ScriptedBackend


class GgufEchoBackend(ScriptedBackend):
    name = "gguf-echo"
    priority = 1  # the built-ins have 0: this backend wins every model it claims

    @classmethod
    def can_load(cls, model: str) -> bool:
        return str(model).lower().endswith(".gguf")


@hookimpl
def register_backends(register):
    register(GgufEchoBackend)
