"""TransformersSlot: one generation state on a loaded transformers model — a KV cache of its own.

What a slot keeps between calls (mirroring the llama.cpp slot):

* ``cache``: one ``DynamicCache`` and ``kv``, the token ids whose keys/values it holds, in
  order. A new prompt is compared with ``kv``; the cache is cropped to the longest common
  prefix and only the tokens after it are run. ``kv`` grows only after a forward pass
  succeeds, and a pass that fails half-way is cropped back, so closing a stream (Ctrl-C)
  leaves both describing the same tokens;
* ``soft``: the active soft prompt; its virtual tokens are the negative ids at the start of
  every prompt (:func:`chat.generation.virtual_ids`), run as ``inputs_embeds`` rows (unscaled,
  before the token embeddings) with the cache, as PEFT's prompt tuning does — not through
  ``PeftModel.generate``, whose cache handling is broken with transformers 5.24;
* ``attached``: the identity of its parameter parts (LoRA set, control vectors, soft prompt) and
  ``kv_attached``, the set the cache was computed under; when they differ the cache is
  stale and is dropped. Before each forward pass the slot makes its set the model's active one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chat.backend import Message
from chat.errors import ModelError
from chat.generation import LocalSlot, SlotStats, StreamStats, count_virtual, virtual_ids
from chat.samplerplan import check_logit_bias
from chat.template import ChatTemplate

from .model import TransformersModel
from .textstream import Detokenizer

if TYPE_CHECKING:
    from chat.persona import Persona
    from chat.sampling import SamplerSettings

MAX_BATCH = 512  # prompt tokens per forward pass
NO_PARTS: tuple = ((), (), ())  # no adapters, no vectors, no soft prompt


class TransformersSlot(LocalSlot):
    """A KV cache on ``model`` with its own parameter parts and sampler."""

    def __init__(self, model: TransformersModel, stages: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.where = str(model.path)
        self.stages = stages
        self.context_size = model.context_size
        self.stats = SlotStats()
        self.cache: Any = None
        self.kv: list[int] = []
        self.sampler: Any = None
        self.sampler_stages: list[str] = []
        self.logits: Any = None
        self.history: list[int] = []
        self.attached: tuple = NO_PARTS
        self.kv_attached: tuple = NO_PARTS
        self.adapters: list = []
        self.vectors: list = []
        self.soft: Any = None  # chat.parts.softprompt.ActiveSoftPrompt, when the persona has one
        self.soft_rows: Any = None  # its values as a tensor on the model's device and dtype
        self.persona_name = ""
        self.use_template(model.templates.base)

    def use_template(self, template: ChatTemplate) -> None:
        """Render prompts with ``template``; its end-of-turn markers that are single tokens end answers as tokens."""
        self.template = template
        self.stop_ids = self.model.stop_ids(template)

    # --- persona parameter parts ------------------------------------------------------

    def apply(self, persona: "Persona") -> list[str]:
        """Attach the persona's LoRA adapters and control vectors as this slot's set; return warnings.

        Everything is loaded and checked first; on an error the previous set stays this slot's.
        """
        self.check_open()
        with self.model.lock:  # loading an adapter changes the shared model
            return self._apply(persona)

    def _apply(self, persona: "Persona") -> list[str]:
        import torch

        model = self.model
        loras, steering = model.parts()
        warnings: list[str] = []
        soft = model.soft_prompts().combine(persona.soft_prompts, self.context_size, persona.label)
        scales: dict[Path, float] = {}
        for part in persona.adapters:
            path = Path(part.path)
            if path.suffix.lower() == ".gguf" or path.is_file():
                # one card, either format: convert the llama.cpp adapter to PEFT once (cached by content hash)
                from chat.convert.cache import ensure_format

                path, converted_now = ensure_format(path, "peft", base=model.path)
                if converted_now:
                    warnings.append(
                        f"{persona.label}: converted GGUF adapter {part.name} to PEFT once (cached in {path.parent})"
                    )
            scales[path.resolve()] = scales.get(path.resolve(), 0.0) + part.scale
        loaded_before = loras.loads
        try:
            adapters = [(loras.load(p), s) for p, s in scales.items()]
            vectors = [
                (steering.load(Path(s.path)), s.scale, tuple(s.layers) if s.layers else None) for s in persona.steering
            ]
        finally:
            self.stats.adapter_loads += loras.loads - loaded_before
            model.active_key = ()  # loading may touch peft's active adapters: switch again before the next pass
        self.adapters = [(a, s) for a, s in adapters if s != 0.0]
        self.vectors = [(v, s, r) for v, s, r in vectors if s != 0.0]
        self.attached = (
            tuple(sorted((str(a.path), round(s, 6)) for a, s in self.adapters)),
            tuple(sorted((str(v.path), round(s, 6), r or (0, 0)) for v, s, r in self.vectors)),
            soft.key,
        )
        warnings += model.activate(self.attached[:2], self.adapters, vectors)
        self.soft = soft if soft.n else None
        self.soft_rows = torch.from_numpy(soft.values).to(device=model.device, dtype=model.dtype) if soft.n else None
        self.soft_ids = virtual_ids(soft.n)
        self.use_template(model.templates.for_card(persona.template, persona.name))
        self.persona_name = persona.label
        return warnings

    def _activate(self) -> None:
        self.model.activate(self.attached[:2], self.adapters, self.vectors)

    def active_parts(self) -> list[str]:
        """One line per active part: adapters with user and effective scale, vectors with their layers."""
        lines = []
        for a, s in self.adapters:
            lines.append(f"adapter {a.label}  scale {s:g}  effective {s * a.scaling:g} (α {a.alpha:g} / r {a.rank})")
        n_layers = self.model.n_layers
        for v, s, r in self.vectors:
            lo, hi = r if r else (1, n_layers - 1)
            used = [il for il in sorted(v.directions) if lo <= il <= hi and 0 < il < n_layers]
            span = f"layers {used[0]}-{used[-1]}" if used else "no layer in range"
            lines.append(f"vector {v.path.stem}  scale {s:g}  {span}")
        return lines + (self.soft.lines() if self.soft is not None else [])

    # --- primitives the core loop drives ------------------------------------------------

    def prompt_tokens(self, messages: Sequence[Message]) -> list[int]:
        return self.model.prompt_tokens(self.template, messages)

    def text_tokens(self, text: str) -> list[int]:
        return list(self.model.tokenizer(text, add_special_tokens=True)["input_ids"])

    def use_sampling(self, sampling: "SamplerSettings") -> None:
        from .sampling import make_sampler

        check_logit_bias(sampling, self.model.n_vocab)
        self.sampler = make_sampler(sampling, self.stages, context=self.model.stage_context)
        self.sampler_stages = list(getattr(self.sampler, "stages", []))
        self.stats.sampler_builds += 1

    def prefill(self, prompt: list[int], last: StreamStats) -> int:
        if self.kv_attached != self.attached:
            self._drop_cache()
            self.kv_attached = self.attached
            last.kv_cleared = True
        kv = self.kv
        n = min(len(kv), len(prompt) - 1)  # at least one prompt token is evaluated, for its logits
        common = 0
        while common < n and kv[common] == prompt[common]:
            common += 1
        if common < len(kv) and not self._crop(common):
            self._drop_cache()  # a cache that cannot drop a tail (sliding window, linear attention): start over
            common = 0
            last.kv_cleared = True
        self._eval(prompt[common:])
        return common

    def start_sampling(self, prompt: list[int]) -> None:
        self.history = list(prompt)

    def sample(self) -> int:
        tok = self.sampler.sample(self.logits, self.history)
        self.sampler.accept(tok)
        self.history.append(tok)
        return tok

    def advance(self, token: int) -> None:
        self._eval([token])

    def is_end(self, token: int) -> bool:
        return token in self.stop_ids

    @property
    def end_ids(self) -> frozenset[int]:
        return self.stop_ids

    def decoder(self, prompt: list[int]) -> Detokenizer:
        return Detokenizer(self.model.tokenizer, prompt)

    # --- beam search: the beams are the cache's batch rows ----------------------------------

    def beam_logprobs(self, rows: int) -> np.ndarray:
        import torch

        logits = self.logits if self.logits.dim() == 2 else self.logits[None, :]
        with torch.inference_mode():
            out = torch.log_softmax(logits[:rows].to(dtype=torch.float32, device="cpu"), dim=-1)
        return out.numpy()

    def beam_step(self, parents: list[int], tokens: list[int]) -> None:
        import torch

        with self.model.lock, torch.inference_mode():
            self._activate()
            self.cache.reorder_cache(torch.tensor(parents, dtype=torch.long, device=self.model.device))
            ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.model.device)
            out = self.model.hf(input_ids=ids, **{self.model.cache_kw: self.cache}, use_cache=True)
        self.cache = _cache_of(out)
        self.logits = out.logits[:, -1]
        self.stats.forward_passes += 1

    def beam_end(self) -> None:
        import torch

        cache = self.cache
        if cache is None or self.logits is None or self.logits.dim() == 1:
            return
        try:
            with torch.inference_mode():
                cache.reorder_cache(torch.tensor([0], dtype=torch.long, device=self.model.device))
            n = len(self.kv)
            if cache.get_seq_length() > n and not self._crop_layers(n):
                self._drop_cache()
        except Exception:
            self._drop_cache()
        self.logits = None

    # --- the cache ----------------------------------------------------------------------

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.hf.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def _crop(self, n: int) -> bool:
        """Keep the first ``n`` cached tokens; False when this cache cannot be cropped exactly."""
        if n == 0:
            self._drop_cache()
            return True
        if not self._crop_layers(n):
            return False
        del self.kv[n:]
        return True

    def _crop_layers(self, n: int) -> bool:
        import torch
        from transformers.cache_utils import DynamicLayer

        cache = self.cache
        layers = getattr(cache, "layers", None)
        if cache is None or layers is None or any(type(layer) is not DynamicLayer for layer in layers):
            return False
        with torch.inference_mode():
            have = cache.get_seq_length()
            if have > n:
                cache.crop(-(have - n))  # negative = tokens to remove (a positive value is refused)
        return cache.get_seq_length() == n

    def _drop_cache(self) -> None:
        self.cache = None
        self.kv.clear()

    def _eval(self, tokens: Sequence[int]) -> None:
        """Run ``tokens`` after ``kv`` in batches; keep the last position's logits. ``kv`` grows only on success."""
        import torch

        if self.cache is None:
            self.cache = self._new_cache()
        model = self.model
        for start in range(0, len(tokens), MAX_BATCH):
            chunk = list(tokens[start : start + MAX_BATCH])
            base = len(self.kv)
            kwargs: dict[str, Any] = {model.cache_kw: self.cache, "use_cache": True}
            if model.logits_to_keep:
                kwargs["logits_to_keep"] = 1
            try:
                with model.lock, torch.inference_mode():
                    self._activate()
                    n_virtual = count_virtual(chunk)
                    if n_virtual:
                        out = model.hf(inputs_embeds=self._embeds(chunk, n_virtual), **kwargs)
                    else:
                        ids = torch.tensor([chunk], dtype=torch.long, device=model.device)
                        out = model.hf(input_ids=ids, **kwargs)
            except BaseException as exc:
                self._restore(base)
                if isinstance(exc, (KeyboardInterrupt, GeneratorExit)):
                    raise
                if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
                    raise ModelError(
                        f"{self.where}: out of memory running {len(chunk)} tokens",
                        "try a smaller --ctx or --dtype bfloat16",
                    ) from None
                raise
            self.cache = _cache_of(out)
            self.kv.extend(chunk)
            self.stats.forward_passes += 1
            self.logits = out.logits[0, -1]

    def _embeds(self, chunk: list[int], n_virtual: int) -> Any:
        """Input embeddings of ``chunk``: soft prompt rows for its virtual ids, then the tokens' own embeddings."""
        import torch

        if self.soft_rows is None:  # a bookkeeping error, never a user's: the ids name rows of no soft prompt
            raise ModelError(f"{self.where}: virtual tokens without an active soft prompt", None)
        model = self.model
        rows = self.soft_rows[[-t - 1 for t in chunk[:n_virtual]]]
        parts = [rows[None]]
        if n_virtual < len(chunk):
            ids = torch.tensor([chunk[n_virtual:]], dtype=torch.long, device=model.device)
            parts.append(model.hf.get_input_embeddings()(ids))
        return torch.cat(parts, dim=1)

    def _restore(self, n: int) -> None:
        """After a failed or interrupted forward pass, bring every cache layer back to ``n`` tokens."""
        import torch

        cache = self.cache
        try:
            with torch.inference_mode():
                for layer in getattr(cache, "layers", []):
                    have = layer.get_seq_length()
                    if have > n:
                        layer.crop(-(have - n))
            if cache is not None and cache.get_seq_length() == n:
                del self.kv[n:]
                return
        except Exception:
            pass
        self._drop_cache()

    # --- facts and lifetime ------------------------------------------------------------

    def info(self) -> dict[str, object]:
        return {
            "n_ctx": self.context_size,
            "context_used": len(self.kv),
            "template": self.template.description,
            "sampler": list(self.sampler_stages),
            "adapters": [f"{a.label} ×{s:g}" for a, s in self.adapters],
            "steering": [f"{v.path.stem} ×{s:g}" + (f" layers {r[0]}-{r[1]}" if r else "") for v, s, r in self.vectors],
            "soft_prompt": self.soft.lines() if self.soft is not None else [],
        }

    def close(self) -> None:
        self.closed = True
        self.cache = None
        self.logits = None


def _cache_of(out: Any) -> Any:
    """The cache a forward pass returns (``cache`` since transformers 5.2x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
