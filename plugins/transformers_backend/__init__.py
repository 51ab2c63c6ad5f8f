"""Hugging Face model folders and cached ids, run by transformers (torch and peft load with the model)."""

from chat.hookspecs import hookimpl

from .backend import TransformersBackend


@hookimpl
def register_backends(register):
    """Folders with config.json and ids in the local hub cache; .gguf files are llama.cpp's."""
    register(TransformersBackend)
