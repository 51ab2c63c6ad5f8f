"""Describing a persona's parameter parts (adapters, control vectors) for listings."""

from __future__ import annotations

from chat.persona import Persona


def _size(path) -> str:
    try:
        if path.is_dir():
            n = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        else:
            n = path.stat().st_size
    except OSError:
        return "missing"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def describe_parts(persona: Persona) -> list[str]:
    lines = []
    if persona.adapters:
        lines.append(f"adapters:    {len(persona.adapters)}")
        for a in persona.adapters:
            lines.append(f"  {a.name}  scale {a.scale:g}  {_size(a.path)}  {a.path}")
    if persona.steering:
        lines.append(f"steering:    {len(persona.steering)}")
        for s in persona.steering:
            layers = f"layers {s.layers[0]}-{s.layers[1]}" if s.layers else "all layers"
            lines.append(f"  {s.name}  scale {s.scale:g}  {layers}  {_size(s.path)}  {s.path}")
    return lines
