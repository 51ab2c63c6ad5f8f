"""Real, tiny model files for tests and benchmarks: tokenizer, llama weights, GGUF, LoRA, control vectors.

Everything here writes *real* files that the real loaders accept (llama.cpp through
llama-cpp-python, transformers, peft), so tests exercise the same code paths as a user
with a downloaded model -- just with a 64-wide, 2-layer llama that loads in milliseconds.
All outputs are deterministic functions of their arguments (seeds included).

Import cost is kept low on purpose: only numpy, gguf, tokenizers and safetensors are
needed (the ``test`` extra); torch / transformers / peft / llama_cpp are never imported
here, so benchmarks and llama.cpp-only CI jobs can use this module too.

Layout conventions (see /work/shared/FACTS.md):

* weights are dicts of Hugging Face names (``model.layers.0.self_attn.q_proj.weight``)
  to float32 numpy arrays in HF orientation ``(out_features, in_features)``;
* GGUF writers translate names with ``gguf.get_tensor_name_map`` and apply llama.cpp's
  rope permutation to q/k rows (and to LoRA ``B`` rows for q/k);
* LoRA ``A`` is ``(r, in)`` and ``B`` is ``(out, r)`` exactly like PEFT's lora_A/lora_B;
  the effective update is ``W + s * (alpha / r) * B @ A``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import gguf
import numpy as np

__all__ = [
    "SPECIAL_TOKENS",
    "CHATML_TEMPLATE",
    "CORPUS",
    "TinyLlamaConfig",
    "LoraAdapter",
    "LORA_TARGETS",
    "train_tokenizer",
    "tokenizer_vocab_size",
    "make_llama_weights",
    "count_parameters",
    "write_hf_model",
    "write_gguf",
    "permute_qk",
    "make_lora",
    "write_lora_gguf",
    "write_peft_adapter",
    "merge_loras",
    "make_control_vector",
    "write_control_vector",
    "BENCHMARK_CONFIG",
    "write_benchmark_gguf",
    "write_truncated_gguf",
    "write_non_gguf",
    "write_bad_lora_wrong_arch",
    "write_bad_lora_wrong_shape",
    "write_bad_lora_missing_tensor",
    "write_bad_lora_unknown_tensor",
    "write_bad_lora_alpha_type",
    "write_bad_control_vector_width",
    "write_gguf_variant",
    "write_bad_lora_tensors",
    "write_bad_control_vector",
    "write_bad_peft_adapter",
]

PathLike = str | os.PathLike[str]

# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
#: Special tokens, in id order (the BPE trainer puts them at ids 0, 1, 2).
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

#: ChatML, the template Qwen-style models ship. llama.cpp recognises it by ``<|im_start|>``.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Training text: English prose, dialogue in ChatML, Chinese and code, so that merges
#: cover all three and the byte fallback is exercised for rare CJK characters.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A terminal chat tool should start fast,
stay out of the way, and keep every conversation on the local machine. When the user
asks a question, the assistant answers briefly and then waits for the next message.
It was a bright cold day in April, and the clocks were striking thirteen. The river ran
slowly past the old mill, and the children played on the bank until the evening came.
Good tools are quiet. They do one thing well, they tell you when something is wrong, and
they never lose your work. Personas change the voice of the assistant: a pirate, a poet,
a careful reviewer who reads every line twice before saying anything at all.
She opened the window and listened to the rain. Somewhere a dog was barking, and the
sound of the city rose and fell like the sea. "Are you coming?" he asked. "In a minute,"
she said, and went on reading. The book was about sailing ships and distant islands.
Models are loaded once and adapters are swapped in a few milliseconds. The context is
trimmed from the oldest turns when it grows too long, but the system prompt is kept.
Numbers appear too: 1, 2, 3, 10, 42, 100, 2024, 3.14159, 0.7 and 0.3, 16 heads, 4 groups.
What is the capital of France? Paris is the capital of France. How are you today? I am
fine, thank you. Please write a short poem about the moon. The moon is a silver coin.
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
Hello! Can you tell me a joke?<|im_end|>
<|im_start|>assistant
Why did the programmer quit his job? Because he didn't get arrays.<|im_end|>
<|im_start|>user
Translate "good morning" into Chinese.<|im_end|>
<|im_start|>assistant
早上好。<|im_end|>
<|endoftext|>
今天天气很好，我们去公园散步吧。我喜欢在终端里和助手聊天，因为它又快又安静。
这个模型很小，但是它可以加载适配器，也可以使用控制向量来改变说话的风格。
你好，世界！中文文本也需要正确地分词。北京是中国的首都，上海是一个很大的城市。
人工智能正在改变我们的生活和工作方式。请用简单的话解释一下这个问题。
def greet(name: str) -> str:
    \"\"\"Return a friendly greeting.\"\"\"
    return f"Hello, {name}!"

class Session:
    def __init__(self, model, persona=None):
        self.model = model
        self.persona = persona
        self.history = []

    def send(self, text):
        self.history.append({"role": "user", "content": text})
        reply = self.model.generate(self.history, max_tokens=256)
        self.history.append({"role": "assistant", "content": reply})
        return reply

for i in range(10):
    if i % 2 == 0:
        print(i, "even")
    else:
        print(i, "odd")

import json, os
config = json.loads(open(os.path.expanduser("~/.config/chat/config.json")).read())
result = [x * x for x in range(100) if x > 3]
while True:
    line = input("> ")
    if not line:
        break
"""


