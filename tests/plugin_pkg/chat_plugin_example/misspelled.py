"""A broken third-party plugin: its hook is named ``register_backend`` (the hook is ``register_backends``).

Loaded only by tests/test_plugins.py, through a temporary dist-info (tests/plugin_dist.py).
"""

from chat.hookspecs import hookimpl


@hookimpl
def register_backend(register):
    raise AssertionError("never called: pluggy has no such hook")
