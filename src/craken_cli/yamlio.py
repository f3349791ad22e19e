"""YAML reading and writing in one place.

PyYAML follows YAML 1.1, where `3e-4` (no dot) is a string; everyone writes learning rates that
way, so the loader here reads it as the float it obviously is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import CrakenError


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def loads(text: str, origin: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CrakenError(f"{origin}: malformed YAML{where}: {problem}; fix the file's syntax",
                          title="cannot read file") from None


def read_mapping(path: str | Path) -> dict:
    """A YAML/JSON file that must hold a mapping (JSON is YAML, but JSON errors read better)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CrakenError(f"{p}: no such file; check the path", title="cannot read file") from None
    except IsADirectoryError:
        raise CrakenError(f"{p} is a folder, not a file; name the file inside it", title="cannot read file") from None
    except (PermissionError, UnicodeDecodeError, OSError) as exc:
        raise CrakenError(f"{p}: cannot be read ({exc.__class__.__name__}); check its permissions and encoding",
                          title="cannot read file") from None
    if p.suffix == ".json":
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CrakenError(f"{p}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                              "fix the file's syntax", title="cannot read file") from None
    else:
        data = loads(text, str(p))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CrakenError(f"{p}: expected a mapping of keys to values at the top, found {type(data).__name__}",
                          title="cannot read file")
    return data


def dumps(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