def train_tokenizer(out_dir: PathLike, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE on :data:`CORPUS` and save it as a Hugging Face tokenizer folder.

    Byte-level BPE with GPT-2 pre-tokenisation is what llama.cpp calls ``gpt2`` model /
    ``gpt-2`` pre-tokenizer, so the same ids come out of both libraries. Special tokens
    are ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (ids 0, 1, 2); no BOS is ever
    added; EOS is ``<|im_end|>``; the ChatML ``chat_template`` is stored in
    ``tokenizer_config.json``. The folder is written by hand (no transformers needed).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The trainer counts words; a few copies give the rarer merges a frequency >= 2.
    tok.train_from_iterator([CORPUS] * 3, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))

    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": IM_END, "pad_token": ENDOFTEXT}, indent=2)
    )
    return out


def _load_tokenizer_json(tokenizer_dir: PathLike) -> dict:
    return json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))


def tokenizer_vocab_size(tokenizer_dir: PathLike) -> int:
    """Number of ids in the saved tokenizer (model vocab plus added tokens)."""
    data = _load_tokenizer_json(tokenizer_dir)
    ids = set(data["model"]["vocab"].values()) | {t["id"] for t in data["added_tokens"]}
    return max(ids) + 1


def _special_id(tokenizer_dir: PathLike, token: str) -> int:
    data = _load_tokenizer_json(tokenizer_dir)
    for t in data["added_tokens"]:
        if t["content"] == token:
            return int(t["id"])
    raise KeyError(token)


# --------------------------------------------------------------------------------------
# Tiny llama
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyLlamaConfig:
    """Shape of a llama model. Defaults give the 2-layer, 64-wide test model.

    ``vocab_size`` must equal the tokenizer's size (use :func:`tokenizer_vocab_size`);
    the default 512 matches ``train_tokenizer(..., vocab_size=512)``.
    """

    vocab_size: int = 512
    hidden_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    ffn_size: int = 128
    n_ctx: int = 512
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_head_kv

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every linear projection of one layer, keyed by HF module suffix."""
        h, kv, f = self.hidden_size, self.kv_dim, self.ffn_size
        return {
            "self_attn.q_proj": (h, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (f, h),
            "mlp.up_proj": (f, h),
            "mlp.down_proj": (h, f),
        }


def make_llama_weights(cfg: TinyLlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 llama weights with HF names, scaled so greedy output is not degenerate.

    Why these scales: with the usual 0.02 init a 64-wide model is almost a bigram table
    (the residual stream is the embedding, blocks add nearly nothing), greedy decoding
    falls into a one-token loop and the tests could not tell a broken attention/rope
    from a working one. Unit-variance embeddings, ``1/sqrt(fan_in)`` projections and
    an output head that spreads logits over several units make every part matter.
    Norm weights get noise around 1 so a missing norm weight shows up too. The logits
    of the special tokens are pushed down a little so generation does not stop at once.
    """
    rng = np.random.default_rng(seed)
    h, f, v = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size

    def lin(out: int, inp: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((out, inp)) * gain / np.sqrt(inp)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.standard_normal((v, h)).astype(np.float32)}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        for suffix, (out, inp) in cfg.module_shapes().items():
            gain = 2.0 if suffix in ("self_attn.q_proj", "self_attn.k_proj") else 1.0
            w[p + suffix + ".weight"] = lin(out, inp, gain)
        w[p + "post_attention_layernorm.weight"] = norm(h)
    w["model.norm.weight"] = norm(h)
    head = lin(v, h, 4.0)
    head[: len(SPECIAL_TOKENS)] *= 0.5
    w["lm_head.weight"] = head
    return w


def count_parameters(weights: Mapping[str, np.ndarray]) -> int:
    """Total number of scalars in all tensors."""
    return int(sum(a.size for a in weights.values()))


def _hf_config(cfg: TinyLlamaConfig, bos_id: int, eos_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head_kv,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.n_ctx,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": bos_id,
        "dtype": "float32",
        "torch_dtype": "float32",
    }


