"""Fuzzing every parser of outside data: persona cards, config.toml, preset files and chat templates.

The rule: whatever a file holds, reading it ends in a value or a ``ChatError`` of one line (what
the user sees), within a bound. Any other exception, or a case past its bound, fails the test with
the input that did it.

Two kinds of input, both drawn by hypothesis:

* property-based — documents of random TOML values of random types under the keys the parser knows
  (and some it does not), written as TOML text (the stdlib reads TOML but does not write it);
* mutation — valid files (the built-in cards, a full card, a config, presets, the well-known templates)
  with byte flips, cuts, truncation, duplicated slices and inserted hostile pieces: deep nesting,
  huge numbers, control characters, byte-order marks, long strings.

A fast run (hypothesis's engine, derandomized, ``FAST_EXAMPLES`` cases per parser, a failure shrunk)
is part of the default suite. The long run (``-m fuzz``, which a plain ``pytest`` runs too) feeds
``LONG_EXAMPLES`` seeded buffers per parser to hypothesis's fuzzer entry point within ``LONG_BUDGET_S``
each; ``CHAT_FUZZ_SEED`` picks the cases, so a failure in CI replays locally.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime
from datetime import time as dtime
from datetime import timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat.config import Paths
from chat.errors import ChatError, ModelError

FAST_EXAMPLES = 100
LONG_EXAMPLES = 10_000
LONG_BUDGET_S = 55.0  # per parser: four parsers and the CLI stay under ~4 minutes on two cores
CASE_BOUND_S = 5.0  # one file, however hostile, is read in well under a second
TEMPLATE_BOUND_S = 10.0  # a render may take 2 s, and a template is rendered up to three times
FUZZ_SEED = int(os.environ.get("CHAT_FUZZ_SEED", "20240611"))

COMMON = dict(
    deadline=None,  # the bound is enforced below, with the input named
    database=None,  # no .hypothesis folder in the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
FAST = settings(max_examples=FAST_EXAMPLES, derandomize=True, **COMMON)
FUZZ_BUFFER_BYTES = 4096  # what one case may draw: enough for a whole card of random fields
CLI_EXAMPLES = 400  # through typer and the error line: slower per case, and the parsers are covered above


# --- the rule ------------------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """A case ran past its bound (a BaseException, so no parser's ``except Exception`` can swallow it)."""


@contextmanager
def bounded(seconds: float) -> Iterator[None]:
    """Interrupt the case after ``seconds`` (SIGALRM, so a hang fails instead of stalling the suite)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        start = time.monotonic()
        yield
        assert time.monotonic() - start < seconds, f"case took more than {seconds} s"
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"case ran past its bound of {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def only_chat_errors(action: Callable[[], Any], bound: float = CASE_BOUND_S) -> Any:
    """Run one case: its value, or None after a one-line ChatError; anything else propagates and fails the test."""
    with bounded(bound):
        try:
            return action()
        except ChatError as exc:
            assert "\n" not in str(exc), f"a {type(exc).__name__} of more than one line: {str(exc)[:500]!r}"
            return None


def long_run(parser: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], None],
             total: int = LONG_EXAMPLES) -> None:
    """``total`` cases, or as many as ``LONG_BUDGET_S`` allows, fed to hypothesis as fuzz buffers.

    ``fuzz_one_input`` is hypothesis's entry point for fuzzers: it turns bytes into values of the
    strategy without the engine's bookkeeping, three times faster per case here. The bytes come from
    ``random.Random(CHAT_FUZZ_SEED)``; a failing case carries its input and number in the error.
    """
    cases = [0]

    @settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def case(value: Any) -> None:
        cases[0] += 1
        try:
            check(value)
        except BaseException as exc:
            exc.add_note(f"fuzz {parser}: case {cases[0]} with CHAT_FUZZ_SEED={FUZZ_SEED}; input: {value!r:.3000}")
            raise

    rnd = random.Random(FUZZ_SEED)
    start = time.monotonic()
    while cases[0] < total and time.monotonic() - start < LONG_BUDGET_S:
        case.hypothesis.fuzz_one_input(rnd.randbytes(FUZZ_BUFFER_BYTES))
    elapsed = time.monotonic() - start
    print(f"\nfuzz {parser}: {cases[0]} cases in {elapsed:.1f} s")
    if cases[0] < total:
        warnings.warn(f"fuzz {parser}: only {cases[0]} of {total} cases fit in {LONG_BUDGET_S:g} s")


# --- TOML text from values (the stdlib has no TOML writer) --------------------------------------


def toml_key(key: str) -> str:
    """A quoted key: JSON's string escapes are all valid TOML escapes; DEL must be escaped in TOML."""
    return json.dumps(key, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: Any) -> str:
    """A TOML literal for a value from :data:`values` (inline tables and arrays, so any nesting is one line)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_key(value)
    if isinstance(value, (datetime, date, dtime)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


class Raw(str):
    """TOML text written as it is: values Python cannot hold as a literal (5,000-digit numbers, deep nesting)."""


def toml_document(data: dict[str, Any]) -> str:
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in data.items())


# --- strategies: values of every TOML type, and hostile pieces --------------------------------------

HOSTILE_RAW = [
    "9" * 5000, "-" + "9" * 4301, "0x" + "f" * 40, "0o" + "7" * 30, "0b" + "1" * 70, str(2**63), str(-(2**63) - 1),
    "1e999", "-0.0", "nan", "+inf", "[" * 700 + "]" * 700, "{a = " * 40 + "1" + "}" * 40, "[" * 40 + "]" * 40,
    "1979-05-27T07:32:00Z", "1979-05-27", "07:32:00", "9999-12-31T23:59:60Z", '"\\u0000"', '"\\U0010FFFF"',
    '"a\\u0000b"', '"\\ud800"', "'''\n" + "x" * 1000 + "'''", '"""' + "\\\n" * 50 + '"""',
]
INTERESTING = [
    b"[", b"]", b"{", b"}", b"=", b".", b",", b'"', b"'", b"'''", b'"""', b"\\", b"\n", b"#", b"[[", b"]]",
    b"\x00", b"\x1b[2J", b"\x7f", b"\xff", b"\xc3", b"\xef\xbb\xbf", b"\\u0000", b"\\ud800", b"inf", b"nan",
    b"9" * 5000, b"0x" + b"f" * 40, b"[" * 800, b"{a=" * 800, b"a." * 200, b"a" * 5000, b"\n[sampling]\n",
    b"\n[[adapters]]\npath = \"", b"\nextends = [\"", b"\n[[examples]]\n", b"1979-05-27T07:32:00Z", b"\t", b"\r\n",
]

