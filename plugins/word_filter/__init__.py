"""The ``word_filter`` sampler stage: ban or boost listed words and phrases.

A persona can keep away from phrases (``ban = ["delve", "as an AI"]``) or lean
towards words (``boost = {"indeed" = 2.0}``), on every backend, by placing
``word_filter`` in ``order`` (it is put at the front automatically when its
parameters are set and no ``order`` is given).
"""

from chat.hookspecs import hookimpl

from .stage import WORD_FILTER, WordFilterParams, apply_word_filter, word_start_tokens

__all__ = ["WORD_FILTER", "WordFilterParams", "apply_word_filter", "word_start_tokens", "register_samplers"]


@hookimpl
def register_samplers(register):
    register(WORD_FILTER)
