"""The llama.cpp backend plugin: GGUF files through llama-cpp-python, imported only when a model loads."""

from chat.hookspecs import hookimpl

from .backend import LlamaCppBackend


@hookimpl
def register_backends(register):
    register(LlamaCppBackend)