def write_hf_model(
    out_dir: PathLike, cfg: TinyLlamaConfig, weights: Mapping[str, np.ndarray], tokenizer_dir: PathLike
) -> Path:
    """Write a Hugging Face llama folder: config.json, model.safetensors, tokenizer files.

    Loadable by ``LlamaForCausalLM.from_pretrained(dir)`` (safetensors only, no pickle)
    and ``AutoTokenizer.from_pretrained(dir)``.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bos, eos = _special_id(tokenizer_dir, ENDOFTEXT), _special_id(tokenizer_dir, IM_END)
    (out / "config.json").write_text(json.dumps(_hf_config(cfg, bos, eos), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, indent=2)
    )
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = Path(tokenizer_dir) / name
        if src.exists():
            shutil.copyfile(src, out / name)
    return out


# --------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> llama.cpp rope layout for q/k rows (HF rotates halves, ggml rotates pairs).

    Works on any matrix whose rows are the projection's output features (q/k weights
    and LoRA ``B`` for q/k).
    """
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_name(hf_name: str, n_layer: int) -> str:
    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise KeyError(f"no GGUF name for {hf_name}")
    return name


def _add_llama_hparams(w: gguf.GGUFWriter, cfg: TinyLlamaConfig, name: str) -> None:
    w.add_name(name)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ffn_size)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)


def _gguf_layout(hf_name: str, arr: np.ndarray, cfg: "TinyLlamaConfig") -> tuple[str, np.ndarray]:
    """A Hugging Face llama tensor as llama.cpp stores it: its GGUF name, f32, q/k rows permuted for rope."""
    arr = np.asarray(arr, dtype=np.float32)
    if hf_name.endswith("q_proj.weight"):
        arr = permute_qk(arr, cfg.n_head)
    elif hf_name.endswith("k_proj.weight"):
        arr = permute_qk(arr, cfg.n_head_kv)
    return _gguf_name(hf_name, cfg.n_layer), arr