text_chars = st.characters(exclude_categories=("Cs",))  # any code point UTF-8 can hold, controls included
short_text = st.text(text_chars, max_size=24)
long_text = st.sampled_from([65, 256, 4097]).map(lambda n: "x" * n)
names = st.text(st.sampled_from("abzAZ09_.-"), min_size=1, max_size=70)
scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**66), 2**66),
    st.floats(),
    short_text,
    long_text,
    names,
    st.datetimes(timezones=st.sampled_from([None, timezone.utc])) | st.dates() | st.times(),
    st.sampled_from(HOSTILE_RAW).map(Raw),
)
toml_keys = st.one_of(short_text, names, long_text)
wrong = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(names, scalars, max_size=2))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(toml_keys, inner, max_size=4),
    max_leaves=6,
)


def random_value(rnd: random.Random, depth: int = 0) -> Any:
    """A TOML value of a random type: the mutator's counterpart of ``values``, one draw instead of hundreds."""
    kind = rnd.randrange(12 if depth < 3 else 10)
    if kind == 0:
        return rnd.random() < 0.5
    if kind == 1:
        return rnd.choice([0, 1, -1, 2**31, 2**63 - 1, -(2**63), rnd.randint(-(2**70), 2**70)])
    if kind == 2:
        return rnd.choice([0.0, -0.0, 1e308, 5e-324, math.inf, -math.inf, math.nan, rnd.uniform(-1e3, 1e3)])
    if kind in (3, 4):
        pick = (rnd.randrange(32), rnd.randrange(32, 127), rnd.randrange(0xD800))
        return "".join(chr(rnd.choice(pick)) for _ in range(rnd.choice([0, 1, 5, 30])))
    if kind == 5:
        return rnd.choice(["x", "a" * 64, "a" * 65]) * rnd.choice([1, 2, 300])
    if kind == 6:
        return rnd.choice([datetime(1979, 5, 27, 7, 32), datetime(1, 1, 1, tzinfo=timezone.utc), date(9999, 12, 31),
                           dtime(23, 59, 59, 999999)])
    if kind in (7, 8, 9):
        return Raw(rnd.choice(HOSTILE_RAW))
    if kind == 10:
        return [random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    return {str(random_value(rnd, depth + 1)): random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))}


