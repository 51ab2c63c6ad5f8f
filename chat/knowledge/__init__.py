"""A persona's knowledge: always-on facts, keyword-activated lorebook entries, and retrieved notes.

``entry`` is the resolved value a card's ``[[knowledge]]`` becomes; ``lorebook`` decides, from the
recent messages alone, which entries fire and why; ``index`` keeps a card's note files in a SQLite
FTS5 index in the data dir and retrieves the chunks that fit the conversation. Prompt assembly
(:mod:`chat.prompt`) puts what fired into the prompt.
"""