def _add_tokenizer(
    w: gguf.GGUFWriter, tokenizer_dir: PathLike, chat_template: str | None, pad_to: int | None = None
) -> None:
    """Write the gpt2-style vocab: tokens, types (specials as CONTROL), merges, special ids.

    Written directly from tokenizer.json rather than through ``gguf.BpeVocab`` because
    BpeVocab marks every token NORMAL, and llama.cpp then splits ``<|im_start|>`` into
    plain text pieces. ``pad_to`` appends ``<|extra_N|>`` CONTROL tokens (like Llama 3's
    reserved tokens) to reach a realistic vocab size for benchmarks.
    """
    data = _load_tokenizer_json(tokenizer_dir)
    n = tokenizer_vocab_size(tokenizer_dir)
    tokens: list[str] = [""] * n
    types: list[int] = [int(gguf.TokenType.NORMAL)] * n
    for text, idx in data["model"]["vocab"].items():
        tokens[idx] = text
    for t in data["added_tokens"]:
        tokens[t["id"]] = t["content"]
        types[t["id"]] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    if any(t == "" for t in tokens):
        raise ValueError("tokenizer has holes in its id space")
    if pad_to is not None and pad_to > n:
        tokens += [f"<|extra_{i}|>" for i in range(pad_to - n)]
        types += [int(gguf.TokenType.CONTROL)] * (pad_to - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(_special_id(tokenizer_dir, ENDOFTEXT))
    w.add_eos_token_id(_special_id(tokenizer_dir, IM_END))
    w.add_pad_token_id(_special_id(tokenizer_dir, ENDOFTEXT))
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf(
    path: PathLike,
    cfg: TinyLlamaConfig,
    weights: Mapping[str, np.ndarray],
    tokenizer_dir: PathLike,
    qtype: str = "f32",
    chat_template: str | None = CHATML_TEMPLATE,
    name: str = "tiny-llama",
) -> Path:
    """Write a llama GGUF that llama.cpp loads, from HF-named weights.

    ``qtype`` is ``"f32"`` (bit-for-bit the same maths as transformers, for parity tests)
    or ``"q8_0"`` (2-D weights quantized, norms stay f32 as llama.cpp expects). Pass
    ``chat_template=None`` to omit the template key (for fallback-template tests).
    """
    if qtype not in ("f32", "q8_0"):
        raise ValueError(f"unsupported qtype {qtype!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    _add_llama_hparams(w, cfg, name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "f32" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, tokenizer_dir, chat_template)
    for hf_name, arr in weights.items():
        name_, arr = _gguf_layout(hf_name, arr, cfg)
        if qtype == "q8_0" and arr.ndim == 2:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name_, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name_, np.ascontiguousarray(arr))
    _finish(w)
    return path


# --------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------

LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraAdapter:
    """A LoRA adapter in PEFT orientation.

    ``a[module]`` is ``(rank, in)``, ``b[module]`` is ``(out, rank)``; ``module`` is the HF
    module path without ``.weight`` (``model.layers.0.self_attn.q_proj``). Update is
    ``scale * (alpha / rank) * b @ a``.
    """

    rank: int
    alpha: float
    a: dict[str, np.ndarray] = field(default_factory=dict)
    b: dict[str, np.ndarray] = field(default_factory=dict)
    targets: tuple[str, ...] = LORA_TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta(self, module: str) -> np.ndarray:
        """The weight update at scale 1: ``(alpha / rank) * B @ A``."""
        return (self.scaling * (self.b[module].astype(np.float64) @ self.a[module].astype(np.float64))).astype(np.float32)


def make_lora(
    cfg: TinyLlamaConfig,
    rank: int = 4,
    targets: Sequence[str] = LORA_TARGETS,
    seed: int = 1,
    alpha: float = 8.0,
) -> LoraAdapter:
    """Random LoRA on every layer's ``targets`` projections.

    Unlike a freshly initialised PEFT adapter (B = 0), both A and B are random and sized
    so that ``(alpha/r) * B @ A`` is about as large as the base weight itself: at scale 1
    the greedy continuation of the tiny model visibly changes, which is what persona /
    hot-swap tests need to observe.
    """
    rng = np.random.default_rng(seed)
    lora = LoraAdapter(rank=rank, alpha=float(alpha), targets=tuple(targets))
    for i in range(cfg.n_layer):
        for suffix, (out, inp) in cfg.module_shapes().items():
            if suffix.split(".")[-1] not in targets:
                continue
            mod = f"model.layers.{i}.{suffix}"
            # ||delta|| per entry ~ scaling * sqrt(r) * sa * sb; target ~ 1/sqrt(in).
            sa = 1.0 / np.sqrt(inp)
            sb = 1.0 / (lora.scaling * np.sqrt(rank))
            lora.a[mod] = (rng.standard_normal((rank, inp)) * sa).astype(np.float32)
            lora.b[mod] = (rng.standard_normal((out, rank)) * sb).astype(np.float32)
    return lora


def _lora_tensors(cfg: TinyLlamaConfig, lora: LoraAdapter) -> list[tuple[str, np.ndarray]]:
    """GGUF-named lora_a / lora_b tensors, with q/k B rows rope-permuted."""
    out: list[tuple[str, np.ndarray]] = []
    for mod in lora.a:
        base = _gguf_name(mod + ".weight", cfg.n_layer)
        b = lora.b[mod]
        if mod.endswith("q_proj"):
            b = permute_qk(b, cfg.n_head)
        elif mod.endswith("k_proj"):
            b = permute_qk(b, cfg.n_head_kv)
        out.append((base + ".lora_a", np.ascontiguousarray(lora.a[mod], dtype=np.float32)))
        out.append((base + ".lora_b", np.ascontiguousarray(b, dtype=np.float32)))
    return out


def _write_adapter_gguf(
    path: PathLike,
    tensors: Iterable[tuple[str, np.ndarray]],
    arch: str = "llama",
    alpha: float | int | str | None = None,
    alpha_type: str = "f32",
) -> Path:
    """Low-level adapter writer; ``arch``/``alpha_type`` are parameters so bad files can be made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    if alpha is not None:
        key = "adapter.lora.alpha"
        if alpha_type == "f32":
            w.add_float32(key, float(alpha))
        elif alpha_type == "f64":
            w.add_float64(key, float(alpha))
        elif alpha_type == "int32":
            w.add_int32(key, int(alpha))
        elif alpha_type == "string":
            w.add_string(key, str(alpha))
        else:
            raise ValueError(alpha_type)
    for name, arr in tensors:
        w.add_tensor(name, arr)
    _finish(w)
    return path


def write_lora_gguf(path: PathLike, cfg: TinyLlamaConfig, lora: LoraAdapter) -> Path:
    """Write a llama.cpp LoRA adapter GGUF (``general.type=adapter``, alpha as float32)."""
    return _write_adapter_gguf(path, _lora_tensors(cfg, lora), alpha=lora.alpha)


def write_peft_adapter(
    out_dir: PathLike, cfg: TinyLlamaConfig, lora: LoraAdapter, base_model: str = "tiny-llama"
) -> Path:
    """Write a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

    Loadable with ``PeftModel.from_pretrained(model, dir)`` or ``model.load_adapter``.
    Written by hand so neither torch nor peft is needed to create it.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(set(lora.targets)),
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors: dict[str, np.ndarray] = {}
    for mod in lora.a:
        tensors[f"base_model.model.{mod}.lora_A.weight"] = np.ascontiguousarray(lora.a[mod])
        tensors[f"base_model.model.{mod}.lora_B.weight"] = np.ascontiguousarray(lora.b[mod])
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def merge_loras(
    weights: Mapping[str, np.ndarray], loras: Sequence[tuple[LoraAdapter, float]]
) -> dict[str, np.ndarray]:
    """Reference mix: ``W + sum_i s_i * (alpha_i / r_i) * B_i @ A_i`` on HF-named weights.

    This is exactly what llama.cpp computes with several adapters active (and peft with
    several active adapters or ``combination_type="cat"``), so a GGUF written from the
    result must give the same greedy tokens as the live mix.
    """
    merged = {k: np.array(v, dtype=np.float32, copy=True) for k, v in weights.items()}
    for lora, scale in loras:
        for mod in lora.a:
            merged[mod + ".weight"] += np.float32(scale) * lora.delta(mod)
    return merged


# --------------------------------------------------------------------------------------
# Control vectors
# --------------------------------------------------------------------------------------


def make_control_vector(
    cfg: TinyLlamaConfig, seed: int = 2, magnitude: float = 4.0, layers: Iterable[int] | None = None
) -> dict[int, np.ndarray]:
    """Random unit directions times ``magnitude`` for ``layers`` (default 1 .. n_layer-1).

    llama.cpp has no slot for layer 0, so the 2-layer test model gets layer 1 only
    (added to the output of the last block). Tests of layer ranges should build a
    ``TinyLlamaConfig(n_layer=4)`` model; the default magnitude is large relative to the
    unit-variance residual stream so greedy output visibly changes.
    """
    rng = np.random.default_rng(seed)
    idx = list(range(1, cfg.n_layer)) if layers is None else sorted(layers)
    out: dict[int, np.ndarray] = {}
    for il in idx:
        if il < 1:
            raise ValueError("control vectors start at layer 1")
        d = rng.standard_normal(cfg.hidden_size)
        out[il] = (magnitude * d / np.linalg.norm(d) * np.sqrt(cfg.hidden_size)).astype(np.float32)
    return out


def write_control_vector(
    path: PathLike, directions: Mapping[int, np.ndarray], model_hint: str = "llama"
) -> Path:
    """Write a llama.cpp control vector GGUF (the format ``llama-cvector-generator`` emits).

    ``layer_count`` is the number of direction tensors, as in the generator.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", model_hint)
    w.add_int32("controlvector.layer_count", len(directions))
    for il in sorted(directions):
        w.add_tensor(f"direction.{il}", np.ascontiguousarray(directions[il], dtype=np.float32))
    _finish(w)
    return path


# --------------------------------------------------------------------------------------
# Benchmark model
# --------------------------------------------------------------------------------------

#: 16 x 1024 llama with a 32000-token vocab: 245.9M parameters counting every tensor
#: (180.4M in blocks, 65.5M in token_embd + output, 33k in norms). A realistic vocab
#: matters: sampling cost and the output matmul scale with it.
BENCHMARK_CONFIG = TinyLlamaConfig(
    vocab_size=32000, hidden_size=1024, n_layer=16, n_head=16, n_head_kv=4, ffn_size=2816, n_ctx=4096
)
_FINGERPRINT_KEY = "chat.modelfactory.fingerprint"
_BENCHMARK_FORMAT = 1


def _random_q8_0(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """Random Q8_0 blocks built directly as bytes (f16 scale + 32 int8 per block).

    Quantizing 250M random floats with numpy takes minutes; generating the quantized
    representation directly takes about a second and is just as random.
    """
    n_blocks = cols // 32
    q = rng.integers(-127, 128, size=(rows, n_blocks, 32), dtype=np.int8)
    # uniform int8 on [-127, 127] has std ~73.3; scale so weights have std ``std``.
    d = np.full((rows, n_blocks, 1), std / 73.3, dtype=np.float16)
    raw = np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=2)
    return raw.reshape(rows, n_blocks * 34)


def _read_second_string_kv(path: Path) -> tuple[str, str] | None:
    """Read the second key/value of a GGUF header if it is a string, else None.

    ``GGUFReader`` parses the whole 32000-token vocab (~0.6 s); the benchmark writer puts
    its fingerprint right after ``general.architecture`` so reuse checks read ~200 bytes.
    """
    import struct

    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                return None
            _version, _n_tensors, n_kv = struct.unpack("<IQQ", fh.read(20))
            if n_kv < 2:
                return None

            def read_str() -> str:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 4096:
                    raise ValueError("implausible string length")
                return fh.read(n).decode("utf-8")

            result: tuple[str, str] | None = None
            for _ in range(2):
                key = read_str()
                (vtype,) = struct.unpack("<I", fh.read(4))
                if vtype != int(gguf.GGUFValueType.STRING):
                    return None
                result = (key, read_str())
            return result
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None


def write_benchmark_gguf(path: PathLike, seed: int = 0, tokenizer_dir: PathLike | None = None) -> Path:
    """Write (or reuse) a 245.9M-parameter Q8_0 llama with random weights for benchmarks.

    Shape: :data:`BENCHMARK_CONFIG` (1024 wide, 16 layers, ffn 2816, 16 heads / 4 kv,
    vocab 32000). Parameter count includes every tensor (embeddings, output head,
    norms). About 261 MB on disk. The tokenizer is the :func:`train_tokenizer` BPE padded
    with ``<|extra_N|>`` control tokens, with the ChatML template, so it tokenizes and
    chats in llama.cpp like a real model. Output rows of special/padding tokens are zero,
    so random-weight greedy generation never stops early or emits padding.

    The file carries a fingerprint of (format, seed, config); an existing file with the
    same fingerprint is reused, anything else is rewritten (atomically, via a temp file).
    """
    path = Path(path)
    cfg = BENCHMARK_CONFIG
    fingerprint = hashlib.sha256(
        json.dumps({"format": _BENCHMARK_FORMAT, "seed": seed, "cfg": asdict(cfg)}, sort_keys=True).encode()
    ).hexdigest()
    if path.exists() and _read_second_string_kv(path) == (_FINGERPRINT_KEY, fingerprint):
        return path

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else path.with_name(path.stem + "-tokenizer")
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(tok_dir, vocab_size=512)
    n_real = tokenizer_vocab_size(tok_dir)

    rng = np.random.default_rng(seed)
    h, f, v = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_string(_FINGERPRINT_KEY, fingerprint)  # second KV, see _read_second_string_kv
    _add_llama_hparams(w, cfg, "chat-benchmark-random-246m")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, tok_dir, CHATML_TEMPLATE, pad_to=v)

    q8 = gguf.GGMLQuantizationType.Q8_0

    def add_q8(name: str, rows: int, cols: int, std: float) -> np.ndarray:
        raw = _random_q8_0(rng, rows, cols, std)
        w.add_tensor(name, raw, raw_dtype=q8)  # uint8 byte shape -> gguf derives (rows, cols)
        return raw

    def add_norm(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    add_q8("token_embd.weight", v, h, 1.0)
    for i in range(cfg.n_layer):
        add_norm(f"blk.{i}.attn_norm.weight", h)
        add_q8(f"blk.{i}.attn_q.weight", h, h, 2.0 / np.sqrt(h))
        add_q8(f"blk.{i}.attn_k.weight", cfg.kv_dim, h, 2.0 / np.sqrt(h))
        add_q8(f"blk.{i}.attn_v.weight", cfg.kv_dim, h, 1.0 / np.sqrt(h))
        add_q8(f"blk.{i}.attn_output.weight", h, h, 1.0 / np.sqrt(h))
        add_norm(f"blk.{i}.ffn_norm.weight", h)
        add_q8(f"blk.{i}.ffn_gate.weight", f, h, 1.0 / np.sqrt(h))
        add_q8(f"blk.{i}.ffn_up.weight", f, h, 1.0 / np.sqrt(h))
        add_q8(f"blk.{i}.ffn_down.weight", h, f, 1.0 / np.sqrt(f))
    add_norm("output_norm.weight", h)
    out = _random_q8_0(rng, v, h, 4.0 / np.sqrt(h))
    out_blocks = out.reshape(v, h // 32, 34)
    specials = list(range(len(SPECIAL_TOKENS))) + list(range(n_real, v))
    out_blocks[specials, :, :2] = 0  # f16 scale 0 -> logit exactly 0 for these rows
    w.add_tensor("output.weight", out, raw_dtype=q8)
    _finish(w)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------
# Bad files (for validation tests; never hand these to llama.cpp unvalidated)
# --------------------------------------------------------------------------------------


def write_truncated_gguf(src: PathLike, dst: PathLike, keep_fraction: float = 0.5) -> Path:
    """Copy the first ``keep_fraction`` of a valid GGUF: header intact, tensor data cut."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: max(8, int(len(data) * keep_fraction))])
    return dst


def write_non_gguf(path: PathLike, content: bytes = b"PK\x03\x04 this is not a gguf file\n" * 8) -> Path:
    """A file with a non-GGUF magic (a zip-like header and some text)."""
    path = Path(path)
    path.write_bytes(content)
    return path


def write_bad_lora_wrong_arch(path: PathLike, cfg: TinyLlamaConfig, lora: LoraAdapter, arch: str = "qwen2") -> Path:
    """A well-formed adapter whose ``general.architecture`` is not the base model's."""
    return _write_adapter_gguf(path, _lora_tensors(cfg, lora), arch=arch, alpha=lora.alpha)


def write_bad_lora_wrong_shape(path: PathLike, cfg: TinyLlamaConfig, lora: LoraAdapter) -> Path:
    """An adapter made for a model twice as wide: every lora_a has the wrong ``in`` size."""
    tensors = []
    for name, arr in _lora_tensors(cfg, lora):
        if name.endswith(".lora_a"):
            arr = np.ascontiguousarray(np.concatenate([arr, arr], axis=1))
        tensors.append((name, arr))
    return _write_adapter_gguf(path, tensors, alpha=lora.alpha)


def write_bad_lora_missing_tensor(path: PathLike, cfg: TinyLlamaConfig, lora: LoraAdapter) -> Path:
    """An adapter where the first module has ``lora_a`` but no matching ``lora_b``."""
    tensors = _lora_tensors(cfg, lora)
    dropped = next(i for i, (n, _) in enumerate(tensors) if n.endswith(".lora_b"))
    return _write_adapter_gguf(path, tensors[:dropped] + tensors[dropped + 1 :], alpha=lora.alpha)


def write_bad_lora_unknown_tensor(path: PathLike, cfg: TinyLlamaConfig, lora: LoraAdapter) -> Path:
    """A valid adapter plus a lora_a/lora_b pair for a layer the base model does not have."""
    tensors = _lora_tensors(cfg, lora)
    a, b = tensors[0][1], tensors[1][1]
    tensors += [
        (f"blk.{cfg.n_layer + 7}.attn_q.weight.lora_a", a),
        (f"blk.{cfg.n_layer + 7}.attn_q.weight.lora_b", b),
    ]
    return _write_adapter_gguf(path, tensors, alpha=lora.alpha)


def write_bad_lora_alpha_type(
    path: PathLike, cfg: TinyLlamaConfig, lora: LoraAdapter, alpha_type: str = "int32"
) -> Path:
    """An adapter with ``adapter.lora.alpha`` stored as ``int32``, ``f64`` or ``string``.

    llama.cpp aborts the whole process on such a file (see FACTS.md): only validators
    may open it.
    """
    if alpha_type == "f32":
        raise ValueError("f32 is the valid type")
    return _write_adapter_gguf(path, _lora_tensors(cfg, lora), alpha=lora.alpha, alpha_type=alpha_type)


def write_bad_control_vector_width(path: PathLike, cfg: TinyLlamaConfig, seed: int = 2, extra: int = 16) -> Path:
    """A control vector whose directions are ``hidden_size + extra`` wide."""
    wide = TinyLlamaConfig(**{**asdict(cfg), "hidden_size": cfg.hidden_size + extra})
    return write_control_vector(path, make_control_vector(wide, seed=seed, layers=range(1, max(2, cfg.n_layer))))


# --------------------------------------------------------------------------------------
# Files llama.cpp accepts and then crashes on, and numbers that give empty answers
# (for the hardening tests; only the validators may open them in-process)
# --------------------------------------------------------------------------------------

_NUMPY_TYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64")


def _stored_as(arr: np.ndarray, kind: str) -> tuple[np.ndarray, dict]:
    """``arr`` stored as numpy dtype ``kind`` ("int32" …) or ggml type ``kind`` ("Q8_0" …), and add_tensor kwargs."""
    if kind in _NUMPY_TYPES:
        scaled = arr * 100 if kind.startswith("int") else arr  # integers: keep the values from all rounding to 0
        return np.ascontiguousarray(scaled.astype(kind)), {}
    qtype = gguf.GGMLQuantizationType[kind]
    q = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)
    return q, {"raw_shape": q.shape, "raw_dtype": qtype}