def mutate(seed: bytes, rnd: random.Random) -> bytes:
    """A valid file after 1–5 mutations: flip, cut, truncate, duplicate a slice, insert a hostile piece or value."""
    data = bytearray(seed)
    for _ in range(rnd.randint(1, 5)):
        at = rnd.randint(0, len(data))
        op = rnd.choice(["flip", "cut", "truncate", "duplicate", "insert", "insert", "value", "value"])
        if op == "flip" and data:
            data[min(at, len(data) - 1)] = rnd.randrange(256)
        elif op == "cut":
            del data[at : at + rnd.randint(1, 64)]
        elif op == "truncate":
            del data[at:]
        elif op == "duplicate":
            data[at:at] = data[at : at + rnd.randint(1, 200)] * rnd.randint(1, 50)
        elif op == "insert":
            data[at:at] = rnd.choice(INTERESTING)
        else:
            _replace_a_value(data, at, toml_value(random_value(rnd)).encode("utf-8"))
    return bytes(data)


def _replace_a_value(data: bytearray, at: int, value: bytes) -> None:
    """The value of the next ``key = value`` line after ``at`` becomes ``value`` (or a new line holds it)."""
    eq = data.find(b"=", at)
    end = data.find(b"\n", eq) if eq >= 0 else -1
    if eq >= 0 and end >= 0:
        data[eq + 1 : end] = b" " + value
    else:
        data[at:at] = b"\nfuzz = " + value + b"\n"


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Mutants of ``seeds``; the mutations come from one drawn Random: cheap, and replayed from its seed."""
    return st.builds(mutate, st.sampled_from(seeds), st.randoms(use_true_random=True))


# --- persona cards -----------------------------------------------------------------------------------

PERSONAS = Path(__file__).resolve().parent.parent / "personas"
FULL_CARD = """name = "full"
description = "Every field of the contract."
greeting = "Hello."
system = \"\"\"You are full.\"\"\"
extends = ["assistant", "../sib"]
template = "chatml"
author = "me"
version = "1"
tags = ["a", "b"]

[sampling]
temperature = 0.7
top_p = 0.9
order = ["top_k", "top_p", "temperature"]
stop = ["\\n\\n"]
logit_bias = { 15 = -100.0 }

[[examples]]
user = "Hi"
assistant = "Hello"

[[knowledge]]
title = "Fact"
text = "Water is wet."

[[adapters]]
path = "a.gguf"
scale = 0.5

