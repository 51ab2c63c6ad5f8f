"""``chat convert …``: turn your own Hugging Face models and PEFT adapters into GGUF (and back)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chat.cli.common import echo, guard

convert_app = typer.Typer(
    help="Convert Hugging Face models, LoRA adapters and soft prompts to GGUF (and back).", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(convert_app, name="convert")


def _refuse_overwrite(out: Path, force: bool) -> None:
    from chat.errors import UsageError

    if out.exists() and not force:
        raise UsageError(f"{out} already exists", hint="pass --force to replace it")


@convert_app.command("model")
def model(
    hf_dir: Annotated[
        Path, typer.Argument(help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json).")
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="The GGUF file to write.")],
    out_type: Annotated[str, typer.Option("--type", "-t", help="Weight type: f32, f16 or q8_0.")] = "f16",
    name: Annotated[str | None, typer.Option("--name", help="general.name in the GGUF (default: folder name).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace OUT if it exists.")] = False,
) -> None:
    """Convert a llama, mistral or qwen2 model folder into a GGUF file llama.cpp runs."""
    with guard():
        from chat.convert.model import convert_model

        _refuse_overwrite(out, force)
        result = convert_model(hf_dir, out, out_type=out_type.lower(), name=name)
        echo(
            f"wrote {result.path}  {result.size / 2**20:.1f} MiB  "
            f"[{result.hf_class} → {result.architecture}, {result.out_type}, {result.n_tensors} tensors, "
            f"vocab {result.n_vocab}, pre-tokenizer {result.pre_tokenizer}]"
        )
        echo(f"run: chat -m {result.path}")


@convert_app.command("adapter")
def adapter(
    src: Annotated[
        Path, typer.Argument(help="A PEFT LoRA folder (→ GGUF) or a llama.cpp adapter GGUF (→ PEFT folder).")
    ],
    base: Annotated[Path, typer.Option("--base", "-b", help="The base model: a GGUF file or a Hugging Face folder.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="The GGUF file (or PEFT folder) to write.")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace OUT if it exists.")] = False,
) -> None:
    """Convert a LoRA adapter between PEFT and llama.cpp GGUF, checked against its base model."""
    with guard():
        from chat.convert.adapter import gguf_adapter_to_peft, peft_to_gguf
        from chat.convert.cache import adapter_format

        _refuse_overwrite(out, force)
        if adapter_format(src) == "peft":
            result = peft_to_gguf(src, base, out)
            echo(
                f"wrote {result.path}  [{result.architecture} adapter, {result.n_modules} modules, "
                f"rank {'/'.join(map(str, result.ranks))}, alpha {result.alpha:g}]"
            )
        else:
            path = gguf_adapter_to_peft(src, base, out)
            echo(f"wrote {path}  [PEFT LoRA folder]")


@convert_app.command("soft-prompt")
def soft_prompt(
    src: Annotated[
        Path, typer.Argument(help="A PEFT prompt-tuning folder (→ GGUF) or a soft prompt GGUF (→ PEFT folder).")
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="The GGUF file (or PEFT folder) to write.")],
    base: Annotated[
        Path | None,
        typer.Option("--base", "-b", help="Check it against this base model (a GGUF file or a Hugging Face folder)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace OUT if it exists.")] = False,
) -> None:
    """Convert a soft prompt between a PEFT prompt-tuning folder and chat's soft prompt GGUF (same numbers)."""
    with guard():
        from chat.parts.shape import read_base
        from chat.parts.softprompt import convert_soft_prompt, read_soft_prompt

        _refuse_overwrite(out, force)
        shape = read_base(base) if base is not None else None
        path = convert_soft_prompt(src, out, shape)
        info = read_soft_prompt(path)
        kind = "soft prompt GGUF" if info.format == "gguf" else "PEFT prompt-tuning folder"
        echo(f"wrote {path}  [{kind}, {info.n_virtual} virtual tokens × {info.n_embd}]")
