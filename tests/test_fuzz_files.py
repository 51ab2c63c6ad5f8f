"""Mutation fuzzing of the readers of weight files from strangers: GGUF models, LoRA adapters, control vectors,
soft prompts, PEFT folders.

Each case mutates a valid file (byte flips, overwritten runs, truncation, duplicated or inserted
bytes, interesting integers at random offsets) and hands it to the reader chat uses before any
library sees the file. The only outcome allowed besides success is a ChatError (one clear line);
any other exception fails. Files the checks accept are then loaded by the real llama.cpp in a
child process: a child that dies by a signal fails (an abort inside ggml would take chat down).

A fast run is part of the default suite; the long run (``fuzz`` mark, CI runs it) does 10,000
cases per reader (2,500 for each soft prompt file: one small tensor, read by numpy, never parsed by llama.cpp).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from chat.errors import ChatError

FAST = 60
LONG = 10_000
INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1]

mutation = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(0, 7)),
        st.tuples(st.just("byte"), st.integers(0, 2**31), st.integers(0, 255)),
        st.tuples(st.just("int"), st.integers(0, 2**31), st.sampled_from(INTERESTING)),
        st.tuples(st.just("cut"), st.integers(0, 2**31), st.just(0)),
        st.tuples(st.just("dup"), st.integers(0, 2**31), st.integers(1, 64)),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, ops, header_bytes: int) -> bytes:
    """Apply ``ops`` at offsets inside the first ``header_bytes`` (where the parsers look)."""
    buf = bytearray(data)
    for op, where, value in ops:
        if not buf:
            break
        at = where % min(header_bytes, len(buf))
        if op == "flip":
            buf[at] ^= 1 << value
        elif op == "byte":
            buf[at] = value
        elif op == "int":
            size = 8 if value > 0xFFFFFFFF else 4
            buf[at : at + size] = (
                struct.pack("<Q" if size == 8 else "<I", value)[: len(buf) - at] if at < len(buf) else b""
            )
        elif op == "cut":
            del buf[at:]
        elif op == "dup":
            buf[at:at] = buf[at : at + value]
    return bytes(buf)


def _fuzz_settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],
    )


def only_chat_errors(fn, *args) -> bool:
    """True when ``fn`` accepted the input, False when it refused it with a ChatError; anything else fails."""
    try:
        fn(*args)
    except ChatError:
        return False
    return True


# --- the readers under test -----------------------------------------------------------------


def check_model(path: Path) -> None:
    from chat_plugins.llamacpp.gguf_file import check_model_file

    check_model_file(path)


def check_adapter(path: Path, base) -> None:
    from chat.parts.lora import check_lora, read_lora

    check_lora(read_lora(path), base)


def check_vector(path: Path, base) -> None:
    from chat.parts.vector import check_vector as fits, read_vector

    fits(read_vector(path), base)


def check_peft(folder: Path, base_gguf: Path, out: Path) -> None:
    from chat.convert.adapter import peft_to_gguf

    peft_to_gguf(folder, base_gguf, out)


LOADER = textwrap.dedent("""
    import sys
    from chat.backend import BackendOptions, Message
    from chat.sampling import SamplerSettings
    from chat.errors import ChatError
    from chat_plugins.llamacpp import LlamaCppBackend
    model, adapter = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
    try:
        with LlamaCppBackend(model, BackendOptions(threads=1, context_size=128)) as b:
            if adapter:
                import dataclasses
                from pathlib import Path
                from chat.persona import Persona, AdapterPart, SoftPromptPart, SteeringPart
                kind, part = {
                    "lora": ("adapters", AdapterPart(Path(adapter), 1.0)),
                    "vector": ("steering", SteeringPart(Path(adapter), 1.0)),
                    "soft": ("soft_prompts", SoftPromptPart(Path(adapter))),
                }[sys.argv[3]]
                b.apply(dataclasses.replace(Persona(name="fuzz"), **{kind: (part,)}))
            list(b.stream([Message("user", "hi")], SamplerSettings(temperature=0, max_tokens=2)))
    except ChatError:
        pass
