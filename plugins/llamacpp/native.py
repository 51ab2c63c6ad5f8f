"""The llama.cpp library, imported lazily, with its log kept off the terminal.

llama.cpp writes its load report and warnings to stderr by default. We route its
log into a small ring buffer instead: nothing reaches the user's terminal, and a
failed load can still quote llama.cpp's own reason in the ModelError.
"""

from __future__ import annotations

import ctypes
from collections import deque
from typing import Any

_recent: deque[tuple[int, str]] = deque(maxlen=64)
_callback: Any = None  # the ctypes callback must outlive every call into llama.cpp

# ggml_log_level as ggml.h in 0.3.36 numbers it (llama_cpp/_logger.py still has an older numbering).
LOG_WARN, LOG_ERROR, LOG_CONT = 3, 4, 5
_last_level = 0


def library() -> Any:
    """``llama_cpp``, with logging captured and the backend initialised (once per process)."""
    global _callback
    import llama_cpp

    if _callback is None:

        @llama_cpp.llama_log_callback
        def _log(level: int, text: bytes, _user: Any) -> None:
            global _last_level
            msg = text.decode("utf-8", errors="replace") if text else ""
            if level == LOG_CONT:
                if _last_level in (LOG_WARN, LOG_ERROR) and _recent:
                    prev_level, prev = _recent[-1]
                    _recent[-1] = (prev_level, prev + msg)
                return
            _last_level = level
            if level in (LOG_WARN, LOG_ERROR):
                _recent.append((level, msg))

        llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
        _callback = _log
        llama_cpp.llama_backend_init()
    return llama_cpp


def forget_log() -> None:
    """Forget what llama.cpp logged so far: :func:`recent_errors` then quotes only what comes next."""
    _recent.clear()


def recent_errors() -> str:
    """llama.cpp's error lines since :func:`forget_log` (warnings if there are none), as one line."""
    errors = [m.strip() for lvl, m in _recent if lvl == LOG_ERROR and m.strip()]
    lines = errors or [m.strip() for _, m in _recent if m.strip()]
    return "; ".join(" ".join(line.split())[:200] for line in lines[:2])  # the first lines name the cause