[[steering]]
path = "v.gguf"
scale = 0.5
layers = [1, 3]
"""
CARD_SEEDS = [FULL_CARD.encode()] + [p.read_bytes() for p in sorted(PERSONAS.glob("*/persona.toml"))]
SAMPLER_KEYS = ["temperature", "top_k", "top_p", "min_p", "seed", "max_tokens", "stop", "order", "logit_bias",
                "mirostat", "dry_sequence_breakers", "word_filter", "word_filter.ban", "x.y", "nope"]
part_paths = st.sampled_from(["a.gguf", "v.gguf", "sub", "../a.gguf", "/etc/hostname", "~/x", "~nobody/x",
                              "a\0b", "a" * 300, "", ".", "t.jinja"]) | short_text
parts = st.lists(
    st.fixed_dictionaries({"path": part_paths}, optional={"scale": wrong, "layers": wrong}) | wrong, max_size=3
)
sampling_tables = st.dictionaries(st.sampled_from(SAMPLER_KEYS) | toml_keys, wrong | values, max_size=5)
card_fields = st.fixed_dictionaries(
    {},
    optional={
        "name": names | wrong,
        "description": short_text | wrong,
        "system": short_text | long_text | wrong,
        "extends": st.lists(st.sampled_from(["assistant", "teacher", "../sib", "../loop", "./", "", "nope", "a" * 300,
                                             "../" + "b" * 256, "/", "~", "a\0b"]) | short_text, max_size=3) | wrong,
        "sampling": sampling_tables | wrong,
        "examples": st.lists(st.fixed_dictionaries({"user": short_text, "assistant": short_text}) | wrong,
                             max_size=3) | wrong,
        "knowledge": st.lists(st.fixed_dictionaries({"text": short_text}) | wrong, max_size=2) | wrong,
        "adapters": parts | wrong,
        "steering": parts | wrong,
        "template": st.sampled_from(["", "chatml", "gemma", "t.jinja", "../t.jinja", "nope", "a\0b"]) | wrong,
        "tags": st.lists(short_text, max_size=3) | wrong,
    },
)


@st.composite
def card_documents(draw: st.DrawFn) -> bytes:
    """A card's fields with plausible or random values, plus unknown keys, as TOML text."""
    data = draw(card_fields)
    data.update(draw(st.dictionaries(toml_keys, values, max_size=2)))
    return toml_document(data).encode("utf-8")


cards = st.one_of(mutated(CARD_SEEDS), mutated(CARD_SEEDS), card_documents())  # mutants are 10x cheaper to draw


