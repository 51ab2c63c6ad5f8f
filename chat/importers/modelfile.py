"""ollama Modelfiles: parse one (line numbers in every error), map it to our card, and write one.

The syntax follows ollama's ``docs/modelfile.mdx`` and ``parser/parser.go``: one instruction a line,
names case-insensitive (``FROM``, ``ADAPTER``, ``PARAMETER``, ``TEMPLATE``, ``SYSTEM``, ``MESSAGE``,
``LICENSE``, ``REQUIRES``), ``#`` comments, and a value that runs to the end of the line, or is
``"quoted"`` (``\\"`` inside), or ``\"\"\"triple-quoted\"\"\"`` across lines.

Mapping: ``FROM`` → ``model`` (a path is made absolute and becomes ``-m``'s default); ``ADAPTER``
→ ``[[adapters]]``; ``PARAMETER`` → ``[sampling]`` with ollama's names translated (``num_predict`` →
``max_tokens``, ``repeat_last_n`` → ``penalty_last_n``, ``stop`` repeated → a list) and ``num_ctx`` →
``context_size``; ``SYSTEM`` → ``system``; ``MESSAGE`` user/assistant pairs → ``[[examples]]``;
``LICENSE`` → ``license``. ``TEMPLATE`` is a Go template: kept for export only, since chat uses
the model's own chat template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chat.importers import CardFileError
from chat.importers.mapping import Report, clean

MAX_MODELFILE_BYTES = 1 << 20
INSTRUCTIONS = ("from", "adapter", "parameter", "template", "system", "message", "license", "requires")
ROLES = ("system", "user", "assistant")
PARAMETERS = {  # ollama's name → ours
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "penalty_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "num_predict": "max_tokens",
    "stop": "stop",
    "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Modelfile:
    """A parsed Modelfile: each instruction's values with the line they start on."""

    model: str = ""
    adapters: list[tuple[str, int]] = field(default_factory=list)
    parameters: list[tuple[str, str, int]] = field(default_factory=list)
    template: str | None = None
    system: str | None = None
    messages: list[tuple[str, str, int]] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)
    requires: str = ""


def parse(text: str, where: Path) -> Modelfile:
    """Parse a Modelfile; any problem is one CardFileError naming ``where`` and the line."""
    if len(text) > MAX_MODELFILE_BYTES:
        raise CardFileError(f"{where}: {len(text):,} characters", f"a Modelfile may have at most {MAX_MODELFILE_BYTES}")
    mf = Modelfile()
    pos, line = 0, 1
    seen_from = False
    while pos < len(text):
        c = text[pos]
        if c == "\n":
            pos, line = pos + 1, line + 1
            continue
        if c in " \t\r\ufeff":
            pos += 1
            continue
        if c == "#":
            end = text.find("\n", pos)
            pos = len(text) if end < 0 else end
            continue
        m = _WORD.match(text, pos)
        if not m:
            raise CardFileError(
                f"{where}: line {line}: expected an instruction (got {text[pos : pos + 20]!r})",
                "instructions: " + ", ".join(i.upper() for i in INSTRUCTIONS),
            )
        name, start_line = m.group().lower(), line
        if name not in INSTRUCTIONS:
            raise CardFileError(
                f"{where}: line {line}: unknown instruction {m.group()[:40]!r}",
                "instructions: " + ", ".join(i.upper() for i in INSTRUCTIONS),
            )
        pos = m.end()
        sub = ""
        if name in ("parameter", "message"):
            pos = _spaces(text, pos)
            w = re.compile(r"[^\s]+").match(text, pos)
            if not w:
                raise CardFileError(
                    f"{where}: line {line}: {name.upper()} needs a name and a value",
                    "e.g. PARAMETER temperature 0.7, MESSAGE user Hello",
                )
            sub, pos = w.group().lower(), w.end()
            if name == "message" and sub not in ROLES:
                raise CardFileError(
                    f"{where}: line {line}: MESSAGE role {w.group()[:40]!r} is not one of {', '.join(ROLES)}",
                    "e.g. MESSAGE user Hello",
                )
        value, pos, line = _value(text, _spaces(text, pos), line, where, name.upper())
        if name != "template" and not value.strip() and name != "system":
            raise CardFileError(
                f"{where}: line {start_line}: {name.upper()} needs a value", "see ollama's Modelfile docs"
            )
        if name == "from":
            mf.model, seen_from = value.strip(), True
        elif name == "adapter":
            mf.adapters.append((value.strip(), start_line))
        elif name == "parameter":
            mf.parameters.append((sub, value.strip(), start_line))
        elif name == "message":
            mf.messages.append((sub, value, start_line))
        elif name == "license":
            mf.licenses.append(value)
        elif name == "requires":
            mf.requires = value.strip()
        else:
            setattr(mf, name, value)
    if not seen_from:
        raise CardFileError(f"{where}: no FROM instruction", "a Modelfile starts with FROM MODEL")
    return mf


