"""One family of errors that are meant for people.

Every error carries a message (what went wrong and where) and a hint (how to
fix it). The CLI prints them as one line and exits with ``exit_code``; under
``--debug`` it re-raises so the traceback is shown.
"""

from __future__ import annotations


class ChatError(Exception):
    """Base of every error the user is meant to read."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} — {self.hint}"
        return self.message


class UsageError(ChatError):
    """A bad flag, option value or command line."""

    exit_code = 2


class ConfigError(ChatError):
    """The config file is unreadable or holds a bad value."""

    exit_code = 2


class ModelError(ChatError):
    """A model is missing, unreadable or not what it claims to be."""

    exit_code = 3


class NoModelError(ModelError):
    """No model was given and none is configured."""

    exit_code = 2


class PersonaError(ChatError):
    """A persona card is missing, malformed or inconsistent."""

    exit_code = 4


class AdapterError(ChatError):
    """A LoRA adapter or control vector does not fit the loaded model."""

    exit_code = 4


class SamplingError(UsageError):
    """A sampler setting is unknown or out of range."""


class ContextOverflowError(ChatError):
    """The input cannot fit into the model's context window."""

    exit_code = 5


class StoreError(ChatError):
    """The history database cannot be opened or written."""

    exit_code = 6


class InputError(UsageError):
    """Standard input or a prompt could not be read."""