@pytest.fixture
def card_root(tmp_path: Path) -> Path:
    """``root/card`` (rewritten by every case) beside ``sib`` (a valid card) and ``loop`` (extends card)."""
    siblings = {"sib": 'name = "sib"\nsystem = "sibling"\n', "loop": 'name = "loop"\nextends = ["../card"]\n'}
    for name, body in siblings.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "persona.toml").write_text(body, encoding="utf-8")
    card = tmp_path / "card"
    (card / "sub").mkdir(parents=True)
    for part in ("a.gguf", "v.gguf"):
        (card / part).write_bytes(b"GGUF")
    (card / "t.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    return tmp_path


def check_card(root: Path, data: bytes) -> None:
    """``chat personas validate``'s card_problems, then the catalog's resolve (read_card, extends, parts, template)."""
    from chat.catalog import PersonaCatalog
    from chat.persona import card_problems

    (root / "card" / "persona.toml").write_bytes(data)
    problems = only_chat_errors(lambda: card_problems(root / "card", PersonaCatalog(None).load))
    for problem in problems:
        assert "\n" not in str(problem), str(problem)[:500]
    if not problems:  # a card with problems fails resolve() at the same first problem
        only_chat_errors(lambda: PersonaCatalog(None).resolve(str(root / "card")))


def test_fuzz_cards_fast(card_root):
    @FAST
    @given(cards)
    def case(data: bytes) -> None:
        check_card(card_root, data)

    case()


@pytest.mark.fuzz
def test_fuzz_cards_long(card_root):
    long_run("persona.toml", cards, lambda data: check_card(card_root, data))


# --- config.toml -------------------------------------------------------------------------------------

CONFIG_SEED = b"""default_model = "small"
default_persona = "teacher"
history = true
markdown = false

[models]
small = "~/models/small.gguf"
big = { path = "/models/big.gguf", backend = "llamacpp", context_size = 8192, gpu_layers = 99, template = "chatml" }

[backend]
context_size = 4096

[sampling]
temperature = 0.7
word_filter = { ban = ["darn"] }
"""
model_entries = st.dictionaries(
    toml_keys | names,
    part_paths | st.fixed_dictionaries({"path": part_paths}, optional={
        "backend": wrong, "context_size": wrong, "gpu_layers": wrong, "template": wrong}) | wrong,
    max_size=3,
)
config_fields = st.fixed_dictionaries(
    {},
    optional={
        "default_model": part_paths | wrong,
        "default_persona": names | wrong,
        "history": st.booleans() | wrong,
        "markdown": st.booleans() | wrong,
        "models": model_entries | wrong,
        "backend": st.dictionaries(toml_keys, values, max_size=3) | wrong,
        "sampling": sampling_tables | wrong,
    },
)


@st.composite
def config_documents(draw: st.DrawFn) -> bytes:
    data = draw(config_fields)
    data.update(draw(st.dictionaries(toml_keys, values, max_size=1)))
    return toml_document(data).encode("utf-8")


configs = st.one_of(mutated([CONFIG_SEED]), config_documents())


def paths_in(folder: Path) -> Paths:
    """Paths whose config dir is ``folder`` — what CHAT_CONFIG_DIR does, without touching the environment."""
    paths = Paths()
    paths.__dict__["config_dir"] = folder  # a cached_property: the instance's dict answers first
    return paths


def check_config(folder: Path, data: bytes) -> None:
    """load_config, then what reads its values: the model, the persona and the sampler settings."""
    from chat.catalog import PersonaCatalog
    from chat.config import load_config
    from chat.models import choose_model
    from chat.plugins import get_registry
    from chat.sampling import resolve_sampling

    get_registry()  # plugin stages are known before settings are checked, as in the CLI
    (folder / "config.toml").write_bytes(data)
    paths = paths_in(folder)
    config = only_chat_errors(lambda: load_config(paths))
    if config is None:
        return
    only_chat_errors(lambda: choose_model(None, config, paths))
    only_chat_errors(lambda: resolve_sampling([("config", config.sampling)]))
    if config.default_persona:
        only_chat_errors(lambda: PersonaCatalog(None).resolve(config.default_persona))
    for alias in list(config.models)[:3]:
        only_chat_errors(lambda: choose_model(alias, config, paths))  # noqa: B023 (called at once)


def test_fuzz_config_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("CHAT_MODEL", raising=False)

    @FAST
    @given(configs)
    def case(data: bytes) -> None:
        check_config(tmp_path, data)

    case()


@pytest.mark.fuzz
def test_fuzz_config_long(tmp_path, monkeypatch):
    monkeypatch.delenv("CHAT_MODEL", raising=False)
    long_run("config.toml", configs, lambda data: check_config(tmp_path, data))


# --- preset files ---------------------------------------------------------------------------------

PRESET_SEEDS = [
    b"temperature = 0.2\ntop_k = 40\ntop_p = 0.9\nmin_p = 0.05\n",
    b'temperature = 1.0\norder = ["word_filter", "top_k", "temperature"]\n[word_filter]\nban = ["x"]\n',
    b'stop = ["\\n", "User:"]\nseed = 7\nmax_tokens = 100\nlogit_bias = { 15 = -100.0 }\n',
]
presets = st.one_of(mutated(PRESET_SEEDS), sampling_tables.map(lambda d: toml_document(d).encode("utf-8")))


def check_preset(folder: Path, data: bytes) -> None:
    """load_preset, then merging it as a layer (where its values are checked)."""
    from chat.plugins import get_registry
    from chat.presets import load_preset
    from chat.sampling import resolve_sampling

    get_registry()  # plugin stages are known before settings are checked, as in the CLI
    (folder / "presets").mkdir(exist_ok=True)
    (folder / "presets" / "fuzz.toml").write_bytes(data)
    only_chat_errors(lambda: resolve_sampling([("preset fuzz", load_preset("fuzz", paths_in(folder)))]))


def test_fuzz_presets_fast(tmp_path):
    @FAST
    @given(presets)
    def case(data: bytes) -> None:
        check_preset(tmp_path, data)

    case()


@pytest.mark.fuzz
def test_fuzz_presets_long(tmp_path):
    long_run("presets", presets, lambda data: check_preset(tmp_path, data))


# --- chat templates ------------------------------------------------------------------------------------

FRAGMENTS = [
    "{{ bos_token }}", "{% for m in messages %}", "{% endfor %}", "{{ m['content'] }}", "{{ m.role }}",
    "{% if add_generation_prompt %}", "{% endif %}", "{% else %}", "{{ raise_exception('no') }}",
    "{{ messages|tojson }}", "{% for i in range(100000) %}{% for j in range(100000) %}", "{{ 'x' * 10000000 }}",
    "{{ 9 ** 9999999 }}", "{% macro r(n) %}{{ r(n) }}{% endmacro %}{{ r(1) }}", "{{ range(10**9)|list }}",
    "{{ messages[0].content * 99999999 }}", "{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}",
    "{{ strftime_now('%Y') }}", "{% set x = messages|selectattr('role', 'equalto', 'system')|list %}",
    "{{ (messages|length) // 0 }}", "{{ undefined_thing.attr }}", "{{ messages[99] }}", "{% break %}",
    "{{ '%s' % messages }}", "{{ messages|map(attribute='content')|join('\n') }}", "{%", "{{", "}}", "%}",
    "{# comment", "{{ 'a' | center(10**7) }}", "{{ [1] * 10**8 }}", "{{ m.content|trim }}", "\n", "text",
]


def _well_known_sources() -> list[str]:
    from chat.template import known_templates

    return [t.source for t in known_templates().values()]


template_sources = st.one_of(
    mutated([s.encode() for s in _well_known_sources()]).map(lambda b: b.decode("utf-8", "replace")),
    st.lists(st.sampled_from(FRAGMENTS), max_size=8).map("".join),
    st.sampled_from(_well_known_sources()),
)
conversations = st.lists(
    st.tuples(st.sampled_from(["system", "user", "assistant", "tool", ""]), short_text | long_text), max_size=4
)


def check_template(source: str, turns: list[tuple[str, str]]) -> None:
    """Compile and render: a hostile template must end in ModelError (or render), never hang or escape."""
    from chat.backend import Message
    from chat.template import ChatTemplate

    def render() -> None:
        try:
            ChatTemplate(source, model="fuzz").render([Message(role, content) for role, content in turns])
        except ChatError as exc:
            assert isinstance(exc, ModelError), exc
            raise

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jinja's lexer on a mutant's "\q": noise, not a finding
        only_chat_errors(render, TEMPLATE_BOUND_S)


def test_fuzz_templates_fast():
    @FAST
    @given(template_sources, conversations)
    def case(source: str, turns: list[tuple[str, str]]) -> None:
        check_template(source, turns)

    case()


@pytest.mark.fuzz
def test_fuzz_templates_long():
    long_run("chat templates", st.tuples(template_sources, conversations), lambda case: check_template(*case))


@pytest.mark.parametrize(
    "source",
    [
        "{% set ns = namespace(s='a') %}{% for i in range(22) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
        "{{ ns.s|length }}",
        "{{ ('a'|center(2000000))|length }}",
        "{{ ('a'|center(10 ** 9))|length }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(30) %}{% set ns.s = ns.s|replace('a', 'aa') %}{% endfor %}",
    ],
    ids=["~ doubles a string", "a filter pads a string", "a filter asks for a gigabyte", "replace doubles a string"],
)
def test_templates_cannot_build_values_past_the_size_bound(source):
    """MAX_SIZE (1 MiB) bounds what a template may build; these build 2–4 MiB (center(10**9): 1 GiB in 2 s)."""
    from chat.backend import Message
    from chat.template import ChatTemplate

    with pytest.raises(ModelError):
        ChatTemplate(source, model="fuzz").render([Message("user", "hi")])


# --- through the CLI: `chat personas validate` ---------------------------------------------------------


def check_validate(root: Path, data: bytes) -> None:
    """``chat personas validate``: exit 0 (valid), 2 or 4 (refused), one error per line, never a traceback."""
    from typer.testing import CliRunner

    from chat.cli import app

    (root / "card" / "persona.toml").write_bytes(data)
    with bounded(CASE_BOUND_S):
        r = CliRunner().invoke(app, ["personas", "validate", str(root / "card")], catch_exceptions=False)
    assert r.exit_code in (0, 2, 4), (r.exit_code, r.output[-2000:])
    assert "Traceback" not in r.output
    if r.exit_code:
        assert r.stderr.startswith("error: ") and len(r.stderr) < 20_000, r.stderr[:2000]


def test_fuzz_cli_validate_fast(card_root):
    @settings(FAST, max_examples=30)
    @given(cards)
    def case(data: bytes) -> None:
        check_validate(card_root, data)

    case()


@pytest.mark.fuzz
def test_fuzz_cli_validate_long(card_root):
    long_run("personas validate (CLI)", cards, lambda data: check_validate(card_root, data), total=CLI_EXAMPLES)