def _spaces(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    return pos


def _value(text: str, pos: int, line: int, where: Path, what: str) -> tuple[str, int, int]:
    """(value, position after it, line after it): triple-quoted, quoted, or the rest of the line."""
    if text.startswith('"""', pos):
        end = text.find('"""', pos + 3)
        if end < 0:
            raise CardFileError(f'{where}: line {line}: {what}: """ is never closed', 'end the value with """')
        value = text[pos + 3 : end]
        return value, _end_of_line(text, end + 3, line + value.count("\n"), where), line + value.count("\n")
    if text.startswith('"', pos):
        out, i = [], pos + 1
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text) and text[i + 1] in '"\\':
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                value = "".join(out)
                return value, _end_of_line(text, i + 1, line + value.count("\n"), where), line + value.count("\n")
            out.append(c)
            i += 1
        raise CardFileError(f"{where}: line {line}: {what}: a quote is never closed", 'end the value with "')
    end = text.find("\n", pos)
    end = len(text) if end < 0 else end
    return text[pos:end].rstrip("\r"), end, line


def _end_of_line(text: str, pos: int, line: int, where: Path) -> int:
    rest_end = text.find("\n", pos)
    rest = text[pos : len(text) if rest_end < 0 else rest_end]
    if rest.strip():
        raise CardFileError(
            f"{where}: line {line}: text after the closing quotes: {rest.strip()[:40]!r}",
            "put the next instruction on its own line",
        )
    return len(text) if rest_end < 0 else rest_end