""")


def load_in_a_child(*args: str) -> None:
    """Load (and decode two tokens) in a child: it may refuse, it may not die by a signal."""
    r = subprocess.run([sys.executable, "-c", LOADER, *args], capture_output=True, text=True, timeout=120)
    why = [line for line in r.stderr.splitlines() if "GGML_ASSERT" in line or "error" in line.lower()][:3]
    assert r.returncode >= 0, f"llama.cpp died by signal {-r.returncode} on {args}: {why}"
    assert r.returncode == 0, f"unexpected failure on {args}: {r.stderr[-800:]}"


# --- fixtures --------------------------------------------------------------------------------


def check_soft(path: Path, base) -> None:
    from chat.parts.softprompt import check_soft_prompt, read_soft_prompt

    check_soft_prompt(read_soft_prompt(path), base)


@pytest.fixture(scope="module")
def originals(tiny_gguf, lora_a_gguf, cvec_gguf, lora_a_peft, tiny_cfg, tmp_path_factory):
    import numpy as np

    from chat.parts.shape import BaseShape
    from chat.parts.softprompt import write_gguf_soft_prompt, write_peft_soft_prompt

    base = BaseShape.from_gguf(tiny_gguf)
    root = tmp_path_factory.mktemp("soft-originals")
    rows = np.random.default_rng(5).standard_normal((4, tiny_cfg.hidden_size)).astype(np.float32)
    soft_gguf = write_gguf_soft_prompt(root / "soft.gguf", rows, architecture="llama")
    soft_peft = write_peft_soft_prompt(root / "soft_peft", rows)
    return {
        "soft": (soft_gguf.read_bytes(), 2048),
        "soft_peft_config": ((soft_peft / "adapter_config.json").read_bytes(), 1024),
        "soft_peft_tensors": ((soft_peft / "adapter_model.safetensors").read_bytes(), 1024),
        "soft_peft_dir": soft_peft,
        "model": (tiny_gguf.read_bytes(), 16384),
        "adapter": (lora_a_gguf.read_bytes(), 8192),
        "vector": (cvec_gguf.read_bytes(), 4096),
        "peft_config": ((lora_a_peft / "adapter_config.json").read_bytes(), 4096),
        "peft_tensors": ((lora_a_peft / "adapter_model.safetensors").read_bytes(), 4096),
        "base": base,
        "base_path": tiny_gguf,
        "peft_dir": lora_a_peft,
    }


class Budget:
    """Accepted mutants loaded by the real llama.cpp, at most ``limit`` per run (each takes a process)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        self.used += 1
        return self.used <= self.limit


def _run(kind: str, originals, tmp: Path, n: int, loads: Budget) -> None:
    data, head = originals[kind] if kind in originals else originals["peft_" + kind.split("_")[1]]

    @_fuzz_settings(n)
    @given(ops=mutation)
    def case(ops) -> None:
        bad = mutate(data, ops, head)
        if kind == "soft":
            path = tmp / "fuzz-soft.gguf"
            path.write_bytes(bad)
            if only_chat_errors(check_soft, path, originals["base"]) and loads.take():
                load_in_a_child(str(originals["base_path"]), str(path), "soft")
        elif kind.startswith("soft_peft"):
            folder = tmp / "fuzz-soft-peft"
            if folder.exists():
                shutil.rmtree(folder)
            shutil.copytree(originals["soft_peft_dir"], folder)
            name = "adapter_config.json" if kind == "soft_peft_config" else "adapter_model.safetensors"
            (folder / name).write_bytes(bad)
            only_chat_errors(check_soft, folder, originals["base"])
        elif kind in ("model", "adapter", "vector"):
            path = tmp / f"fuzz-{kind}.gguf"
            path.write_bytes(bad)
            if kind == "model":
                accepted = only_chat_errors(check_model, path)
                if accepted and loads.take():
                    load_in_a_child(str(path))
            else:
                check = check_adapter if kind == "adapter" else check_vector
                accepted = only_chat_errors(check, path, originals["base"])
                if accepted and loads.take():
                    load_in_a_child(str(originals["base_path"]), str(path), "lora" if kind == "adapter" else "vector")
        else:
            folder = tmp / "fuzz-peft"
            if folder.exists():
                shutil.rmtree(folder)
            shutil.copytree(originals["peft_dir"], folder)
            name = "adapter_config.json" if kind == "peft_config" else "adapter_model.safetensors"
            (folder / name).write_bytes(bad)
            only_chat_errors(check_peft, folder, originals["base_path"], tmp / "fuzz-out.gguf")

    case()


KINDS = ["model", "adapter", "vector", "peft_config", "peft_tensors", "soft", "soft_peft_config", "soft_peft_tensors"]


@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_weight_file_readers_fast(kind, originals, tmp_path):
    _run(kind, originals, tmp_path, FAST, Budget(3))


@pytest.mark.fuzz
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_weight_file_readers_long(kind, originals, tmp_path):
    # a soft prompt's files are tiny (one tensor; llama.cpp never parses them, numpy does): a quarter of the cases
    _run(kind, originals, tmp_path, LONG // 4 if kind.startswith("soft") else LONG, Budget(15))


@pytest.mark.parametrize("alpha", ["8", [8], True, float("nan"), -1e309, {"a": 1}])
def test_peft_alpha_that_is_not_a_finite_number_is_refused(alpha, originals, tmp_path):
    folder = tmp_path / "peft"
    shutil.copytree(originals["peft_dir"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = alpha
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert not only_chat_errors(check_peft, folder, originals["base_path"], tmp_path / "out.gguf")
