"""Before launch: can the workers get a hub model, tokenizer or data set? A hub id that is neither in the local cache nor
reachable made every process retry for minutes and print 215 lines of tracebacks (issue 21); here
it is one line naming what to do, in the time one TCP connect takes.

    hub_problems(spec, environ)        -> ["--model gpt2: ...", "--dataset org/d: ..."] or []
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlparse

OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of HF_HUB_OFFLINE
CONNECT_TIMEOUT_S = 3.0


def hub_ids(spec) -> list[tuple[str, str, str]]:
    """(flag, hub id, repo type) of the model, tokenizer and data set the workers would load from the hub."""
    from .preflight import names_local_data, names_local_folder
    from ..train import builtin

    model, dataset = spec.model, spec.data.dataset
    names = [("--model", model.name_or_path)] + ([("--tokenizer", model.tokenizer)] if model.tokenizer else [])
    ids = [(flag, name, "model") for flag, name in names
           if not builtin.is_builtin(name) and not names_local_folder(name)]
    if not builtin.is_builtin(dataset) and not names_local_data(dataset) and dataset.count("/") <= 1:
        ids.append(("--dataset", dataset, "dataset"))
    return ids


def is_cached(repo_id: str, environ: Mapping[str, str], repo_type: str = "model") -> bool:
    """A model's config.json or a tokenizer's tokenizer_config.json in the local hub cache; for a data set,
    any downloaded file, or a version datasets prepared in its own cache (it loads either offline)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cache = environ.get("HF_HUB_CACHE") or None
    if repo_type == "dataset":
        from ..train.data import prepared_hub_infos

        snapshots = Path(cache or constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
        return any(snapshots.glob("*/*")) or bool(prepared_hub_infos(repo_id))
    return any(isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache), str)
               for name in ("config.json", "tokenizer_config.json"))


def offline_by(environ: Mapping[str, str], repo_type: str) -> str | None:
    """The variable that keeps the workers off the hub (None: none does): huggingface_hub's HF_HUB_OFFLINE;
    for a data set, datasets' HF_DATASETS_OFFLINE wins where it is set."""
    name = "HF_DATASETS_OFFLINE" if repo_type == "dataset" and "HF_DATASETS_OFFLINE" in environ else "HF_HUB_OFFLINE"
    return name if environ.get(name, "").upper() in OFFLINE_VALUES else None


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
    endpoint = environ.get("HF_ENDPOINT") or "https://huggingface.co"
    reached: list[str | None] = []  # one connect answers for every id (None: it opened)
    problems = []
    for flag, name, repo_type in hub_ids(spec):
        if is_cached(name, environ, repo_type):
            continue
        if variable := offline_by(environ, repo_type):
            why, other = f"{variable} is set", f"or unset {variable}"
        else:
            reached = reached or [reach(endpoint)]
            if reached[0] is None:
                continue
            why, other = f"{endpoint} cannot be reached ({reached[0]})", "or check the network (HF_ENDPOINT for a mirror)"
        # huggingface_hub 1.x removed the huggingface-cli command: `hf download` is its CLI now
        download = f"hf download {name}" + (" --repo-type dataset" if repo_type == "dataset" else "")
        problems.append(f"{flag} {name}: not in the local hub cache and {why}: download it where the hub is "
                        f"reachable ({download}) and pass its folder, {other}")
    return problems
