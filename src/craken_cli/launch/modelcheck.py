"""Checks of a local model folder before launch, from its files alone: config.json (parsed, an
architecture transformers knows as a causal LM, heads that divide the hidden size), the tokenizer
against vocab_size, and each safetensors file's header and a sample of its values. Every process
would otherwise find each of these after start-up, as a traceback.

Neither torch nor transformers is imported (a check costs milliseconds): transformers' lists of
model types are read from its source with `ast`.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import struct
from pathlib import Path

# transformers' lists of model types (config.json "model_type"): every one it knows, and the causal
# LMs, by the files that build them (transformers 5 moved the first into auto_mappings.py).
CONFIG_NAMES = (("models/auto/auto_mappings.py", "models/auto/configuration_auto.py"), "CONFIG_MAPPING_NAMES")
CAUSAL_LM_NAMES = (("models/auto/modeling_auto.py",), "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
MAX_HEADER = 100 << 20  # safetensors refuses larger headers too
SAMPLE_BYTES = 1 << 20  # per tensor: enough to find the NaN/Inf bit patterns of scrambled bytes
# Bits that are all ones in a NaN or an Inf, by safetensors dtype: (bytes per value, mask).
NONFINITE_MASKS = {"BF16": (2, 0x7F80), "F16": (2, 0x7C00), "F32": (4, 0x7F800000)}
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@functools.lru_cache(maxsize=None)
def transformers_names(sources: tuple[str, ...], variable: str) -> frozenset[str] | None:
    """The keys of one of transformers' name tables (`X = OrderedDict([...])`, `X.update({...})`), read
    from its source; None if it cannot be read (the check is then skipped)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    keys: set[str] = set()
    for source in sources:
        try:
            tree = ast.parse((root / source).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            keys |= _literal_keys(node, variable)
    return frozenset(keys) or None


def _literal_keys(node, variable: str) -> set[str]:
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == variable for t in node.targets):
        value = node.value
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update"
          and isinstance(node.func.value, ast.Name) and node.func.value.id == variable):
        value = node
    else:
        return set()
    literal = value.args[0] if isinstance(value, ast.Call) and value.args else value
    try:
        data = ast.literal_eval(literal)
    except (ValueError, TypeError, SyntaxError):
        return set()
    pairs = data.items() if isinstance(data, dict) else data if isinstance(data, list) else []
    return {key for key, *_ in pairs if isinstance(key, str)}


def read_config(flag: str, folder: Path) -> tuple[dict | None, list[str]]:
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return None, [f"{flag}: {path} is not text (not a config.json): re-save the model with save_pretrained"]
    except ValueError as exc:
        return None, [f"{flag}: {path} is not valid JSON ({exc}): fix it, or re-save the model with save_pretrained"]
    except OSError as exc:
        return None, [f"{flag}: {path} cannot be read ({exc.strerror or exc})"]
    if not isinstance(cfg, dict):
        return None, [f"{flag}: {path} holds no JSON object: re-save the model with save_pretrained"]
    return cfg, []


def architecture_problems(flag: str, cfg: dict, trust_remote_code: bool) -> list[str]:
    model_type = cfg.get("model_type")
    if "auto_map" in cfg and trust_remote_code:
        return []  # the model's own code decides
    if not isinstance(model_type, str) or not model_type:
        return [f"{flag}: config.json has no model_type: re-save the model with save_pretrained"]
    known, causal = transformers_names(*CONFIG_NAMES), transformers_names(*CAUSAL_LM_NAMES)
    if known is not None and model_type not in known:
        remote = (" (it ships its own code: pass --trust-remote-code if you trust it)" if "auto_map" in cfg
                  else "")
        return [f"{flag}: model_type '{model_type}' in config.json is not known to the installed transformers"
                f"{remote}: upgrade transformers, or fix model_type"]
    if causal is not None and model_type not in causal:
        return [f"{flag}: a '{model_type}' model is not a causal language model (AutoModelForCausalLM cannot "
                "load it): craken trains decoder-only models; choose one (e.g. a Llama, Qwen or GPT-2 checkpoint)"]
    return []


