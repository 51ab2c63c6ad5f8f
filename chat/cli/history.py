"""``chat history …``: list, show, search, remove and export saved conversations."""

from __future__ import annotations

from typing import Annotated

import typer

from chat.cli.common import AppContext, echo, guard

history_app = typer.Typer(help="Browse saved conversations.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(history_app, name="history")


@history_app.command("list")
def list_(
    limit: Annotated[int, typer.Option("-n", "--limit", min=1, metavar="INT", help="How many, newest first.")] = 20,
    all_: Annotated[bool, typer.Option("--all", "-a", help="All of them.")] = False,
) -> None:
    """The most recent conversations (and how many older ones were left out)."""
    with guard():
        store = AppContext().open_store(readonly=True)
        rows = store.list_conversations(limit=None if all_ else limit)
        total = store.count_conversations()
        store.close()
        if not rows:
            echo("no saved conversations")
        for c in rows:
            persona = f" [{c.persona}]" if c.persona and c.persona != "default" else ""
            echo(f"{c.id}  {_local(c.updated_at)}  {c.message_count:>3} msgs{persona}  {c.title}")
        if total > len(rows):
            echo(f"… {total - len(rows)} older conversation(s) not shown (--limit N or --all)", err=True)


def _local(stamp: str) -> str:
    """The store keeps UTC (ISO, ending in Z); people read their own clock."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return stamp[:16]


@history_app.command("show")
def show(cid: Annotated[str, typer.Argument(help="Conversation id (a unique prefix is enough).")]) -> None:
    """Print one conversation."""
    with guard():
        store = AppContext().open_store(readonly=True)
        echo(store.export(cid, "md"))
        store.close()


@history_app.command("search")
def search(text: Annotated[str, typer.Argument(help="Words to find.")]) -> None:
    """Find messages containing TEXT."""
    with guard():
        store = AppContext().open_store(readonly=True)
        hits = store.search(text)
        if not hits:
            echo(f"no messages match {text!r}")
        for h in hits:
            echo(f"{h.conversation_id}  {h.role:<9}  {h.snippet}")
        store.close()


@history_app.command("rm")
def rm(cid: Annotated[str, typer.Argument(help="Conversation id.")]) -> None:
    """Delete a conversation."""
    with guard():
        store = AppContext().open_store()
        full = store.get_conversation(cid).id
        store.delete_conversation(full)
        echo(f"deleted {full}")
        store.close()


@history_app.command("export")
def export(
    cid: Annotated[str, typer.Argument(help="Conversation id.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="json or md.")] = "md",
) -> None:
    """Print a conversation as JSON or Markdown."""
    with guard():
        from chat.errors import UsageError

        if fmt not in ("json", "md"):
            raise UsageError(f"--format {fmt!r}: unknown format", "use json or md")
        store = AppContext().open_store(readonly=True)
        echo(store.export(cid, fmt))
        store.close()
