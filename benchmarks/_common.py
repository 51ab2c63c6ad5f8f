"""Shared helpers for the benchmark scripts: the benchmark model, timing, child-process memory."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

MODELS = ROOT / "benchmarks" / "_models"


def benchmark_model() -> Path:
    """The ≥ 200M-parameter random-weight Q8_0 llama (written once, reused)."""
    from modelfactory import write_benchmark_gguf

    started = time.perf_counter()
    path = write_benchmark_gguf(MODELS / "bench-q8_0.gguf")
    took = time.perf_counter() - started
    if took > 1:
        print(f"(wrote {path.name}, {path.stat().st_size / 1e6:.0f} MB, in {took:.1f} s)")
    return path


def chat_command() -> list[str]:
    exe = shutil.which("chat", path=str(Path(sys.executable).parent)) or shutil.which("chat")
    return [exe] if exe else [sys.executable, "-m", "chat"]


def median_wall(cmd: list[str], runs: int = 7, env: dict | None = None) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=env, check=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_measuring_rss(cmd: list[str], env: dict | None = None) -> tuple[int, str, float]:
    """Run a child; return (its peak resident set in bytes, its stdout, wall seconds)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = proc.stdout.read()
    proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd[:3]}… exited {proc.returncode}")
    return usage.ru_maxrss * 1024, out.decode(), time.perf_counter() - t


def isolated_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env["CHAT_CONFIG_DIR"] = str(tmp / "config")
    env["CHAT_DATA_DIR"] = str(tmp / "data")
    env["NO_COLOR"] = "1"
    return env


def ratio_line(name: str, value: float, goal: str) -> str:
    return f"{name}: {value:.3f}  (goal {goal})"
