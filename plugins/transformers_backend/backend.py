"""TransformersBackend: a Hugging Face model folder loaded once, streamed with a manual decode loop.

What it keeps between calls (mirroring the llama.cpp backend):

* the model (safetensors only, ``trust_remote_code=False``) and its tokenizer;
* ``_cache``: one ``DynamicCache`` and ``_kv``, the token ids whose keys/values it
  holds, in order. A new prompt is compared with ``_kv``; the cache is cropped to the
  longest common prefix and only the tokens after it are run. ``_kv`` grows only
  after a forward pass succeeds, and a pass that fails half-way is cropped back, so
  closing a stream (Ctrl-C) leaves both describing the same tokens;
* ``_attached``: the identity of the parameter parts active on the model (LoRA set,
  control vectors) and ``_kv_attached``, the set the cache was computed under. When
  they differ the cache is stale and is dropped.

torch, transformers and peft are imported inside methods only: ``chat --help``
imports this module.
"""

from __future__ import annotations

import inspect
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from chat.backend import BackendOptions, Finish, FinishReason, Message, Timings, Usage
from chat.errors import ContextOverflowError, ModelError, SamplingError

from .checkpoint import cached_snapshot, check_weights, is_model_folder, looks_like_id, resolve_model
from chat.stops import StopHolder

from .textstream import Detokenizer

from chat.template import ChatTemplate, TemplateSelector

if TYPE_CHECKING:
    import torch

    from chat.persona import Persona
    from chat.sampling import SamplerSettings

MAX_DEFAULT_CTX = 8192
MAX_BATCH = 512  # prompt tokens per forward pass
NO_PARTS: tuple = ((), ())  # Persona.parameter_key of a persona without adapters or steering
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class StreamStats:
    """What one stream() call did (the same fields as the llama.cpp backend's)."""

    prompt_tokens: int = 0
    prompt_tokens_evaluated: int = 0  # prompt tokens run through the model
    prompt_tokens_reused: int = 0  # prompt tokens whose KV was already in the cache
    completion_tokens: int = 0
    completion_ids: tuple[int, ...] = ()
    finish: str = ""  # the Finish reason, or "closed" when the consumer closed the stream
    kv_cleared: bool = False  # the cache was dropped (parameter parts changed, or it could not be cropped)


@dataclass
class BackendStats:
    """Cumulative counters over the backend's life, plus the last call."""

    streams: int = 0
    prompt_tokens_evaluated: int = 0
    prompt_tokens_reused: int = 0
    completion_tokens: int = 0
    forward_passes: int = 0
    adapter_loads: int = 0
    last: StreamStats = field(default_factory=StreamStats)


