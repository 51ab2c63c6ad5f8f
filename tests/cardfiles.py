"""Character Card files built from the specs, for the importer tests, the fuzzer and the benchmark."""

from __future__ import annotations

import base64
import io
import json
import struct
import zipfile
import zlib

SIG = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def image() -> bytes:
    """A 2×1 RGB PNG written from the PNG spec (not by chat's writer)."""
    header = struct.pack(">IIBBBBB", 2, 1, 8, 2, 0, 0, 0)
    return (
        SIG
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00\x00\xff\x00"))
        + chunk(b"IEND", b"")
    )


def png_card(texts: dict[str, bytes | str], base: bytes | None = None) -> bytes:
    """``base`` (or a tiny image) with tEXt chunks keyword → base64(JSON) inserted before IEND."""
    img = base or image()
    extra = b"".join(
        chunk(b"tEXt", k.encode("latin-1") + b"\0" + base64.b64encode(v.encode() if isinstance(v, str) else v))
        for k, v in texts.items()
    )
    return img[:-12] + extra + img[-12:]


def v3_doc(name: str = "Seraphina", entries: int = 3) -> dict:
    book_entries = [
        {
            "keys": ["dragon"],
            "content": "Dragons sleep under the mountain.",
            "enabled": True,
            "insertion_order": 10,
            "comment": "Dragons",
            "id": 0,
            "extensions": {"position": 0, "selectiveLogic": 0, "vendor": [1, None, {"x": True}]},
        },
        {
            "keys": ["elf", "elves"],
            "secondary_keys": ["war"],
            "selective": True,
            "content": "Elves fear war.",
            "enabled": True,
            "insertion_order": 5,
            "comment": "Elves",
            "extensions": {"selectiveLogic": 3, "position": 1},
        },
        {
            "keys": [],
            "constant": True,
            "content": "The forest is old.",
            "enabled": True,
            "insertion_order": 1,
            "extensions": {},
        },
    ][:entries]
    return {
        "spec": "chara_card_v3",
        "spec_version": "3.0",
        "data": {
            "name": name,
            "description": "A guardian of {{user}}'s forest.",
            "personality": "kind",
            "scenario": "In the glade.",
            "first_mes": "Hello {{user}}, I am {{char}}.",
            "alternate_greetings": ["Welcome back, <USER>.", "Oh, it's you."],
            "mes_example": (
                "<START>\n{{user}}: Who are you?\n{{char}}: I am <BOT>.\n<START>\n{{user}}: Hi\n{{char}}: Hey"
            ),
            "system_prompt": "{{original}} Stay in character.",
            "post_history_instructions": "Reply in two sentences.",
            "creator_notes": "Made for testing.",
            "creator": "tester",
            "character_version": "1.2",
            "tags": ["fantasy", "test"],
            "nickname": "Sera",
            "group_only_greetings": [],
            "creation_date": 1700000000,
            "extensions": {"fav": True, "depth_prompt": {"prompt": "x", "depth": 4}, "nothing": None},
            "character_book": {
                "name": "Forest",
                "token_budget": 500,
                "scan_depth": 3,
                "extensions": {"k": 1},
                "entries": book_entries,
            },
            "assets": [{"type": "icon", "uri": "embeded://assets/icon/images/main.png", "name": "main", "ext": "png"}],
        },
    }


def v2_doc() -> dict:
    doc = v3_doc()
    data = {
        k: v for k, v in doc["data"].items() if k not in ("nickname", "group_only_greetings", "assets", "creation_date")
    }
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}


def v1_doc() -> dict:
    return {
        "name": "Old Timer",
        "description": "An old card.",
        "personality": "grumpy",
        "scenario": "",
        "first_mes": "What?",
        "mes_example": "<START>\n<USER>: hi\n<BOT>: go away",
        "chat": "x-123",
    }


def charx_bytes(doc: dict, assets: dict[str, bytes] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("card.json", json.dumps(doc))
        for name, body in (assets or {}).items():
            z.writestr(name, body)
    return out.getvalue()


OLLAMA_MARIO = """FROM llama3.2
# sets the temperature to 1 [higher is more creative, lower is more coherent]
PARAMETER temperature 1
# sets the context window size to 4096, this controls how many tokens the LLM can use as context
PARAMETER num_ctx 4096

# sets a custom system message to specify the behavior of the chat assistant
SYSTEM You are Mario from super mario bros, acting as an assistant.
"""

OLLAMA_FULL = '''# a Modelfile using every instruction
from ./model.gguf
Parameter top_k 40
PARAMETER repeat_last_n 64
PARAMETER num_predict 128
PARAMETER stop "<|im_end|>"
PARAMETER stop <|im_start|>
PARAMETER num_gpu 20
TEMPLATE """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
SYSTEM """You are a
helpful pirate."""
MESSAGE user Is Toronto in Canada?
MESSAGE assistant yes
MESSAGE user Is Sacramento in Canada?
MESSAGE assistant no
LICENSE """MIT License
Copyright (c) nobody"""
ADAPTER ./missing-adapter.gguf
'''
