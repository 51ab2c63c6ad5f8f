"""SamplerSettings → llama.cpp's native sampler chain.

The chain follows llama.cpp's own ``common_sampler_init``: logit bias first,
then the stages of ``settings.order`` that change anything (``stage_is_active``),
then the stage that picks a token — ``dist(seed)``, or ``greedy`` at temperature 0
so that temperature 0 is the pure argmax. Mirostat 1/2 replaces the ordered stages
with temperature followed by mirostat, as llama.cpp does.

Stages that are not built in (plugin stages, :mod:`chat.stages`) go through
``plugin_stage``, a callable the backend supplies; it returns a :class:`PythonStage`:
a custom ``llama_sampler`` (our own ``llama_sampler_i``) that calls the stage from
inside the chain, at its position in ``order``. With mirostat the plugin stages run
first (in their order), then temperature and mirostat. Python stages see the tokens
so far, so a chain with one feeds the prompt after each reset (``needs_history``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from chat.errors import SamplingError
from chat.sampling import BUILTIN_STAGES, SamplerSettings, plugin_stages, stage_is_active
from chat.stages import SamplerStage, StageContext, Vocabulary, run_stage

# Fields that do not change the chain (they act outside it), so they are left out of its cache key.
NON_CHAIN_FIELDS = {"stop", "max_tokens"}

PluginStageFactory = Callable[[str, Any, dict[str, Any]], Any]


def chain_key(settings: SamplerSettings) -> str:
    """Equal keys build equal chains."""
    return settings.model_dump_json(exclude=NON_CHAIN_FIELDS)


# llama_token_data as numpy sees it: {int32 id; float logit; float p}
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class PythonStage:
    """A plugin stage as a llama.cpp custom sampler (``llama_sampler_init`` with our ``llama_sampler_i``).

    llama.cpp owns the small ``llama_sampler`` struct; this object owns the interface
    table and the ctypes callbacks it points to, so it must outlive the chain's use
    of them (:class:`NativeSampler` keeps it and removes the sampler from the chain
    before freeing). A Python exception cannot cross into C: ``apply`` stores it,
    leaves the candidates unchanged, and :meth:`NativeSampler.sample` raises it.
    """

    def __init__(self, name: str, stage: SamplerStage, params: Any, vocabulary: Vocabulary) -> None:
        import llama_cpp as L

        self.name = name
        self.stage = stage
        self.params = params
        self.n_vocab = vocabulary.size
        self.context = StageContext(vocabulary, tokens=[])
        self.error: BaseException | None = None
        self._identity = np.arange(self.n_vocab, dtype=np.int32)
        self._name_buf = ctypes.create_string_buffer(name.encode("utf-8"))
        # name returns a pointer we own (a c_char_p restype would leak a reference per call)
        name_fn = ctypes.CFUNCTYPE(ctypes.c_void_p, L.llama_sampler_p_ctypes)(lambda _s: ctypes.addressof(self._name_buf))
        self._callbacks = (
            name_fn,
            L.llama_sampler_i_accept(self._accept),
            L.llama_sampler_i_apply(self._apply),
            L.llama_sampler_i_reset(self._reset),
        )
        iface = self._iface = L.llama_sampler_i()
        iface.name = ctypes.cast(name_fn, L.llama_sampler_i_name)
        iface.accept, iface.apply, iface.reset = self._callbacks[1:]
        # clone/free and the backend_* hooks stay NULL: no ctx to copy or free, CPU only.
        self.ptr = L.llama_sampler_init(ctypes.byref(iface), None)
        if not self.ptr:
            raise SamplingError(f"llama.cpp refused the custom sampler for stage {name!r}", None)

    def _accept(self, _smpl: Any, token: int) -> None:
        self.context.tokens.append(int(token))

    def _reset(self, _smpl: Any) -> None:
        del self.context.tokens[:]

    def _apply(self, _smpl: Any, cur_p: Any) -> None:
        try:
            arr = cur_p.contents
            n = int(arr.size)
            if n == 0:
                return
            view = np.frombuffer((ctypes.c_char * (n * TOKEN_DATA.itemsize)).from_address(ctypes.addressof(arr.data.contents)), dtype=TOKEN_DATA)
            ids = view["id"]
            if n == self.n_vocab and np.array_equal(ids, self._identity):
                # every token, in id order (the stage is early in the chain): no scatter/gather
                new = run_stage(self.stage, view["logit"].copy(), self.context, self.params)
            else:
                full = np.full(self.n_vocab, -np.inf, dtype=np.float32)
                full[ids] = view["logit"]
                new = run_stage(self.stage, full, self.context, self.params)[ids]
            keep = np.isfinite(new) | (new > 0)  # +inf stays a candidate
            if keep.all():
                view["logit"] = new
            else:  # compact: the removed candidates leave the array, as llama.cpp's own filters do
                kept_ids, kept_logits = ids[keep], new[keep]
                k = len(kept_ids)
                view["id"][:k] = kept_ids
                view["logit"][:k] = kept_logits
                arr.size = k
            arr.sorted = False
        except BaseException as exc:  # noqa: BLE001 - handed back to Python by NativeSampler
            self.error = exc

    def take_error(self) -> BaseException | None:
        err, self.error = self.error, None
        return err


class NativeSampler:
    """An owned llama.cpp sampler chain and what it is made of."""

    def __init__(self, ptr: Any, stages: list[str], seed: int, needs_history: bool, keep: list[Any]) -> None:
        self.ptr = ptr
        self.stages = tuple(stages)  # llama.cpp's names for the stages, in chain order
        self.seed = seed
        self.needs_history = needs_history  # penalties/DRY: feed the prompt tokens after reset
        self._keep = keep  # Python objects the chain calls back into (plugin stages)
        self._python = [k for k in keep if isinstance(k, PythonStage)]

    def _raise_stage_error(self) -> None:
        for stage in self._python:
            err = stage.take_error()
            if err is not None:
                if isinstance(err, (SamplingError, KeyboardInterrupt)):
                    raise err
                raise SamplingError(f"sampler stage {stage.name!r} failed: {type(err).__name__}: {err}", None) from err

    def sample(self, ctx: Any, idx: int = -1) -> int:
        """Pick a token from the logits of output ``idx``; llama.cpp also accepts it into the chain."""
        import llama_cpp

        tok = int(llama_cpp.llama_sampler_sample(self.ptr, ctx, idx))
        if self._python:
            self._raise_stage_error()
        return tok

    def accept(self, token: int) -> None:
        import llama_cpp

        llama_cpp.llama_sampler_accept(self.ptr, token)

    def apply(self, candidates: Any) -> None:
        """Run the chain over a ``llama_token_data_array`` (byref) without picking; for tests and tools."""
        import llama_cpp

        llama_cpp.llama_sampler_apply(self.ptr, candidates)
        if self._python:
            self._raise_stage_error()

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
            _free_chain(self.ptr, self._python)
            self.ptr = None
            self._keep.clear()
            self._python = []


def _free_chain(chain: Any, python_stages: list[PythonStage]) -> None:
    """Free ``chain``; Python-owned stages are removed first and freed while their callbacks still live."""
    import llama_cpp as L

    addrs = {ctypes.cast(st.ptr, ctypes.c_void_p).value for st in python_stages}
    for i in reversed(range(L.llama_sampler_chain_n(chain))):
        if ctypes.cast(L.llama_sampler_chain_get(chain, i), ctypes.c_void_p).value in addrs:
            L.llama_sampler_chain_remove(chain, i)
    L.llama_sampler_free(chain)
    for st in python_stages:  # also those never added to the chain (a failed build)
        L.llama_sampler_free(st.ptr)
        st.ptr = None


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

        known_plugins = plugin_stages()

        def add_plugin(stage: str) -> None:
            nonlocal needs_history
            obj = plugin_stage(stage, known_plugins.get(stage), dict(s.stage_params.get(stage, {})))
            keep.append(obj)
            add(stage, obj.ptr if isinstance(obj, PythonStage) else obj)
            needs_history = True

        if s.mirostat:
            for stage in s.order:
                if stage not in BUILTIN_STAGES:
                    add_plugin(stage)
            add("temp", L.llama_sampler_init_temp(s.temperature))
            if final:
                if s.mirostat == 1:
                    add("mirostat", L.llama_sampler_init_mirostat(n_vocab, seed, s.mirostat_tau, s.mirostat_eta, 100))
                else:
                    add("mirostat-v2", L.llama_sampler_init_mirostat_v2(seed, s.mirostat_tau, s.mirostat_eta))
            return NativeSampler(chain, stages, seed, needs_history, keep)

        for stage in s.order:
            if stage not in BUILTIN_STAGES:
                add_plugin(stage)
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
        _free_chain(chain, [k for k in keep if isinstance(k, PythonStage)])
        raise
