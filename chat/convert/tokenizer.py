"""A Hugging Face byte-level BPE tokenizer as llama.cpp's ``gpt2`` vocabulary.

Tokens and their types come straight from ``tokenizer.json``: special and added tokens
are CONTROL (type 3) — written as NORMAL, llama.cpp would split ``<|im_start|>`` into
plain-text pieces — and ids the tokenizer does not use, up to the model's vocab size,
become ``[PADn]`` UNUSED tokens so the token list matches the embedding rows.
``tokenizer.ggml.pre`` picks llama.cpp's pre-tokenizer regex; it is read off the
tokenizer's own pre-tokenizer (the regex it splits with), so the ids match the
Hugging Face tokenizer. Merges, special ids, add_bos and the chat template go through
``gguf.SpecialVocab``, as in llama.cpp's converter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat.errors import ModelError

# The split regexes of the tokenizers llama.cpp knows by name (its `tokenizer.ggml.pre`).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
KNOWN_SPLIT_REGEXES: dict[str, str] = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2", _GPT2_REGEX: "gpt-2"}


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    pre: str


def load_tokenizer_json(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        hint = "only byte-level BPE tokenizers saved as tokenizer.json are supported"
        if (hf_dir / "tokenizer.model").is_file():
            hint = "this model has a SentencePiece tokenizer.model only; " + hint
        raise ModelError(f"{hf_dir}: no tokenizer.json", hint=hint)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read it ({exc})") from None


def pre_tokenizer_name(tok: dict[str, Any], where: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or a ModelError describing it."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelError(
            f"{where}: tokenizer model {model.get('type')!r} is not supported",
            hint="only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style) can be converted",
        )
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    splits = [p for p in parts if p.get("type") == "Split"]
    if not byte_level:
        raise ModelError(
            f"{where}: not a byte-level BPE tokenizer (pre-tokenizer {pre.get('type')!r})",
            hint="SentencePiece-style tokenizers (Llama 2, Mistral v0.1) are not supported by this converter; "
            "use llama.cpp's convert_hf_to_gguf.py for them",
        )
    if not splits:
        if byte_level[0].get("use_regex", True):
            return "gpt-2"
        raise ModelError(f"{where}: byte-level pre-tokenizer without a split regex is not supported")
    regex = (splits[0].get("pattern") or {}).get("Regex")
    name = KNOWN_SPLIT_REGEXES.get(regex or "")
    if len(splits) > 1 or name is None:
        raise ModelError(
            f"{where}: unknown pre-tokenizer split regex {regex!r}",
            hint="known: GPT-2, Llama 3 and Qwen2 byte-level BPE; llama.cpp would tokenize other "
            "regexes differently from Hugging Face",
        )
    return name


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>"))


def read_vocab(hf_dir: Path, n_vocab: int) -> Vocab:
    """Tokens, types and pre-tokenizer name; ``n_vocab`` is the model's embedding rows."""
    import gguf

    tok = load_tokenizer_json(hf_dir)
    pre = pre_tokenizer_name(tok, str(hf_dir / "tokenizer.json"))
    by_id: dict[int, str] = {int(i): t for t, i in tok["model"]["vocab"].items()}
    types: dict[int, int] = {}
    for added in tok.get("added_tokens", []):
        i = int(added["id"])
        by_id[i] = added["content"]
        special = added.get("special") or _looks_special(added["content"])
        types[i] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    size = max(n_vocab, max(by_id) + 1)
    if size > n_vocab:
        raise ModelError(
            f"{hf_dir}: the tokenizer has {max(by_id) + 1} ids but the model only {n_vocab} embedding rows",
            hint="the tokenizer files do not belong to these weights",
        )
    tokens: list[str] = []
    token_types: list[int] = []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types.get(i, int(gguf.TokenType.NORMAL)))
        else:
            tokens.append(f"[PAD{i}]")
            token_types.append(int(gguf.TokenType.UNUSED))
    return Vocab(tokens, token_types, pre)


def add_tokenizer(writer, hf_dir: Path, n_vocab: int) -> Vocab:
    """Write the ``tokenizer.ggml.*`` keys and the chat template."""
    import gguf

    vocab = read_vocab(hf_dir, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=len(vocab.tokens))
    if not special.merges:
        raise ModelError(f"{hf_dir}/tokenizer.json: no BPE merges found")
    special.add_to_gguf(writer, quiet=True)
    return vocab