def pick_device(wanted: str) -> str:
    import torch

    if wanted and wanted != "auto":
        if wanted.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"--device {wanted}: torch sees no CUDA device", "use --device cpu (or auto), or install a CUDA build of torch")
        if wanted == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelError("--device mps: not available here", "use --device cpu (or auto)")
        return wanted
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def pick_dtype(wanted: str, device: str, config: Any) -> "torch.dtype":
    """``auto``: float32 on the CPU; on an accelerator the checkpoint's half dtype, else bfloat16 (float16 where unsupported)."""
    import torch

    if wanted not in DTYPES:
        raise ModelError(f"--dtype {wanted}: unknown", f"use one of {', '.join(DTYPES)}")
    if wanted != "auto":
        return getattr(torch, wanted)
    if device == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if stored in (torch.bfloat16, torch.float16):
        return stored
    if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class TransformersBackend:
    """A Hugging Face causal LM through transformers (CPU, CUDA or MPS)."""

    name: ClassVar[str] = "transformers"
    install_hint: ClassVar[str] = 'install it: pip install "chat[transformers]" (torch==2.13.0 first, for the CPU build)'  # shown when the library it drives is missing

    @classmethod
    def can_load(cls, model: str) -> bool:
        """A folder with config.json, or a model id already in the local Hugging Face cache (looked up offline)."""
        model = str(model)
        if model.lower().endswith(".gguf"):
            return False
        path = Path(model).expanduser()
        if path.exists():
            return is_model_folder(path)
        return looks_like_id(model) and cached_snapshot(model) is not None

    def __init__(self, model: str, options: BackendOptions | None = None) -> None:
        self._closed = False
        self._hf: Any = None
        self._cache: Any = None
        self.options = options or BackendOptions()
        started = time.perf_counter()
        self.path = resolve_model(str(model))
        self.weights = check_weights(self.path)  # before torch ever opens a file
        self.model_name = str(model) if not Path(str(model)).expanduser().exists() else self.path.name
        self._load()
        self.load_s = time.perf_counter() - started
        self.stats = BackendStats()
        self._kv: list[int] = []
        self._generation = 0
        self._prompt_cache: OrderedDict[tuple, list[int]] = OrderedDict()
        self._attached: tuple = NO_PARTS
        self._kv_attached: tuple = NO_PARTS
        self._loras: Any = None
        self._steering: Any = None
        self._sampler_stages: list[str] = []
        self._sampler_unsupported: list[str] = []
        self.persona_name = ""

    # --- loading ---------------------------------------------------------------------

    def _load(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        where = str(self.path)
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        try:
            config = AutoConfig.from_pretrained(where, trust_remote_code=False, local_files_only=True)
        except Exception as exc:
            raise ModelError(f"{where}: config.json cannot be used: {_first_line(exc)}", _remote_code_hint(exc)) from None
        self.device = pick_device(self.options.device)
        self.dtype = pick_dtype(self.options.dtype, self.device, config)
        try:
            tok = AutoTokenizer.from_pretrained(where, trust_remote_code=False, local_files_only=True)
        except Exception as exc:
            raise ModelError(f"{where}: no usable tokenizer: {_first_line(exc)}", "the folder needs tokenizer.json (or the tokenizer files of its model)") from None
        source = getattr(tok, "chat_template", None)
        if isinstance(source, dict):
            source = source.get("default") or next(iter(source.values()), None)
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        verbosity = hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()  # the terminal belongs to the chat, not to a "Loading weights" bar
        hf_logging.set_verbosity_error()  # nor to a "LOAD REPORT" table written with ANSI codes even into a pipe
        try:
            hf = AutoModelForCausalLM.from_pretrained(
                where,
                config=config,
                dtype=self.dtype,
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
            )
        except Exception as exc:
            raise ModelError(f"{where}: transformers could not load the model: {_first_line(exc)}", _remote_code_hint(exc)) from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar:
                hf_logging.enable_progress_bar()
        hf.to(self.device)
        hf.eval()
        self._hf = hf
        self.tokenizer = tok
        self.config = config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.hidden_size = int(getattr(text_config, "hidden_size"))
        self.n_layers = int(getattr(text_config, "num_hidden_layers", 0) or 0)
        self.n_vocab = int(hf.get_output_embeddings().weight.shape[0]) if hf.get_output_embeddings() is not None else len(tok)
        self.n_ctx_train = int(getattr(text_config, "max_position_embeddings", 0) or 0)
        self.context_size = self.options.context_size or min(self.n_ctx_train or MAX_DEFAULT_CTX, MAX_DEFAULT_CTX)
        self.n_params = sum(p.numel() for p in hf.parameters())
        self.eos_ids = self._eos_ids(hf, tok)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(hf.forward).parameters
        self._templates = TemplateSelector(
            source or None,
            override=self.options.template,
            override_from=self.options.template_origin,
            has_token=lambda text: len(tok(text, add_special_tokens=False)["input_ids"]) == 1,
            architecture=str(getattr(text_config, "model_type", "") or getattr(config, "model_type", "")),
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token or "",
            model=where,
        )
        self._use_template(self._templates.base)
        from .sampling import tokenizer_context  # torch-heavy: imported once the model loads

        self._stage_context = tokenizer_context(tok, self.n_vocab)  # vocabulary for plugin stages and DRY

    def _use_template(self, template: ChatTemplate) -> None:
        """Render prompts with ``template``; its end-of-turn markers that are single tokens end answers as tokens."""
        self.template = template
        ids = (self.tokenizer(m, add_special_tokens=False)["input_ids"] for m in template.stops)
        self._stop_ids = self.eos_ids | {i[0] for i in ids if len(i) == 1}

    @staticmethod
    def _eos_ids(hf: Any, tok: Any) -> frozenset[int]:
        ids: set[int] = set()
        for value in (getattr(hf.config, "eos_token_id", None), getattr(getattr(hf, "generation_config", None), "eos_token_id", None), tok.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value if v is not None)
        return frozenset(ids)

    # --- tokens ----------------------------------------------------------------------

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text for ``messages``, ending with the assistant's generation prompt."""
        return self.template.render(messages, add_generation_prompt=True)

    def prompt_tokens(self, messages: Sequence[Message]) -> list[int]:
        """The rendered prompt as token ids. As ``apply_chat_template`` does, no special tokens are added: the template writes them."""
        key = (self.template, *messages)
        cached = self._prompt_cache.get(key)
        if cached is not None:
            self._prompt_cache.move_to_end(key)
            return list(cached)
        tokens = list(self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"])
        self._prompt_cache[key] = tokens
        while len(self._prompt_cache) > 16:
            self._prompt_cache.popitem(last=False)
        return list(tokens)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        self._check_open()
        return len(self.prompt_tokens(messages))

    # --- persona parameter parts ------------------------------------------------------

    def apply(self, persona: "Persona") -> list[str]:
        """Attach the persona's LoRA adapters and control vectors as the whole active set; return warnings.

        Everything is loaded and checked first; on an error the previous set stays active.
        """
        self._check_open()
        from .parts import LoraSet, Steering

        warnings: list[str] = []
        if self._loras is None:
            self._loras = LoraSet(self._hf)
        if self._steering is None:
            self._steering = Steering(self._hf, self.hidden_size)
        scales: dict[Path, float] = {}
        for part in persona.adapters:
            path = Path(part.path)
            if path.suffix.lower() == ".gguf" or path.is_file():
                # one card, either format: convert the llama.cpp adapter to PEFT once (cached by content hash)
                from chat.convert.cache import ensure_format

                path, converted_now = ensure_format(path, "peft", base=self.path)
                if converted_now:
                    warnings.append(f"{persona.label}: converted GGUF adapter {part.name} to PEFT once (cached in {path.parent})")
            scales[path.resolve()] = scales.get(path.resolve(), 0.0) + part.scale
        loaded_before = self._loras.loads
        previous = list(self._loras.active)
        try:
            adapters = [(self._loras.load(p), s) for p, s in scales.items()]
            vectors = [(self._steering.load(Path(s.path)), s.scale, tuple(s.layers) if s.layers else None) for s in persona.steering]
        except BaseException:
            # loading may touch peft's active adapters: make the previous set exactly the active one again
            self._loras.activate(previous)
            raise
        finally:
            self.stats.adapter_loads += self._loras.loads - loaded_before
        self._loras.activate(adapters)
        warnings += self._steering.activate(vectors)
        self._use_template(self._templates.for_card(persona.template, persona.name))
        self.persona_name = persona.label
        self._attached = (
            tuple(sorted((str(a.path), round(s, 6)) for a, s in self._loras.active)),
            tuple(sorted((str(v.path), round(s, 6), r or (0, 0)) for v, s, r in self._steering.active)),
        )
        return warnings

    def active_parts(self) -> list[str]:
        """One line per active part: adapters with user and effective scale, vectors with their layers."""
        lines = []
        for a, s in self._loras.active if self._loras else []:
            lines.append(f"adapter {a.label}  scale {s:g}  effective {s * a.scaling:g} (α {a.alpha:g} / r {a.rank})")
        for v, s, r in self._steering.active if self._steering else []:
            layers = sorted(v.directions)
            lo, hi = r if r else (1, self.n_layers - 1)
            used = [il for il in layers if lo <= il <= hi and 0 < il < self.n_layers]
            span = f"layers {used[0]}-{used[-1]}" if used else "no layer in range"
            lines.append(f"vector {v.path.stem}  scale {s:g}  {span}")
        return lines

    # --- generation ------------------------------------------------------------------

    def stream(self, messages: Sequence[Message], sampling: "SamplerSettings") -> Iterator[str | Finish]:
        """Yield text chunks, then one Finish. Tokenizing, the overflow check and the sampler happen now."""
        self._check_open()
        started = time.perf_counter()
        prompt = self.prompt_tokens(messages)
        if len(prompt) >= self.context_size:
            raise ContextOverflowError(
                f"the prompt needs {len(prompt)} tokens but the context holds {self.context_size}",
                "start a new conversation, shorten the message, or load the model with a larger --ctx",
            )
        bad = [t for t in sampling.logit_bias if not 0 <= t < self.n_vocab]
        if bad:
            raise SamplingError(f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})", "use ids from this model's tokenizer")
        from .sampling import make_sampler

        sampler = make_sampler(sampling, context=self._stage_context)
        self._sampler_stages = list(getattr(sampler, "stages", []))
        self._sampler_unsupported = list(getattr(sampler, "unsupported", []))
        self._generation += 1
        return self._generate(prompt, sampler, sampling, started, self._generation)

    def _generate(
        self, prompt: list[int], sampler: Any, sampling: "SamplerSettings", started: float, generation: int
    ) -> Iterator[str | Finish]:
        if generation != self._generation:  # a newer stream() began before this one was first iterated
            yield Finish("interrupted", Usage(prompt_tokens=len(prompt)))
            return
        last = StreamStats(prompt_tokens=len(prompt), finish="closed")
        self.stats.last = last
        self.stats.streams += 1
        logits, reused = self._sync_cache(prompt, last)
        prompt_done = time.perf_counter()
        history = list(prompt)
        detok = Detokenizer(self.tokenizer, prompt)
        text = StopHolder((*sampling.stop, *self.template.stops))
        stop_ids = self._stop_ids
        out: list[int] = []
        reason: FinishReason = "stop"
        first_chunk = first_token = last_token = 0.0
        try:
            while True:
                if generation != self._generation or self._closed:
                    reason = "interrupted"
                    break
                tok = sampler.sample(logits, history)
                sampler.accept(tok)
                if tok in stop_ids:
                    break
                out.append(tok)
                history.append(tok)
                last.completion_tokens = len(out)
                last_token = time.perf_counter()
                first_token = first_token or last_token
                chunk = text.feed(detok.feed(tok))
                if chunk:
                    first_chunk = first_chunk or time.perf_counter()
                    yield chunk
                if text.stopped:
                    break
                if sampling.max_tokens is not None and len(out) >= sampling.max_tokens:
                    reason = "length"
                    break
                if len(self._kv) >= self.context_size:
                    reason = "length"
                    break
                logits = self._eval([tok])
            tail = text.feed(detok.finish()) + text.finish()
            if tail:
                first_chunk = first_chunk or time.perf_counter()
                yield tail
        finally:
            last.completion_ids = tuple(out)
            self.stats.completion_tokens += len(out)
        last.finish = reason
        decode_s = last_token - first_token
        timings = Timings(
            ttft_s=(first_chunk - started) if first_chunk else 0.0,
            tokens_per_s=(len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0,
            prompt_s=prompt_done - started,
        )
        yield Finish(reason, Usage(len(prompt), len(out), reused), timings)

    def _sync_cache(self, prompt: list[int], last: StreamStats) -> tuple["torch.Tensor", int]:
        """Make the cache hold ``prompt``; return the logits after its last token and the tokens reused."""
        if self._kv_attached != self._attached:
            self._drop_cache()
            self._kv_attached = self._attached
            last.kv_cleared = True
        kv = self._kv
        n = min(len(kv), len(prompt) - 1)  # at least one prompt token is evaluated, for its logits
        common = 0
        while common < n and kv[common] == prompt[common]:
            common += 1
        if common < len(kv) and not self._crop(common):
            self._drop_cache()  # a cache that cannot drop a tail (sliding window, linear attention): start over
            common = 0
            last.kv_cleared = True
        logits = self._eval(prompt[common:])
        last.prompt_tokens_reused = common
        last.prompt_tokens_evaluated = len(prompt) - common
        self.stats.prompt_tokens_reused += common
        self.stats.prompt_tokens_evaluated += len(prompt) - common
        return logits, common

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self._hf.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def _crop(self, n: int) -> bool:
        """Keep the first ``n`` cached tokens; False when this cache cannot be cropped exactly."""
        if n == 0:
            self._drop_cache()
            return True
        import torch
        from transformers.cache_utils import DynamicLayer

        cache = self._cache
        layers = getattr(cache, "layers", None)
        if cache is None or layers is None or any(type(layer) is not DynamicLayer for layer in layers):
            return False
        with torch.inference_mode():
            cache.crop(-(len(self._kv) - n))  # negative = tokens to remove (a positive value is refused)
        del self._kv[n:]
        return cache.get_seq_length() == n

    def _drop_cache(self) -> None:
        self._cache = None
        self._kv.clear()

    def _eval(self, tokens: Sequence[int]) -> "torch.Tensor":
        """Run ``tokens`` after ``_kv`` in batches; return the last position's logits. ``_kv`` grows only on success."""
        import torch

        if self._cache is None:
            self._cache = self._new_cache()
        logits = None
        for start in range(0, len(tokens), MAX_BATCH):
            chunk = list(tokens[start : start + MAX_BATCH])
            base = len(self._kv)
            kwargs: dict[str, Any] = {"past_key_values": self._cache, "use_cache": True}
            if self._logits_to_keep:
                kwargs["logits_to_keep"] = 1
            try:
                with torch.inference_mode():
                    ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
                    out = self._hf(input_ids=ids, **kwargs)
            except BaseException as exc:
                self._restore(base)
                if isinstance(exc, (KeyboardInterrupt, GeneratorExit)):
                    raise
                if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
                    raise ModelError(f"{self.path}: out of memory running {len(chunk)} tokens", "try a smaller --ctx or --dtype bfloat16") from None
                raise
            self._cache = out.past_key_values
            self._kv.extend(chunk)
            self.stats.forward_passes += 1
            logits = out.logits[0, -1]
        assert logits is not None, "_eval needs at least one token"
        return logits

    def _restore(self, n: int) -> None:
        """After a failed or interrupted forward pass, bring every cache layer back to ``n`` tokens."""
        import torch

        cache = self._cache
        try:
            with torch.inference_mode():
                for layer in getattr(cache, "layers", []):
                    have = layer.get_seq_length()
                    if have > n:
                        layer.crop(-(have - n))
            if cache is not None and cache.get_seq_length() == n:
                del self._kv[n:]
                return
        except Exception:
            pass
        self._drop_cache()

    # --- facts and lifetime ------------------------------------------------------------

    @property
    def kv_tokens(self) -> list[int]:
        """A copy of the tokens whose KV is in the cache (what the next prompt is compared with)."""
        return list(self._kv)

    @property
    def last_token_ids(self) -> tuple[int, ...]:
        """The token ids the last stream generated (EOS excluded)."""
        return self.stats.last.completion_ids

    def info(self) -> dict[str, object]:
        import torch
        import transformers

        try:
            import peft

            peft_version = peft.__version__
        except ImportError:  # pragma: no cover
            peft_version = ""
        size = sum(p.stat().st_size for p in self.weights if p.exists())
        return {
            "backend": self.name,
            "model": str(self.path),
            "name": self.path.name,
            "architecture": ",".join(getattr(self.config, "architectures", None) or []) or getattr(self.config, "model_type", ""),
            "parameters": self.n_params,
            "size_bytes": size,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "n_ctx": self.context_size,
            "n_ctx_train": self.n_ctx_train,
            "context_used": len(self._kv),
            "template": self.template.description,
            "threads": torch.get_num_threads(),
            "load_s": round(self.load_s, 3),
            "sampler": list(self._sampler_stages),
            "sampler_unsupported": list(self._sampler_unsupported),
            "adapters": [f"{a.label} ×{s:g}" for a, s in (self._loras.active if self._loras else [])],
            "steering": [f"{v.path.stem} ×{s:g}" + (f" layers {r[0]}-{r[1]}" if r else "") for v, s, r in (self._steering.active if self._steering else [])],
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "peft": peft_version,
        }

    def _check_open(self) -> None:
        if self._closed:
            raise ModelError(f"{self.path}: the backend was closed", "load the model again")

    def close(self) -> None:
        """Drop the cache, hooks and model; safe to call twice."""
        self._closed = True
        self._cache = None
        steering = getattr(self, "_steering", None)
        if steering is not None:
            steering.remove_hooks()
        self._steering = None
        self._loras = None
        if self._hf is not None:
            device = getattr(self, "device", "cpu")
            self._hf = None
            if str(device).startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "TransformersBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remote_code_hint(exc: BaseException) -> str:
    text = str(exc)
    if "trust_remote_code" in text or "does not recognize this architecture" in text or "model type" in text:
        return "this model needs custom code from its repo, which chat never runs (trust_remote_code=False); use a model transformers supports natively"
    return "check that the folder is a complete Hugging Face model (config.json, *.safetensors, tokenizer files)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


__all__ = ["TransformersBackend", "BackendStats", "StreamStats"]