def _number(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def card_from_modelfile(mf: Modelfile, name: str, folder: Path) -> tuple[dict[str, Any], Report]:
    """Our card from a Modelfile read from ``folder`` (relative FROM and ADAPTER paths start there)."""
    report = Report()
    card: dict[str, Any] = {"name": name}
    if mf.model:
        card["model"] = _path_or_name(mf.model, folder)
        report.mapped.append("FROM → model" + (" (a file: -m's default)" if card["model"] != mf.model else ""))
    if mf.system is not None and mf.system.strip():
        card["system"] = clean(mf.system)
        report.mapped.append("SYSTEM → system")
    sampling: dict[str, Any] = {}
    for key, value, line in mf.parameters:
        if key == "stop":
            sampling.setdefault("stop", []).append(clean(value))
        elif key == "num_ctx":
            n = _number(value)
            if not isinstance(n, int) or not 16 <= n <= 10_000_000:
                raise CardFileError(f"{name}: line {line}: PARAMETER num_ctx {value[:20]!r}", "a whole number ≥ 16")
            card["context_size"] = n
        elif key == "num_predict" and _number(value) in (-1, -2):
            continue  # ollama's "no limit" / "fill the context": our default
        elif key in PARAMETERS:
            sampling[PARAMETERS[key]] = _number(value)
        else:
            report.kept.append(f"PARAMETER {key} (no counterpart; kept for export)")
    if sampling:
        card["sampling"] = sampling
        report.mapped.append(f"PARAMETER → [sampling] ({', '.join(sampling)})")
    if "context_size" in card:
        report.mapped.append("PARAMETER num_ctx → context_size")
    adapters = []
    for raw, line in mf.adapters:
        path = Path(raw).expanduser()
        path = path if path.is_absolute() else folder / path
        if "\x00" not in raw and path.exists():  # a NUL byte makes every path call raise ValueError
            adapters.append({"path": str(path.resolve())})
        else:
            report.kept.append(f"ADAPTER {raw[:60]} (line {line}: no such file; kept for export)")
    if adapters:
        card["adapters"] = adapters
        report.mapped.append(f"ADAPTER → {len(adapters)} [[adapters]]")
    examples, pending = [], None
    for role, text, _ in mf.messages:
        if role == "user":
            if pending is not None:
                examples.append({"user": pending, "assistant": ""})
            pending = clean(text)
        elif role == "assistant":
            examples.append({"user": pending or "", "assistant": clean(text)})
            pending = None
        else:
            report.kept.append("MESSAGE system (kept for export)")
    if pending is not None:
        examples.append({"user": pending, "assistant": ""})
    if examples:
        card["examples"] = examples
        report.mapped.append(f"MESSAGE → {len(examples)} example exchange(s)")
    if mf.licenses:
        card["license"] = clean("\n\n".join(mf.licenses))
        report.mapped.append("LICENSE → license")
    if mf.template is not None:
        report.kept.append("TEMPLATE (a Go template: kept for export; chat uses the model's own chat template)")
    return card, report


def _path_or_name(model: str, folder: Path) -> str:
    """A FROM that names a file (``./x.gguf``, ``/models/x.gguf``) as an absolute path; a model name as it is."""
    if "\x00" in model:  # no file name holds one; Path.resolve() would raise ValueError
        raise CardFileError(f"FROM {model!r}: a model name or path cannot contain a NUL byte", "fix the FROM line")
    p = Path(model).expanduser()
    looks_like_file = model.startswith((".", "/", "~")) or model.lower().endswith(".gguf") or "\\" in model
    if not looks_like_file:
        return model
    return str((p if p.is_absolute() else folder / p).resolve())


def _quoted(value: str) -> str:
    triple_ok = '"""' not in value and not value.endswith('"')
    if triple_ok and ("\n" in value or '"' in value or value != value.strip()):
        return f'"""{value}"""'
    if '"""' in value or not value or any(c in value for c in "\n#"):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def write(card: dict[str, Any], system: str, kept: Modelfile | None) -> str:
    """A Modelfile for ``card`` (``system``: its system message with macros resolved); ``kept``: the imported one."""
    ours = {v: k for k, v in PARAMETERS.items()}
    lines = [f"FROM {card.get('model') or (kept.model if kept else '') or 'MODEL'}"]
    lines += [f"ADAPTER {a['path']}" for a in card.get("adapters", [])]
    for key, value in card.get("sampling", {}).items():
        if key == "stop":
            lines += [f"PARAMETER stop {_quoted(str(s))}" for s in (value if isinstance(value, list) else [value])]
        elif key in ours and not isinstance(value, (dict, list)):
            lines.append(f"PARAMETER {ours[key]} {str(value).lower() if isinstance(value, bool) else value}")
    if card.get("context_size"):
        lines.append(f"PARAMETER num_ctx {card['context_size']}")
    if kept:
        lines += [
            f"PARAMETER {k} {_quoted(v)}" for k, v, _ in kept.parameters if k not in PARAMETERS and k != "num_ctx"
        ]
        if kept.template is not None:
            lines.append(f"TEMPLATE {_quoted(kept.template)}")
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    for ex in card.get("examples", []):
        if ex.get("user"):
            lines.append(f"MESSAGE user {_quoted(ex['user'])}")
        if ex.get("assistant"):
            lines.append(f"MESSAGE assistant {_quoted(ex['assistant'])}")
    if card.get("license"):
        lines.append(f"LICENSE {_quoted(card['license'])}")
    return "\n".join(lines) + "\n"