def write_gguf_variant(
    path: PathLike,
    cfg: TinyLlamaConfig,
    weights: Mapping[str, np.ndarray],
    tokenizer_dir: PathLike,
    hparams: Mapping[str, float | int] | None = None,
    tensor_types: Mapping[str, str] | None = None,
) -> Path:
    """The f32 tiny llama with hyper-parameters overridden and tensors stored in other types.

    ``hparams`` maps keys under ``llama.`` to values (ints as uint32, floats as float32), e.g.
    ``{"block_count": 0}`` or ``{"attention.layer_norm_rms_epsilon": float("nan")}``.
    ``tensor_types`` maps fnmatch patterns of GGUF tensor names to a numpy dtype name or a
    ggml quantized type name, e.g. ``{"*_norm.weight": "float16", "token_embd.weight": "int32"}``.
    """
    import fnmatch
    import logging

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    _add_llama_hparams(w, cfg, "tiny-llama-variant")
    _add_tokenizer(w, tokenizer_dir, CHATML_TEMPLATE)
    gguf_logger = logging.getLogger("gguf.gguf_writer")
    level, gguf_logger.level = gguf_logger.level, logging.ERROR  # "duplicated key": overriding is the point
    try:
        for key, value in (hparams or {}).items():
            vtype = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
            w.add_key_value(f"llama.{key}", value, vtype)
    finally:
        gguf_logger.level = level
    for hf_name, arr in weights.items():
        name, arr = _gguf_layout(hf_name, arr, cfg)
        kind = next((k for pat, k in (tensor_types or {}).items() if fnmatch.fnmatchcase(name, pat)), None)
        data, extra = _stored_as(arr, kind) if kind else (np.ascontiguousarray(arr), {})
        w.add_tensor(name, data, **extra)
    _finish(w)
    return path


