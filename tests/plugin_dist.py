"""Install an extra entry point for one test: a temp dist-info naming a module of tests/plugin_pkg."""

from __future__ import annotations

import os
from pathlib import Path


def with_entry_point(env: dict[str, str], site: Path, name: str, module: str) -> dict[str, str]:
    """``env`` for a ``chat`` subprocess that sees ``[chat] name = module`` as an installed plugin."""
    info = site / f"chat_test_{name}-0.1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: chat-test-{name}\nVersion: 0.1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[chat]\n{name} = {module}\n", encoding="utf-8")
    return dict(env, PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
