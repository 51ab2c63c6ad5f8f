"""``chat personas make`` / ``eval``: make a card's parameter parts from examples, and measure a card."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from chat.cli.common import AppContext, echo, guard


def register(personas_app: typer.Typer) -> None:
    personas_app.command("make")(make)
    personas_app.command("eval")(evaluate)


class TerminalReporter:
    """Lines as they come; a rich progress bar on a terminal, a line per evaluation otherwise."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._task: Any = None
        self._last_held: float | None = None

    def line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            echo(text)

    @contextlib.contextmanager
    def training(self, total: int) -> Iterator[None]:
        from chat.render import is_terminal

        if not is_terminal(sys.stdout):
            yield
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            transient=True,
        )
        self._task = self._bar.add_task("train", total=total, stats="")
        try:
            with self._bar:
                yield
        finally:
            self._bar = None

    def progress(self, p: Any) -> None:
        if p.held_loss is not None:
            self._last_held = p.held_loss
        held = f"  held-out {self._last_held:.3f}" if self._last_held is not None else ""
        stats = f"loss {p.loss:.3f}{held}  {p.tokens_per_s:.0f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=p.step, stats=stats)
        elif p.held_loss is not None or p.step == p.total:
            echo(f"step {p.step}/{p.total}  epoch {p.epoch}  {stats}")


def make(
    name: Annotated[str, typer.Argument(help="Name of the card to make.")],
    base: Annotated[str, typer.Option("--base", "-b", help="Base model: a GGUF file or a Hugging Face folder/id.")],
    data: Annotated[Path, typer.Option("--from", help="Examples: JSONL chat messages, a card, or plain text.")],
    vector: Annotated[bool, typer.Option("--vector", help="Make a control vector (the default).")] = False,
    lora: Annotated[bool, typer.Option("--lora", help="Train a LoRA adapter.")] = False,
    soft_prompt: Annotated[
        int, typer.Option("--soft-prompt", metavar="N", help="Train a soft prompt of N virtual tokens (0: none).")
    ] = 0,
    soft_prompt_lr: Annotated[float, typer.Option(help="Soft prompt learning rate.")] = 3e-2,
    soft_prompt_init: Annotated[
        str, typer.Option(help="Soft prompt start: text (the system prompt's embeddings) or vocab (drawn tokens).")
    ] = "text",
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Card folder (default: your personas dir).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing card.")] = False,
    positive: Annotated[Path | None, typer.Option(help="Persona-style answers (pairs with --negative).")] = None,
    negative: Annotated[Path | None, typer.Option(help="Neutral answers to the same prompts.")] = None,
    method: Annotated[str, typer.Option(help="Vector reduction: mean or pca.")] = "mean",
    pairs: Annotated[int, typer.Option(help="Contrastive pairs used for the vector.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed for the split, the init and the batch order.")] = 0,
    epochs: Annotated[int, typer.Option(help="LoRA epochs.")] = 3,
    lr: Annotated[float, typer.Option(help="LoRA learning rate.")] = 1e-3,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = 16.0,
    batch_size: Annotated[int, typer.Option(help="Dialogues per training step.")] = 8,
    patience: Annotated[int, typer.Option(help="Evaluations without improvement before stopping (0: never).")] = 2,
    held_out: Annotated[float, typer.Option(help="Fraction of dialogues held out for checking.")] = 0.1,
    max_tokens: Annotated[int, typer.Option(help="Longest dialogue trained on, in tokens.")] = 256,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted training.")] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: torch's choice).")] = None,
    memory_limit: Annotated[float | None, typer.Option(help="GiB training may use (default: what is free).")] = None,
) -> None:
    """Make a card's control vector, LoRA adapter and/or soft prompt from example dialogues, on the CPU."""
    with guard():
        from chat.make.lora import LoraSettings
        from chat.make.run import MakeRequest, make_card
        from chat.make.softprompt import SoftPromptSettings

        app = AppContext()
        request = MakeRequest(
            name=name,
            base=base,
            data=data,
            out=out or app.paths.personas_dir / name,
            vector=vector or not (lora or soft_prompt),
            lora=lora,
            force=force,
            positive=positive,
            negative=negative,
            method=method,
            pairs=pairs,
            held_out=held_out,
            max_tokens=max_tokens,
            resume=resume,
            threads=threads,
            memory_limit=int(memory_limit * 2**30) if memory_limit is not None else None,
            lora_settings=LoraSettings(
                rank=rank, alpha=alpha, lr=lr, epochs=epochs, batch_size=batch_size, patience=patience, seed=seed
            ),
            soft_prompt=SoftPromptSettings(
                lr=soft_prompt_lr,
                epochs=epochs,
                batch_size=batch_size,
                patience=patience,
                seed=seed,
                n_virtual=soft_prompt,
                init=soft_prompt_init,
            )
            if soft_prompt
            else None,
        )
        outcome = make_card(request, TerminalReporter())
        trained = outcome.lora or outcome.soft_prompt
        if trained is not None:
            from chat.make.chart import text_chart

            history = trained.history
            held = [(h["step"], h["held_loss"]) for h in history if h["held_loss"] is not None]
            for row in text_chart([h["loss"] for h in history], held):
                echo(row)
        for note in outcome.notes:
            echo(f"note: {note}")
        echo(f"wrote {outcome.folder / 'persona.toml'}")
        echo(
            f"try: chat --persona {outcome.folder} -m {base}    measure: chat personas eval {outcome.folder} "
            f"-m {base} --on {data}"
        )


def evaluate(
    card: Annotated[str, typer.Argument(help="Card name or folder.")],
    model: Annotated[str, typer.Option("-m", "--model", help="Base model: a GGUF file or a Hugging Face folder.")],
    on: Annotated[Path, typer.Option("--on", help="Dialogues to measure on (JSONL, a card, or plain text).")],
    answers: Annotated[int, typer.Option(help="Greedy answers to show side by side (0: none).")] = 3,
    max_tokens: Annotated[int, typer.Option(help="Longest greedy answer, in tokens.")] = 48,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: torch's choice).")] = None,
) -> None:
    """How much a card moves the model toward its data: held-out loss and perplexity, and answers side by side."""
    with guard():
        import warnings

        from chat.make.base import load_base
        from chat.make.data import read_data
        from chat.make.evaluate import evaluate as run_eval
        from chat.make.evaluate import greedy_answers, held_out_dialogues

        app = AppContext()
        persona = app.catalog.resolve(card)
        data = read_data(on)
        dialogues, which = held_out_dialogues(persona.path, data)
        base = load_base(model, threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = run_eval(base, persona, dialogues)
        echo(f"{persona.label} on {base.path.name}: {which}")
        echo(f"{'':16}{'loss':>8}{'perplexity':>12}{'vs base':>9}")
        for row in rows:
            change = f"{row.loss - rows[0].loss:+.3f}" if row is not rows[0] else ""
            echo(f"{row.label:16}{row.loss:8.3f}{row.perplexity:12.2f}{change:>9}")
        if answers > 0:
            prompts = [d.first_prompt for d in dialogues[:answers]]
            for prompt, (plain, mine) in zip(prompts, greedy_answers(model, persona, prompts, max_tokens), strict=True):
                echo("")
                echo(f"prompt: {prompt}")
                echo(f"  base: {plain}")
                echo(f"  card: {mine}")
