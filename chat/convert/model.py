"""A Hugging Face llama-family model folder → one GGUF file llama.cpp runs.

Reads ``config.json``, ``*.safetensors`` (never pickle) and ``tokenizer.json`` /
``tokenizer_config.json``. The GGUF header is planned from the safetensors headers
alone; then the tensors are converted and written one at a time, so memory holds one
tensor, not the model. The output appears under its final name only when complete.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chat.convert.architecture import (
    Architecture,
    Shape,
    architecture_for,
    gguf_name,
    permute_qk,
    qk_heads,
    read_hf_config,
)
from chat.convert.tensorfile import TensorSet, safetensors_files
from chat.errors import ModelError, UsageError

OUT_TYPES = ("f32", "f16", "q8_0")

Progress = Callable[[str, int, int], None]  # (tensor name, index, total)


@dataclass(frozen=True)
class ConvertedModel:
    """What ``convert_model`` wrote."""

    path: Path
    architecture: str  # the GGUF architecture (llama, qwen2)
    hf_class: str
    out_type: str
    n_tensors: int
    n_vocab: int
    pre_tokenizer: str
    size: int


@dataclass(frozen=True)
class _Planned:
    hf_name: str | None  # None for generated tensors
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int | None
    data: np.ndarray | None = None  # generated tensors only


def _natural(name: str) -> list[Any]:
    """``layers.10`` after ``layers.9`` (ASCII digits only: ``"²".isdigit()`` is True but int() refuses it)."""
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"([0-9]+)", name))]


def _rope_settings(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    theta = float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)
    merged = {**params, **scaling}
    return theta, merged


def _llama3_rope_freqs(config: dict[str, Any], rope: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` tensor for Llama 3.1-style rope scaling (as its converter computes it)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings", 8192)))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / float(f)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _out_qtype(out_type: str, shape: tuple[int, ...]):
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) < 2 or out_type == "f32":
        return Q.F32
    if out_type == "q8_0" and shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.F16  # f16, or q8_0 rows that are not a multiple of the block size (llama.cpp does the same)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def _encode(arr: np.ndarray, qtype) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


def _add_hparams(
    w, config: dict[str, Any], arch: Architecture, shape: Shape, n_vocab: int, name: str
) -> tuple[float, dict]:
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // shape.n_head)
    w.add_name(name)
    w.add_context_length(int(config.get("max_position_embeddings") or 4096))
    w.add_embedding_length(hidden)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
    if config.get("head_dim"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    theta, rope = _rope_settings(config)
    w.add_rope_freq_base(theta)
    w.add_vocab_size(n_vocab)
    kind = (rope.get("rope_type") or rope.get("type") or "default").lower()
    if kind == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        orig = rope.get("original_max_position_embeddings")
        if orig:
            w.add_rope_scaling_orig_ctx_len(int(orig))
    elif kind == "llama3" and arch.gguf_arch == "llama":
        pass  # a rope_freqs tensor, planned with the tensors
    elif kind != "default":
        raise ModelError(
            f"rope scaling {kind!r} ({arch.hf_class}) is not supported by this converter",
            hint="supported: default, linear, yarn, llama3 (llama only)",
        )
    return theta, rope


def convert_model(
    hf_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    out_type: str = "f16",
    name: str | None = None,
    progress: Progress | None = None,
) -> ConvertedModel:
    """Convert a Hugging Face llama / mistral / qwen2 folder into a GGUF file at ``out``.

    ``out_type``: ``f32`` (bit-exact), ``f16`` or ``q8_0`` for the 2-D weights; norms and
    biases stay f32. Raises ModelError for folders it cannot convert (pickle-only weights,
    another architecture, a tokenizer llama.cpp would read differently), naming what is wrong.
    """
    import gguf

    from chat.convert.tokenizer import add_tokenizer, load_tokenizer_json, pre_tokenizer_name

    if out_type not in OUT_TYPES:
        raise UsageError(f"unknown output type {out_type!r}", hint=f"choose one of {', '.join(OUT_TYPES)}")
    src = Path(hf_dir)
    if not src.is_dir():
        raise ModelError(f"{src}: not a folder", hint="pass a Hugging Face model folder")
    if (src / "adapter_config.json").is_file() and not (src / "config.json").is_file():
        raise ModelError(f"{src}: this is a PEFT adapter, not a model", hint="use: chat convert adapter")
    config = read_hf_config(src)
    arch = architecture_for(config, where=str(src / "config.json"))
    if config.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{src}: hidden_act {config['hidden_act']!r} is not what llama.cpp's {arch.gguf_arch} runs")
    shape = Shape.from_hf_config(config)
    # Fail on the tokenizer before touching the weights.
    pre_tokenizer_name(load_tokenizer_json(src), str(src / "tokenizer.json"))
    tensors = TensorSet(safetensors_files(src))
    try:
        embed = "model.embed_tokens.weight"
        if embed not in tensors:
            raise ModelError(f"{src}: no {embed} tensor in the safetensors files")
        n_vocab = tensors.entry(embed).shape[0]

        plan: list[_Planned] = []
        for hf_name in tensors:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            entry = tensors.entry(hf_name)
            target = gguf_name(hf_name, arch.gguf_arch, shape.n_layer)
            if target is None:
                raise ModelError(
                    f"{src}: tensor {hf_name} has no llama.cpp {arch.gguf_arch} counterpart",
                    hint="is this a plain text model of that family?",
                )
            heads = qk_heads(hf_name, shape) if arch.permute_qk else None
            plan.append(_Planned(hf_name, target, entry.shape, _out_qtype(out_type, entry.shape), heads))
        names = {p.name for p in plan}
        required = ["token_embd.weight", "output_norm.weight"] + [
            f"blk.{i}.{t}.weight"
            for i in range(shape.n_layer)
            for t in (
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            )
        ]
        missing = [n for n in required if n not in names]
        if missing:
            raise ModelError(
                f"{src}: tensor {missing[0]} is missing ({len(missing)} missing in all)", hint="an incomplete download?"
            )

        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        part = out_path.with_name(out_path.name + ".part")
        w = gguf.GGUFWriter(str(part), arch.gguf_arch)
        theta, rope = _add_hparams(w, config, arch, shape, n_vocab, name or src.resolve().name)
        if (rope.get("rope_type") or rope.get("type")) == "llama3" and arch.gguf_arch == "llama":
            head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // shape.n_head)
            freqs = _llama3_rope_freqs(config, rope, head_dim, theta)
            plan.append(_Planned(None, "rope_freqs.weight", freqs.shape, gguf.GGMLQuantizationType.F32, None, freqs))
        plan.sort(key=lambda p: _natural(p.name))
        file_type = {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[out_type]
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab = add_tokenizer(w, src, n_vocab)
        for p in plan:
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p.shape, p.qtype), raw_dtype=p.qtype)
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for i, p in enumerate(plan):
                arr = p.data if p.data is not None else tensors.float32(p.hf_name)  # type: ignore[arg-type]
                if p.permute_heads:
                    arr = permute_qk(arr, p.permute_heads)
                w.write_tensor_data(_encode(arr, p.qtype))
                del arr
                if progress:
                    progress(p.name, i + 1, len(plan))
            w.close()
            os.replace(part, out_path)
        except BaseException:
            w.close()
            part.unlink(missing_ok=True)
            raise
    finally:
        tensors.close()
    return ConvertedModel(
        path=out_path,
        architecture=arch.gguf_arch,
        hf_class=arch.hf_class,
        out_type=out_type,
        n_tensors=len(plan),
        n_vocab=n_vocab,
        pre_tokenizer=vocab.pre,
        size=out_path.stat().st_size,
    )
