"""The remote backend plugin: `chat -m http://HOST:PORT/v1#MODEL` runs on a serving engine (the openai package)."""

from chat.hookspecs import hookimpl

from .backend import RemoteBackend


@hookimpl
def register_backends(register):
    register(RemoteBackend)
