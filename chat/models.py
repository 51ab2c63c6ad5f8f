"""Finding models: aliases, paths, the Hugging Face cache and the user's model dir; loading one backend."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from chat.backend import Backend, BackendFactory, BackendOptions
from chat.config import ConfigFile, Paths, model_entry
from chat.errors import ConfigError, ModelError, NoModelError, UsageError
from chat.load_options import options_class


@dataclass(frozen=True)
class ModelChoice:
    spec: str  # what the user wrote (alias or path)
    location: str  # the path or id a backend loads
    backend: str | None  # forced backend name, if any
    label: str  # how listings and history name it
    options: dict


def how_to_get_a_model(paths: Paths) -> str:
    return (
        "download one with `chat models pull REPO FILE` (e.g. chat models pull Qwen/Qwen2.5-0.5B-Instruct-GGUF "
        "qwen2.5-0.5b-instruct-q4_k_m.gguf), pass `-m /path/to/model.gguf`, "
        f"or set default_model in {paths.config_file}"
    )


def choose_model(spec: str | None, config: ConfigFile, paths: Paths, backend: str | None = None) -> ModelChoice:
    """The model to load: an alias from the config, a path, or a name a backend claims (a hub id, ``scripted``)."""
    from chat.tomlfile import quote, shorten, user_path

    origin = "-m" if spec else "CHAT_MODEL" if os.environ.get("CHAT_MODEL") else f"{paths.config_file}: default_model"
    spec = spec or os.environ.get("CHAT_MODEL") or config.default_model
    if not spec:
        raise NoModelError("no model given and none configured", how_to_get_a_model(paths))
    entry = model_entry(config, spec)
    if entry is not None:
        opts = entry.options
        if entry.template:
            opts["template_origin"] = f"config models.{shorten(spec, 40)}"
        if entry.url is not None:  # a serving engine: the URL is the location, the entry's other keys its options
            return ModelChoice(spec, entry.url, backend or entry.backend, spec, opts)
        location = user_path(entry.location, ConfigError, f"{paths.config_file}: models.{shorten(spec, 40)}.path")
        return ModelChoice(spec, str(location), backend or entry.backend, spec, opts)
    path = user_path(spec, UsageError if origin == "-m" else ConfigError, origin)
    if not os.path.exists(path) and not _looks_like_id(spec) and not _claimed_by_backend(spec):
        names = sorted(config.models)
        aliases = ", ".join([shorten(a, 40) for a in names[:20]] + ["…"] * (len(names) > 20)) or "none configured"
        raise ModelError(f"{quote(spec)}: no such model file or alias (aliases: {aliases})", how_to_get_a_model(paths))
    if os.path.exists(path):
        return ModelChoice(spec, str(path), backend, path.name, {})
    return ModelChoice(spec, spec, backend, spec, {})


def _claimed_by_backend(spec: str) -> bool:
    from chat.plugins import get_registry

    return any(cls.can_load(spec) for cls in get_registry().backends.values())


def _looks_like_id(spec: str) -> bool:
    """A Hugging Face model id (org/name) that a backend may find in the local cache."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def backend_class(choice: ModelChoice) -> type[BackendFactory]:
    """The backend that loads ``choice``: the one ``--backend`` (or the config entry) names, else by the rule.

    The rule (documented in chat.hookspecs): among the backends whose ``can_load`` claims the
    model, the highest ``priority`` wins (0 when a class has none); a tie goes to the name that
    sorts first. Registration order never decides.
    """
    from chat.plugins import get_registry

    backends = get_registry().backends
    installed = ", ".join(sorted(backends)) or "none"
    if choice.backend:
        cls = backends.get(choice.backend)
        if cls is None:
            raise UsageError(f"unknown backend {choice.backend!r}", f"installed backends: {installed}")
        return cls
    if not backends:
        raise ModelError("no backend plugin is installed", 'install one: pip install "chat[llamacpp]"')
    claims = [c for c in backends.values() if c.can_load(choice.location)]
    if not claims:
        raise ModelError(
            f"{choice.location}: no installed backend can load this",
            f"use a .gguf file (llama.cpp) or a Hugging Face model folder; installed backends: {installed}",
        )
    return min(claims, key=lambda c: (-getattr(c, "priority", 0), c.name))


def load_backend(choice: ModelChoice, options: BackendOptions) -> Backend:
    """Load ``choice`` with ``options`` (built for its backend by chat.load_options, or common ones converted)."""
    cls = backend_class(choice)
    try:
        backend: Backend = cls(choice.location, options_class(cls).from_options(options))  # type: ignore[call-arg,assignment]
        return backend
    except ModuleNotFoundError as exc:  # the plugin is installed, the library it drives is not
        hint = getattr(cls, "install_hint", None) or f"pip install {exc.name}"
        raise ModelError(
            f"the {cls.name} backend needs the Python package {exc.name!r}, which is not installed", hint
        ) from None


@dataclass(frozen=True)
class FoundModel:
    path: Path
    size: int
    where: str  # "models dir", "hf cache: REPO"


def find_gguf_files(paths: Paths) -> list[FoundModel]:
    """GGUF files in the user's model dir and the Hugging Face hub cache."""
    found: list[FoundModel] = []
    if paths.models_dir.is_dir():
        for f in sorted(paths.models_dir.rglob("*.gguf")):
            found.append(FoundModel(f, f.stat().st_size, "models dir"))
    try:
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - hub not importable
        cache = None
    if cache and cache.is_dir():
        for repo in sorted(cache.glob("models--*")):
            name = repo.name.removeprefix("models--").replace("--", "/")
            for f in sorted(repo.glob("snapshots/*/**/*.gguf")):
                try:
                    size = f.stat().st_size
                except OSError:
                    continue
                found.append(FoundModel(f, size, f"hf cache: {name}"))
    return found


def pull(repo: str, filename: str, paths: Paths) -> Path:
    """Download one GGUF file from the Hugging Face hub into the user's model dir (huggingface_hub's progress bar)."""
    if not filename.endswith(".gguf"):
        raise UsageError(f"{filename}: not a .gguf file", "chat runs GGUF files; pick one from the repo's file list")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    target = paths.models_dir / repo.replace("/", "__")
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, local_dir=target))
    except HfHubHTTPError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelError(
            f"{repo}/{filename}: download failed: {first}", "check the repo and file names on huggingface.co"
        ) from None
    except (OSError, ValueError) as exc:  # offline, DNS, refused: huggingface_hub raises these families
        raise ModelError(
            f"{repo}/{filename}: cannot reach the Hugging Face hub ({exc.__class__.__name__})",
            f"check your network; or, with a .gguf file you already have, run `chat -m /path/to/model.gguf` "
            f"(or copy it into {paths.models_dir})",
        ) from None
