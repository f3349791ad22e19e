"""Before launch: can the workers get a hub model? A hub id that is neither in the local cache nor
reachable made every process retry for minutes and print 215 lines of tracebacks (issue 21); here
it is one line naming what to do, in the time one TCP connect takes.

    hub_problems(spec, environ)        -> ["--model gpt2: ..."] or []
"""

from __future__ import annotations

import socket
from typing import Callable, Mapping
from urllib.parse import urlparse

OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of HF_HUB_OFFLINE
CONNECT_TIMEOUT_S = 3.0


def hub_ids(spec) -> list[tuple[str, str]]:
    """(flag, hub id) of the model and tokenizer the workers would load from the hub."""
    from .preflight import looks_like_path
    from ..train import builtin

    model = spec.model
    names = [("--model", model.name_or_path)] + ([("--tokenizer", model.tokenizer)] if model.tokenizer else [])
    return [(flag, name) for flag, name in names
            if not builtin.is_builtin(name) and not looks_like_path(name) and name.count("/") <= 1]


def is_cached(repo_id: str, environ: Mapping[str, str]) -> bool:
    """config.json (a model) or tokenizer_config.json (a tokenizer) of `repo_id` in the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    cache = environ.get("HF_HUB_CACHE") or None
    return any(isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache), str)
               for name in ("config.json", "tokenizer_config.json"))


def unreachable(endpoint: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why the hub at `endpoint` cannot be reached from here (None: a TCP connection opened)."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def hub_problems(spec, environ: Mapping[str, str],
                 reach: Callable[[str], str | None] = unreachable) -> list[str]:
    ids = [(flag, name) for flag, name in hub_ids(spec) if not is_cached(name, environ)]
    if not ids:
        return []
    endpoint = environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if environ.get("HF_HUB_OFFLINE", "").upper() in OFFLINE_VALUES:
        why, other = "HF_HUB_OFFLINE is set", "or unset HF_HUB_OFFLINE"
    else:
        why = reach(endpoint)
        if why is None:
            return []
        why, other = f"{endpoint} cannot be reached ({why})", "or check the network (HF_ENDPOINT for a mirror)"
    return [f"{flag} {name}: not in the local hub cache and {why}: download it where the hub is reachable "
            f"(huggingface-cli download {name}) and pass its folder, {other}" for flag, name in ids]
