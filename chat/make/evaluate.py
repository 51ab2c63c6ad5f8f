"""``chat personas eval``: how far a card moves the model toward its data.

The number is the held-out loss (mean negative log-likelihood per token, and its perplexity)
of the persona's own answers: with the base alone, with the card's prompt parts (system
prompt and examples), with its control vectors, with its soft prompts, with its LoRA adapters,
and with everything.
Lower is closer to the persona. When the data is the one the card was made from (same
sha256 as in ``make.json``), only the dialogues held out during making are used.

Losses are computed on the float copy of the base transformers loads (a GGUF through its own
reader); greedy answers come from the real backend (llama.cpp for a GGUF), as a chat would.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat.make.data import Dialogue, MakeData


@dataclass(frozen=True)
class EvalRow:
    label: str
    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


def held_out_dialogues(card_folder: Path | None, data: MakeData) -> tuple[list[Dialogue], str]:
    """The dialogues to evaluate on, and a note saying which they are."""
    if card_folder is not None:
        record = card_folder / "make.json"
        try:
            made = json.loads(record.read_text(encoding="utf-8"))
            info = made["data"]
            idx = [int(i) for i in info["held_out"]]
            if info["sha256"] == data.sha256 and all(0 <= i < len(data) for i in idx):
                return [data.dialogues[i] for i in idx], f"the {len(idx)} dialogues held out when the card was made"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return list(data.dialogues), f"all {len(data)} dialogues (not the card's own data, so none were held out)"


@contextlib.contextmanager
def lora_attached(base: Any, adapters: list[tuple[Path, float]]) -> Iterator[Any]:
    """The base with the card's adapters (converted to PEFT when needed) at their scales; plain again after."""
    if not adapters:
        yield None
        return
    from peft import PeftModel

    from chat.convert.cache import ensure_format

    shape = base.shape()
    plain = base.model
    model = None
    try:
        for i, (path, scale) in enumerate(adapters):
            folder, _ = ensure_format(path, "peft", shape)
            name = f"card{i}"
            if model is None:
                model = PeftModel.from_pretrained(plain, str(folder), adapter_name=name)
            else:
                model.load_adapter(str(folder), adapter_name=name)
            for module in model.modules():
                scaling = getattr(module, "scaling", None)
                if isinstance(scaling, dict) and name in scaling:
                    scaling[name] *= scale
        names = [f"card{i}" for i in range(len(adapters))]
        assert model is not None
        model.base_model.set_adapter(names)  # type: ignore[operator]
        model.eval()
        yield model
    finally:
        if model is not None:
            base.model = model.unload()


def evaluate(base: Any, persona: Any, dialogues: list[Dialogue]) -> list[EvalRow]:
    """Held-out loss of the dialogues' answers under each combination of the card's parts."""
    from chat.make.encode import EVAL_MAX_TOKENS, encode
    from chat.make.forward import token_nll
    from chat.make.vector import steered
    from chat.parts.vector import read_directions, read_vector

    pad = base.tokenizer.pad_token_id
    examples = [(e.user, e.assistant) for e in persona.examples]
    plain = [encode(base, d, max_tokens=EVAL_MAX_TOKENS) for d in dialogues]
    prompted = (
        [encode(base, d, persona.system, examples, EVAL_MAX_TOKENS) for d in dialogues]
        if persona.system or examples
        else None
    )
    vectors = []
    for part in persona.steering:
        read_vector(part.path)  # one clear line for a broken file, before numbers are read
        vectors.append((read_directions(part.path), part.scale, part.layers))
    adapters = [(a.path, a.scale) for a in persona.adapters]
    soft = soft_prompt_rows(base, persona)

    def loss(items: list[Any], model: Any, with_vectors: bool, rows: Any = None) -> tuple[float, int]:
        with contextlib.ExitStack() as stack:
            if with_vectors:
                for directions, scale, layers in vectors:
                    stack.enter_context(steered(model, directions, scale, layers))
            total, count = token_nll(model, items, pad, soft=rows)
        return total / max(count, 1), count

    rows = [EvalRow("base", *loss(plain, base.model, False))]
    if prompted is not None:
        rows.append(EvalRow("+ prompt parts", *loss(prompted, base.model, False)))
    if vectors:
        rows.append(EvalRow("+ vector", *loss(plain, base.model, True)))
    if soft is not None:
        rows.append(EvalRow("+ soft prompt", *loss(plain, base.model, False, soft)))
    with lora_attached(base, adapters) as model:
        if model is not None:
            rows.append(EvalRow("+ LoRA", *loss(plain, model, False)))
        kinds = sum(bool(k) for k in (prompted is not None, vectors, adapters, soft is not None))
        if kinds > 1:
            rows.append(EvalRow("+ all", *loss(prompted or plain, model or base.model, True, soft)))
    return rows


def soft_prompt_rows(base: Any, persona: Any) -> Any:
    """The card's soft prompts, checked against the base and concatenated in order (a float tensor), or None."""
    if not persona.soft_prompts:
        return None
    import numpy as np
    import torch

    from chat.parts.softprompt import check_soft_prompt, read_soft_prompt

    shape = base.shape()
    parts = []
    for part in persona.soft_prompts:
        info = read_soft_prompt(part.path)
        check_soft_prompt(info, shape)
        parts.append(info.values)
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32))


def greedy_answers(model_spec: str, persona: Any, prompts: list[str], max_tokens: int = 48) -> list[tuple[str, str]]:
    """(base answer, card answer) per prompt, greedy, through the backend that runs ``model_spec`` in a chat."""
    from chat.backend import BackendOptions, Finish, Message
    from chat.config import Paths, load_config
    from chat.models import choose_model, load_backend
    from chat.persona import NO_PERSONA
    from chat.sampling import SamplerSettings

    paths = Paths()
    backend = load_backend(choose_model(model_spec, load_config(paths), paths), BackendOptions())
    greedy = SamplerSettings(temperature=0.0, max_tokens=max_tokens)

    def answer(messages: list[Message]) -> str:
        return "".join(x for x in backend.stream(messages, greedy) if not isinstance(x, Finish)).strip()

    prefix = [Message("system", persona.system)] if persona.system else []
    for e in persona.examples:
        prefix += [Message("user", e.user), Message("assistant", e.assistant)]
    out = []
    try:
        for prompt in prompts:
            backend.apply(NO_PERSONA)
            plain = answer([Message("user", prompt)])
            backend.apply(persona)
            out.append((plain, answer([*prefix, Message("user", prompt)])))
    finally:
        backend.close()
    return out