def write_bad_lora_tensors(
    path: PathLike,
    cfg: TinyLlamaConfig,
    lora: LoraAdapter,
    dtype: str | None = None,
    layer: str | None = None,
    value: float | None = None,
    alpha: float | None = None,
) -> Path:
    """An adapter GGUF with one kind of damage.

    ``dtype``: every tensor stored as that numpy dtype (``"int32"``, ``"int8"``, ``"float64"``);
    ``layer``: the first pair renamed to ``blk.<layer>.…`` (e.g. ``"²"``);
    ``value``: written into the first ``lora_b`` (``float("nan")``, ``float("inf")``);
    ``alpha``: ``adapter.lora.alpha`` (float32) instead of the adapter's own.
    """
    tensors = _lora_tensors(cfg, lora)
    if dtype is not None:
        tensors = [(n, _stored_as(a, dtype)[0]) for n, a in tensors]
    if layer is not None:
        tensors = [(_relayer(n, layer) if i < 2 else n, a) for i, (n, a) in enumerate(tensors)]
    if value is not None:
        i = next(i for i, (n, _) in enumerate(tensors) if n.endswith(".lora_b"))
        b = tensors[i][1].copy()
        b.flat[0] = value
        tensors[i] = (tensors[i][0], b)
    return _write_adapter_gguf(path, tensors, alpha=lora.alpha if alpha is None else alpha)


