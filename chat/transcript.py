"""A saved conversation as a readable Markdown transcript (``chat history show`` and ``export``)."""

from __future__ import annotations

from chat.store_reading import Conversation, StoredMessage

_FINISH_NOTES = {
    "interrupted": "*[interrupted]*",
    "length": "*[cut off at the token limit]*",
    "error": "*[ended with an error]*",
}


def markdown_transcript(conv: Conversation, messages: list[StoredMessage]) -> str:
    lines = [f"# {conv.title or 'Conversation ' + conv.id}", ""]
    facts = [f"id `{conv.id}`", f"started {conv.created_at[:16].replace('T', ' ')} UTC"]
    if conv.model:
        facts.append(f"model `{conv.model}`")
    if conv.persona:
        facts.append(f"persona `{conv.persona}`")
    lines += [" · ".join(facts), ""]
    if conv.system:
        lines += ["## System", "", conv.system.strip(), ""]
    for m in messages:
        if m.role == "assistant":
            heading = f"## Assistant ({m.persona})" if m.persona and m.persona != "default" else "## Assistant"
        else:
            heading = f"## {m.role.capitalize()}"
        lines += [heading, "", m.content.strip()]
        if m.finish_reason in _FINISH_NOTES:
            lines += ["", _FINISH_NOTES[m.finish_reason]]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
