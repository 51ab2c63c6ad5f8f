"""Making a persona's parameter parts from examples, on the CPU: ``chat personas make`` and ``eval``.

``data`` reads and checks the examples, ``base`` loads the user's model for training (a GGUF
through transformers' own reader), ``encode`` turns dialogues into ids with the persona's
tokens marked, ``forward`` runs the model computing only what a loss needs, ``vector`` makes a
control vector, ``training`` is the loop every trained part shares, ``lora`` trains an adapter
and ``softprompt`` a soft prompt with it, ``folder`` / ``writing`` / ``record`` write the card,
``evaluate`` measures one, ``run`` ties make together. torch, transformers and peft are
imported inside functions only.
"""