def _relayer(name: str, layer: str) -> str:
    parts = name.split(".")
    return ".".join([parts[0], layer, *parts[2:]])


def write_bad_control_vector(
    path: PathLike, directions: Mapping[int, np.ndarray], name: str | None = None, value: float | None = None
) -> Path:
    """A control vector whose first direction is named ``name`` ("direction.²") or holds ``value`` at index 0."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_int32("controlvector.layer_count", len(directions))
    for i, il in enumerate(sorted(directions)):
        d = np.array(directions[il], dtype=np.float32)
        if i == 0 and value is not None:
            d[0] = value
        w.add_tensor(name if i == 0 and name else f"direction.{il}", d)
    _finish(w)
    return path


def write_bad_peft_adapter(
    out_dir: PathLike,
    cfg: TinyLlamaConfig,
    lora: LoraAdapter,
    config: Mapping[str, object] | None = None,
    config_bytes: bytes | None = None,
    weights_bytes: bytes | None = None,
    drop: str | None = None,
    value: float | None = None,
) -> Path:
    """A PEFT folder with one thing wrong.

    ``config``: keys overriding adapter_config.json (``{"lora_alpha": float("nan")}`` is written as
    JSON's ``NaN``); ``config_bytes``: the whole adapter_config.json; ``weights_bytes``: the whole
    adapter_model.safetensors; ``drop``: tensors whose names contain it are left out;
    ``value``: written into the first ``lora_B``.
    """
    from safetensors.numpy import save_file

    out = write_peft_adapter(out_dir, cfg, lora)
    if config is not None:
        merged = {**json.loads((out / "adapter_config.json").read_text()), **config}
        (out / "adapter_config.json").write_text(json.dumps(merged))
    if config_bytes is not None:
        (out / "adapter_config.json").write_bytes(config_bytes)
    tensors: dict[str, np.ndarray] = {}
    for mod in lora.a:
        tensors[f"base_model.model.{mod}.lora_A.weight"] = np.ascontiguousarray(lora.a[mod])
        tensors[f"base_model.model.{mod}.lora_B.weight"] = np.array(lora.b[mod])
    if value is not None:
        next(a for n, a in tensors.items() if "lora_B" in n).flat[0] = value
    if drop is not None:
        tensors = {n: a for n, a in tensors.items() if drop not in n}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    if weights_bytes is not None:
        (out / "adapter_model.safetensors").write_bytes(weights_bytes)
    return out