def shape_problems(flag: str, cfg: dict) -> list[str]:
    hidden, heads, kv_heads = cfg.get("hidden_size"), cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    out = []
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        value = cfg.get(key)
        if key in cfg and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            out.append(f"{flag}: {key} in config.json is {value!r}: it must be a positive whole number")
    if out:
        return out
    if isinstance(hidden, int) and isinstance(heads, int) and cfg.get("head_dim") is None and hidden % heads:
        out.append(f"{flag}: num_attention_heads {heads} does not divide hidden_size {hidden} in config.json: "
                   "choose a head count that divides it (or set head_dim)")
    if isinstance(heads, int) and isinstance(kv_heads, int) and (kv_heads <= 0 or heads % kv_heads):
        out.append(f"{flag}: num_key_value_heads {kv_heads} does not divide num_attention_heads {heads} in "
                   "config.json: choose a divisor")
    return out


def tokenizer_size(folder: Path) -> int | None:
    """Token ids a tokenizer.json can produce (its largest id + 1); None without a readable one."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [t["id"] for t in data.get("added_tokens") or []]
        return max(i for i in ids if isinstance(i, int)) + 1
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def tokenizer_file_problems(tokenizer_folder: Path | None, tokenizer_flag: str) -> list[str]:
    """A tokenizer.json or tokenizer_config.json that is no JSON object: every process fails loading it."""
    out = []
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = tokenizer_folder / name if tokenizer_folder is not None else None
        if path is None or not path.is_file():
            continue
        try:
            ok = isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
        except (OSError, ValueError):
            ok = False
        if not ok:
            out.append(f"{tokenizer_flag}: {path} is not a JSON object (corrupt or cut short): save the tokenizer "
                       "again with save_pretrained, or copy it again")
    return out


def vocab_problems(flag: str, cfg: dict, tokenizer_folder: Path | None, tokenizer_flag: str) -> list[str]:
    vocab = cfg.get("vocab_size")
    size = tokenizer_size(tokenizer_folder) if tokenizer_folder is not None else None
    if isinstance(vocab, int) and size is not None and vocab < size:
        return [f"{flag}: vocab_size {vocab} in config.json is smaller than the {size} tokens of the tokenizer "
                f"({tokenizer_flag}): ids from {vocab} on would index past the embedding; set vocab_size to "
                f"{size} or more, or use the model's own tokenizer"]
    return []


def safetensors_problems(path: Path) -> list[str]:
    """A truncated file, an unreadable header, offsets beyond the data, or NaN/Inf bit patterns in a
    sample of a tensor's values (what scrambled bytes leave)."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return [f"{name} is truncated ({size} bytes): copy or download it again"]
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER, size - 8):
                return [f"{name}: its header is unreadable (length {length} in a {size}-byte file): the file is "
                        "truncated or not safetensors; copy or download it again"]
            header = json.loads(fh.read(length).decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("not an object")
            return tensor_problems(fh, name, header, size, 8 + length)
    except (UnicodeDecodeError, ValueError) as exc:
        return [f"{name}: its header is unreadable ({exc.__class__.__name__}): copy or download it again"]
    except OSError as exc:
        return [f"{name} cannot be read ({exc.strerror or exc})"]


def tensor_problems(fh, name: str, header: dict, size: int, data_start: int) -> list[str]:
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        for key, info in tensors.items():
            start, stop = (int(x) for x in info["data_offsets"])
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            if stop - start != count * DTYPE_BYTES.get(info["dtype"], 0) or start > stop:
                return [f"{name}: tensor {key}'s header entry does not match its shape and dtype: the header is "
                        "corrupt; copy or download the file again"]
    except (KeyError, TypeError, ValueError, IndexError):
        return [f"{name}: its header does not describe tensors (safetensors): copy or download it again"]
    if data_start + end != size:
        return [f"{name} has {size} bytes, its header describes {data_start + end}: the file is "
                f"{'truncated' if size < data_start + end else 'corrupt'}; copy or download it again"]
    for key, info in tensors.items():
        if nonfinite_sample(fh, data_start, info):
            return [f"{name}: tensor {key} holds NaN/Inf bit patterns where weights are (the file is scrambled "
                    "or corrupt): copy or download it again"]
    return []


def nonfinite_sample(fh, data_start: int, info: dict) -> bool:
    mask = NONFINITE_MASKS.get(info.get("dtype"))
    if mask is None:
        return False
    width, bits = mask
    start, stop = (int(x) for x in info["data_offsets"])
    fh.seek(data_start + start)
    sample = fh.read(min(stop - start, SAMPLE_BYTES))
    sample = sample[:len(sample) - len(sample) % width]
    import numpy

    values = numpy.frombuffer(sample, dtype=numpy.uint16 if width == 2 else numpy.uint32)
    return bool(numpy.any((values & bits) == bits))


def header_shapes(path: Path) -> dict[str, list]:
    """Tensor name -> shape from a safetensors header ({} when unreadable: safetensors_problems says why)."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(min(length, MAX_HEADER)).decode("utf-8"))
        return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError):
        return {}


def config_weight_problems(flag: str, cfg: dict, shapes: dict[str, list]) -> list[str]:
    """config.json against the weights beside it: embedding rows and the first attention projection."""
    out = []
    vocab, hidden, heads = cfg.get("vocab_size"), cfg.get("hidden_size"), cfg.get("num_attention_heads")
    for name, shape in shapes.items():
        if name.endswith(("embed_tokens.weight", "wte.weight")) and isinstance(vocab, int) and shape[0] != vocab:
            out.append(f"{flag}: config.json has vocab_size {vocab}, the weights' embedding ({name}) {shape[0]} rows: "
                       "the config does not belong to these weights; restore the model's own config.json")
        if name.endswith("layers.0.self_attn.q_proj.weight") and isinstance(hidden, int) and isinstance(heads, int):
            head_dim = cfg.get("head_dim") or hidden // heads
            if list(shape) != [heads * head_dim, hidden]:
                out.append(f"{flag}: config.json describes {heads} attention heads of {head_dim} over hidden_size "
                           f"{hidden}, the weights' {name} is {shape[0]} x {shape[1]}: restore the model's own "
                           "config.json")
    return out


def weights_problems(flag: str, folder: Path) -> list[str]:
    out = []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [f"{flag}: {index.name} is unreadable: copy or download it again"]
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            out.append(f"{flag}: {index.name} names {', '.join(missing[:3])}, not in the folder: copy the missing "
                       "shards")
    for path in sorted(folder.glob("*.safetensors")):
        out += [f"{flag}: {p}" for p in safetensors_problems(path)]
    return out


def folder_problems(flag: str, folder: Path, trust_remote_code: bool, tokenizer_folder: Path | None,
                    tokenizer_flag: str) -> list[str]:
    """Every problem of a local model folder that has a config.json."""
    cfg, out = read_config(flag, folder)
    if cfg is None:
        return out
    out += architecture_problems(flag, cfg, trust_remote_code)
    out += shape_problems(flag, cfg)
    out += tokenizer_file_problems(tokenizer_folder, tokenizer_flag) or vocab_problems(flag, cfg, tokenizer_folder,
                                                                                        tokenizer_flag)
    weights = weights_problems(flag, folder)
    if not weights and not out:
        shapes = {k: v for path in sorted(folder.glob("*.safetensors")) for k, v in header_shapes(path).items()}
        weights = config_weight_problems(flag, cfg, shapes)
    return out + weights
