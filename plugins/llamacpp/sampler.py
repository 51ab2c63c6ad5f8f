"""SamplerSettings → llama.cpp's native sampler chain.

The chain follows llama.cpp's own ``common_sampler_init``: logit bias first,
then the stages of ``settings.order`` that change anything (``stage_is_active``),
then the stage that picks a token — ``dist(seed)``, or ``greedy`` at temperature 0
so that temperature 0 is the pure argmax. Mirostat 1/2 replaces the ordered stages
with temperature followed by mirostat, as llama.cpp does.

Stages that are not built in (plugin stages) go through ``plugin_stage``, a
callable the backend supplies; it returns a ``llama_sampler`` pointer to add.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from chat.errors import SamplingError
from chat.sampling import BUILTIN_STAGES, SamplerSettings, plugin_stages, stage_is_active

# Fields that do not change the chain (they act outside it), so they are left out of its cache key.
NON_CHAIN_FIELDS = {"stop", "max_tokens"}

PluginStageFactory = Callable[[str, Any, dict[str, Any]], Any]


def chain_key(settings: SamplerSettings) -> str:
    """Equal keys build equal chains."""
    return settings.model_dump_json(exclude=NON_CHAIN_FIELDS)


class NativeSampler:
    """An owned llama.cpp sampler chain and what it is made of."""

    def __init__(self, ptr: Any, stages: list[str], seed: int, needs_history: bool, keep: list[Any]) -> None:
        self.ptr = ptr
        self.stages = tuple(stages)  # llama.cpp's names for the stages, in chain order
        self.seed = seed
        self.needs_history = needs_history  # penalties/DRY: feed the prompt tokens after reset
        self._keep = keep  # Python objects the chain calls back into (plugin stages)

    def sample(self, ctx: Any, idx: int = -1) -> int:
        """Pick a token from the logits of output ``idx``; llama.cpp also accepts it into the chain."""
        import llama_cpp

        return int(llama_cpp.llama_sampler_sample(self.ptr, ctx, idx))

    def accept(self, token: int) -> None:
        import llama_cpp

        llama_cpp.llama_sampler_accept(self.ptr, token)

    def apply(self, candidates: Any) -> None:
        """Run the chain over a ``llama_token_data_array`` (byref) without picking; for tests and tools."""
        import llama_cpp

        llama_cpp.llama_sampler_apply(self.ptr, candidates)

    def reset(self) -> None:
        """Forget history, re-seed the RNG from the seed (a random one when no seed was given)."""
        import llama_cpp

        llama_cpp.llama_sampler_reset(self.ptr)

    def native_names(self) -> list[str]:
        """The stage names llama.cpp itself reports, in chain order."""
        import llama_cpp

        n = llama_cpp.llama_sampler_chain_n(self.ptr)
        return [llama_cpp.llama_sampler_name(llama_cpp.llama_sampler_chain_get(self.ptr, i)).decode() for i in range(n)]

    def close(self) -> None:
        if self.ptr is not None:
            import llama_cpp

            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None
            self._keep.clear()


def build_chain(
    settings: SamplerSettings,
    *,
    vocab: Any,
    n_vocab: int,
    n_ctx: int,
    plugin_stage: PluginStageFactory,
    final: bool = True,
) -> NativeSampler:
    """Build the chain for ``settings``. ``final=False`` leaves out the picking stage (for inspection)."""
    import llama_cpp as L

    s = settings
    seed = L.LLAMA_DEFAULT_SEED if s.seed is None else int(s.seed)
    params = L.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = L.llama_sampler_chain_init(params)
    stages: list[str] = []
    keep: list[Any] = []
    needs_history = False

    def add(name: str, ptr: Any) -> None:
        if not ptr:
            raise SamplingError(f"llama.cpp refused the {name} sampler with these settings", "check the values with `chat samplers`")
        L.llama_sampler_chain_add(chain, ptr)
        stages.append(name)

    try:
        if s.logit_bias:
            bad = [t for t in s.logit_bias if not 0 <= t < n_vocab]
            if bad:
                raise SamplingError(f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})", "use ids from this model's tokenizer")
            arr = (L.llama_logit_bias * len(s.logit_bias))()
            for i, (tok, bias) in enumerate(s.logit_bias.items()):
                arr[i].token = tok
                arr[i].bias = bias
            add("logit-bias", L.llama_sampler_init_logit_bias(n_vocab, len(s.logit_bias), arr))

        if s.mirostat:
            add("temp", L.llama_sampler_init_temp(s.temperature))
            if final:
                if s.mirostat == 1:
                    add("mirostat", L.llama_sampler_init_mirostat(n_vocab, seed, s.mirostat_tau, s.mirostat_eta, 100))
                else:
                    add("mirostat-v2", L.llama_sampler_init_mirostat_v2(seed, s.mirostat_tau, s.mirostat_eta))
            return NativeSampler(chain, stages, seed, needs_history, keep)

        known_plugins = plugin_stages()
        for stage in s.order:
            if stage not in BUILTIN_STAGES:
                ptr = plugin_stage(stage, known_plugins.get(stage), dict(s.stage_params.get(stage, {})))
                keep.append(ptr)
                add(stage, ptr)
                continue
            if not stage_is_active(s, stage):
                continue
            match stage:
                case "penalties":
                    last_n = n_ctx if s.penalty_last_n == -1 else s.penalty_last_n
                    add("penalties", L.llama_sampler_init_penalties(n_vocab, last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))
                    needs_history = True
                case "dry":
                    breakers = [b.encode("utf-8") for b in s.dry_sequence_breakers]
                    arr = (ctypes.c_char_p * max(1, len(breakers)))(*breakers)
                    last_n = n_ctx if s.dry_penalty_last_n == -1 else s.dry_penalty_last_n
                    add("dry", L.llama_sampler_init_dry(vocab, s.dry_multiplier, s.dry_base, s.dry_allowed_length, last_n, arr, len(breakers)))
                    needs_history = True
                case "top_n_sigma":
                    add("top-n-sigma", L.llama_sampler_init_top_n_sigma(s.top_n_sigma))
                case "top_k":
                    add("top-k", L.llama_sampler_init_top_k(s.top_k))
                case "typical_p":
                    add("typical", L.llama_sampler_init_typical(s.typical_p, 1))
                case "top_p":
                    add("top-p", L.llama_sampler_init_top_p(s.top_p, 1))
                case "min_p":
                    add("min-p", L.llama_sampler_init_min_p(s.min_p, 1))
                case "xtc":
                    add("xtc", L.llama_sampler_init_xtc(s.xtc_probability, s.xtc_threshold, 1, seed))
                case "temperature":
                    if s.temperature == 0.0:
                        continue  # greedy below is the argmax; a temp stage would add nothing
                    if s.dynatemp_range > 0.0:
                        add("temp-ext", L.llama_sampler_init_temp_ext(s.temperature, s.dynatemp_range, s.dynatemp_exponent))
                    else:
                        add("temp", L.llama_sampler_init_temp(s.temperature))
        if final:
            if s.temperature == 0.0:
                add("greedy", L.llama_sampler_init_greedy())
            else:
                add("dist", L.llama_sampler_init_dist(seed))
        return NativeSampler(chain, stages, seed, needs_history, keep)
    except BaseException:
        L.llama_sampler_free(chain)  # plugin stages are Python-owned: remove them first once there are any
        raise
