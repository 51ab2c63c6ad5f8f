"""The llama.cpp backend: GGUF models through llama-cpp-python's low-level API.

Importing this package is cheap: llama_cpp, gguf and jinja2 load only when a
model is loaded (``chat --help`` imports every built-in plugin).
"""

from chat.hookspecs import hookimpl

from .backend import BackendStats, LlamaCppBackend, StreamStats

__all__ = ["LlamaCppBackend", "BackendStats", "StreamStats", "register_backends"]


@hookimpl
def register_backends(register):
    register(LlamaCppBackend)
