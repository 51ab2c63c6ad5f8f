"""SamplerSettings → llama.cpp's native sampler chain.

Which stages run, in which order, is the core's plan (:func:`chat.samplerplan.plan_sampler`,
which follows llama.cpp's own ``common_sampler_init``); this module only maps each
plan step to a native stage through one table, :data:`NATIVE`.

Plugin stages (:mod:`chat.stages`) go through ``plugin_stage``, a callable the
backend supplies; it returns a :class:`PythonStage`: a custom ``llama_sampler`` (our
own ``llama_sampler_i``) that calls the stage from inside the chain, at its position
in the plan. Python stages see the tokens so far, so a chain with one feeds the
prompt after each reset (``needs_history``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from chat.errors import SamplingError
from chat.samplerplan import Step, plan_sampler
from chat.sampling import SamplerSettings, known_stages
from chat.stages import SamplerStage, StageContext, Vocabulary, run_stage

# Fields that do not change the chain (they act outside it), so they are left out of its cache key.
NON_CHAIN_FIELDS = {"stop", "max_tokens"}

PluginStageFactory = Callable[[str, Any, Any], Any]  # (name, SamplerStage, validated params) → PythonStage


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
        name_type = ctypes.CFUNCTYPE(ctypes.c_void_p, L.llama_sampler_p_ctypes)
        name_fn = name_type(lambda _s: ctypes.addressof(self._name_buf))
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
            raw = (ctypes.c_char * (n * TOKEN_DATA.itemsize)).from_address(ctypes.addressof(arr.data.contents))
            view = np.frombuffer(raw, dtype=TOKEN_DATA)  # type: ignore[call-overload]
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
        get, name = llama_cpp.llama_sampler_chain_get, llama_cpp.llama_sampler_name
        return [name(get(self.ptr, i)).decode() for i in range(n)]

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


@dataclass(frozen=True)
class ChainParts:
    """What the stage constructors need besides a step's own values."""

    vocab: Any  # the llama_vocab pointer (DRY tokenizes its sequence breakers)
    n_vocab: int
    seed: int  # LLAMA_DEFAULT_SEED: llama.cpp draws a random one
    plugin_stage: PluginStageFactory


def _logit_bias(L: Any, step: Step, parts: ChainParts) -> Any:
    pairs = step.values["bias"]
    arr = (L.llama_logit_bias * len(pairs))()
    for i, (tok, bias) in enumerate(pairs):
        arr[i].token = tok
        arr[i].bias = bias
    return L.llama_sampler_init_logit_bias(parts.n_vocab, len(pairs), arr)


def _dry(L: Any, step: Step, parts: ChainParts) -> Any:
    v = step.values
    breakers = [b.encode("utf-8") for b in v["breakers"]]
    arr = (ctypes.c_char_p * max(1, len(breakers)))(*breakers)
    return L.llama_sampler_init_dry(
        parts.vocab, v["multiplier"], v["base"], v["allowed_length"], v["last_n"], arr, len(breakers)
    )


def _plugin(L: Any, step: Step, parts: ChainParts) -> Any:
    return parts.plugin_stage(step.name, step.stage, step.params)


# Plan step kind → llama.cpp stage; min_keep is 1 wherever llama.cpp asks for it.
NATIVE: dict[str, Callable[[Any, Step, ChainParts], Any]] = {
    "logit-bias": _logit_bias,
    "penalties": lambda L, st, p: L.llama_sampler_init_penalties(
        p.n_vocab, st.values["last_n"], st.values["repeat"], st.values["frequency"], st.values["presence"]
    ),
    "dry": _dry,
    "top-n-sigma": lambda L, st, p: L.llama_sampler_init_top_n_sigma(st.values["n"]),
    "top-k": lambda L, st, p: L.llama_sampler_init_top_k(st.values["k"]),
    "typical": lambda L, st, p: L.llama_sampler_init_typical(st.values["p"], 1),
    "top-p": lambda L, st, p: L.llama_sampler_init_top_p(st.values["p"], 1),
    "min-p": lambda L, st, p: L.llama_sampler_init_min_p(st.values["p"], 1),
    "xtc": lambda L, st, p: L.llama_sampler_init_xtc(st.values["probability"], st.values["threshold"], 1, p.seed),
    "temp": lambda L, st, p: L.llama_sampler_init_temp(st.values["temperature"]),
    "temp-ext": lambda L, st, p: L.llama_sampler_init_temp_ext(
        st.values["temperature"], st.values["range"], st.values["exponent"]
    ),
    "plugin": _plugin,
    "greedy": lambda L, st, p: L.llama_sampler_init_greedy(),
    "dist": lambda L, st, p: L.llama_sampler_init_dist(p.seed),
    "mirostat": lambda L, st, p: L.llama_sampler_init_mirostat(
        p.n_vocab, p.seed, st.values["tau"], st.values["eta"], st.values["m"]
    ),
    "mirostat-v2": lambda L, st, p: L.llama_sampler_init_mirostat_v2(p.seed, st.values["tau"], st.values["eta"]),
}


def build_chain(
    settings: SamplerSettings,
    *,
    vocab: Any,
    n_vocab: int,
    n_ctx: int,
    plugin_stage: PluginStageFactory,
    final: bool = True,
    stages: Mapping[str, Any] | None = None,
) -> NativeSampler:
    """Build the chain for ``settings``. ``final=False`` leaves out the picking stage (for inspection).

    ``stages``: the plugin stages by name (``get_registry().samplers``); None: the installed plugins'.
    """
    import llama_cpp as L

    plan = plan_sampler(settings, known_stages(stages), n_vocab=n_vocab, n_ctx=n_ctx)
    seed = L.LLAMA_DEFAULT_SEED if plan.seed is None else int(plan.seed)
    parts = ChainParts(vocab, n_vocab, seed, plugin_stage)
    params = L.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = L.llama_sampler_chain_init(params)
    keep: list[Any] = []
    try:
        for step in plan.chain(final):
            made = NATIVE[step.kind](L, step, parts)
            if step.kind == "plugin":
                keep.append(made)
            ptr = made.ptr if isinstance(made, PythonStage) else made
            if not ptr:
                raise SamplingError(
                    f"llama.cpp refused the {step.name} sampler with these settings",
                    "check the values with `chat samplers`",
                )
            L.llama_sampler_chain_add(chain, ptr)
        return NativeSampler(chain, plan.names(final), seed, plan.needs_history, keep)
    except BaseException:
        _free_chain(chain, [k for k in keep if isinstance(k, PythonStage)])
        raise
