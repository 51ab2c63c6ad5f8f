"""Describing a persona's parameter parts (adapters, control vectors) for listings.

Parts are read with the readers both backends use (:mod:`chat.parts`: GGUF headers in
milliseconds, PEFT folders from their config and safetensors header, no llama.cpp or
torch); given a base model, each part also says whether it fits it, in the words a
backend would refuse it with.
"""

from __future__ import annotations

from pathlib import Path

from chat.errors import AdapterError
from chat.persona import Persona


def _size(path: Path) -> str:
    from chat.parts.files import human_size

    try:
        if path.is_dir():
            n = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        else:
            n = path.stat().st_size
    except OSError:
        return "missing"
    return human_size(n)


def _span(numbers: list[int]) -> str:
    if not numbers:
        return "-"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else str(numbers[0])
    return ",".join(map(str, numbers))


def _fit(check, info, base, base_note: str | None) -> str:
    if base is None:
        return f"fit: not checked ({base_note or 'no base model given; pass -m MODEL.gguf'})"
    try:
        check(info, base)
    except AdapterError as exc:
        return "fit: NO — " + exc.message.split(": does not fit ", 1)[-1]
    return f"fit: yes ({base.name})"


def _adapter_lines(path: Path, base, base_note: str | None) -> list[str]:
    if path.is_dir():
        return _peft_lines(path, base, base_note)
    from chat.parts.lora import check_lora, read_lora

    try:
        info = read_lora(path)
    except AdapterError as exc:
        return [f"    unusable: {exc.message.removeprefix(str(path) + ': ')}"]
    return [
        f"    LoRA: {info.rank_text}, alpha {info.alpha:g}, {len(info.pairs)} tensors on layers {_span(info.layers())}"
        f" ({', '.join(info.target_kinds())}), architecture {info.architecture}",
        "    " + _fit(check_lora, info, base, base_note),
    ]


def _peft_lines(path: Path, base, base_note: str | None) -> list[str]:
    from chat.errors import ChatError
    from chat.parts.peft import check_peft, read_peft

    try:
        info = read_peft(path)  # the reader both backends use: regular files only, every field checked
    except ChatError as exc:
        return [f"    unusable PEFT folder: {exc.message}"]
    targets = info.config.get("target_modules") or []
    targets = ", ".join(targets) if isinstance(targets, list) else str(targets)
    ranks = "/".join(map(str, info.ranks))
    return [
        f"    PEFT LoRA: rank {ranks}, alpha {info.alpha:g}, {len(info.pairs)} modules, targets {targets}",
        "    " + _fit(check_peft, info, base, base_note),
    ]


def _vector_lines(path: Path, base, base_note: str | None) -> list[str]:
    from chat.parts.vector import check_vector, read_vector

    try:
        info = read_vector(path)
    except AdapterError as exc:
        return [f"    unusable: {exc.message.removeprefix(str(path) + ': ')}"]
    hint = f", made for {info.model_hint}" if info.model_hint else ""
    return [
        f"    control vector: width {info.n_embd}, {info.layer_text}{hint}",
        "    " + _fit(check_vector, info, base, base_note),
    ]


def describe_parts(persona: Persona, base=None, base_note: str | None = None, details: bool = False) -> list[str]:
    """Lines describing the persona's adapters, vectors and soft prompts.

    ``base`` (a :class:`chat.parts.shape.BaseShape`) adds whether each part fits it;
    ``details`` reads each part's header (rank, targets, layers) — without it only
    names, scales and sizes are listed, as ``/adapters`` does on backends that cannot say more.
    """
    lines = []
    if persona.adapters:
        lines.append(f"adapters:    {len(persona.adapters)}")
        for a in persona.adapters:
            card = f"  card {a.card}" if a.card else ""
            lines.append(f"  {a.name}  scale {a.scale:g}{card}  {_size(a.path)}  {a.path}")
            if details or base is not None:
                lines += _adapter_lines(Path(a.path), base, base_note)
    if persona.steering:
        lines.append(f"steering:    {len(persona.steering)}")
        for s in persona.steering:
            layers = f"layers {s.layers[0]}-{s.layers[1]}" if s.layers else "all layers"
            card = f"  card {s.card}" if s.card else ""
            lines.append(f"  {s.name}  scale {s.scale:g}  {layers}{card}  {_size(s.path)}  {s.path}")
            if details or base is not None:
                lines += _vector_lines(Path(s.path), base, base_note)
    if persona.soft_prompts:
        lines.append(f"soft prompts: {len(persona.soft_prompts)}")
        for sp in persona.soft_prompts:
            card = f"  card {sp.card}" if sp.card else ""
            lines.append(f"  {sp.name}{card}  {_size(sp.path)}  {sp.path}")
            if details or base is not None:
                lines += _soft_prompt_lines(Path(sp.path), base, base_note)
    return lines


def _soft_prompt_lines(path: Path, base, base_note: str | None) -> list[str]:
    from chat.parts.softprompt import check_soft_prompt, read_soft_prompt

    try:
        info = read_soft_prompt(path)
    except AdapterError as exc:
        return [f"    unusable: {exc.message.removeprefix(str(path) + ': ')}"]
    made = f", made for {info.architecture}" if info.architecture else ""
    return [
        f"    soft prompt ({'PEFT' if info.format == 'peft' else 'GGUF'}): "
        f"{info.n_virtual} virtual tokens, width {info.n_embd}{made}",
        "    " + _fit(check_soft_prompt, info, base, base_note),
    ]
