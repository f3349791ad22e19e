"""YAML reading and writing in one place.

PyYAML follows YAML 1.1, where `3e-4` (no dot) is a string; everyone writes learning rates that
way, so the loader here reads it as the float it obviously is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import CrakenError


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


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A YAML mapping; a key given twice is refused (PyYAML keeps the last one silently)."""
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first at line {seen[key] + 1}): keep one of them",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
TOO_DEEP = "is nested too deeply to be a configuration (Python's recursion limit); flatten it"


def loads(text: str, origin: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise CrakenError(f"{origin} {TOO_DEEP}", title="cannot read file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CrakenError(f"{origin}: malformed YAML{where}: {problem}; fix the file's syntax",
                          title="cannot read file") from None


class DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def read_mapping(path: str | Path) -> dict:
    """A YAML/JSON file that must hold a mapping (JSON is YAML, but JSON errors read better)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CrakenError(f"{p}: no such file; check the path", title="cannot read file") from None
    except IsADirectoryError:
        raise CrakenError(f"{p} is a folder, not a file: rename it, or give --config a YAML or JSON file",
                          title="cannot read file") from None
    except (PermissionError, UnicodeDecodeError, OSError) as exc:
        raise CrakenError(f"{p}: cannot be read ({exc.__class__.__name__}); check its permissions and encoding",
                          title="cannot read file") from None
    if p.suffix == ".json":
        import json

        try:
            data = json.loads(text, object_pairs_hook=_object_without_duplicates)
        except json.JSONDecodeError as exc:
            raise CrakenError(f"{p}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                              "fix the file's syntax", title="cannot read file") from None
        except RecursionError:
            raise CrakenError(f"{p} {TOO_DEEP}", title="cannot read file") from None
        except DuplicateKey as exc:
            raise CrakenError(f"{p}: duplicate key '{exc.args[0]}' (JSON keeps the last one silently): keep one "
                              "of them", title="cannot read file") from None
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
