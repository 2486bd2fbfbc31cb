"""Config loading: any `*Args` dataclass from defaults < YAML file < `a.b=c` CLI dotlist.

The layers are merged by OmegaConf (`OmegaConf.merge(defaults, file, cli)`, the library Meta
Lingua's configs are written for), so `${...}` interpolation works in YAML and on the command
line (`dump_dir: ./dump/${name}`, `${oc.env:SCRATCH}`); it is resolved before the run starts,
and a reference to a missing key is an error naming the key that holds it. `\\${` is a
literal `${`.

Keys are strict: an unknown key or a value of the wrong type stops the run before any work,
naming the dotted key and the closest valid one (our checks, on the resolved values: OmegaConf's
own messages are terse). On the command line `a.b=c` sets one key and `a={b: c}` replaces the
whole mapping `a`. `dump_config` writes the resolved config. A checkpoint's params.json is
loaded as strictly (`load_params`): a key the args class lacks is an error, never dropped.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key or file at fault."""


def choice(default: str, choices: tuple[str, ...]) -> Any:
    """A str field restricted to `choices`, checked when the config is loaded."""
    return dataclasses.field(default=default, metadata={"choices": choices})


def _closest(key: str, valid: list[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{prefix}{match[0]}'?"
    return f"; valid keys under '{prefix[:-1] or '<top level>'}': {', '.join(sorted(valid))}"


def _leaf_keys(value: Any, key: str) -> list[str]:
    """Dotted keys of the leaves under `key` (just `key` for a scalar), as the user wrote them."""
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaf_keys(v, f"{key}.{k}")]
    return [key]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"config key '{key}' expects a bool (true/false), got {value!r}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field type `tp`, or raise ConfigError naming `key`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section ({tp.__name__}), got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (dict, typing.Dict) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        ktp, vtp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, ktp, f"{key}.{k}"): _coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, typing.List, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            # `key=[a, b]` is a YAML list; a bare string is one element (prompts may hold commas).
            value = yaml.safe_load(value) if value.startswith("[") else [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (etp,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, etp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        return _parse_bool(value, key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a float, got {value!r}")
    if tp is str:
        if value is None:  # str(None) would silently become the string "None"
            raise ConfigError(f"config key '{key}' expects a string, got null (the field is not Optional)")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}' has an unsupported type {_type_name(tp)}")


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            # Name what the user wrote (`modell.dim`), not just the unknown section (`modell`).
            leaves = ", ".join(f"'{k}'" for k in _leaf_keys(value, f"{prefix}{name}"))
            raise ConfigError(f"unknown config key {leaves}{_closest(str(name), list(fields), prefix)}")
        value = _coerce(value, hints[name], prefix + name)
        allowed = fields[name].metadata.get("choices")
        if allowed and value not in allowed:
            raise ConfigError(f"config key '{prefix}{name}' must be one of {list(allowed)}, got {value!r}")
        kwargs[name] = value
    # Sections not mentioned still need their own defaults merged (not shared instances).
    return cls(**kwargs)


class _Replace(dict):
    """A mapping given whole on the command line: it replaces, not merges."""


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and not isinstance(v, _Replace) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _dotlist_to_dict(items: list[str]) -> dict:
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"command-line argument '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"command-line argument '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            value = raw  # YAML would strip quotes' meaning and trailing spaces from plain strings
        elif isinstance(value, dict):
            value = _Replace(value)
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command-line key '{key}' sets inside '{part}', which is a value")
        node[parts[-1]] = value
    return tree


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data


def from_dict(cls: type[T], values: dict) -> T:
    """Build `cls` from a nested dict with the same strict checks as the CLI."""
    return _build(cls, values)


def to_dict(obj: Any) -> dict:
    return _to_plain(obj)


def _replaced_paths(tree: dict, prefix: str = "") -> list[tuple[str, dict]]:
    """(dotted key, mapping) of every mapping the command line gives whole (`a={b: c}`)."""
    out = []
    for k, v in tree.items():
        if isinstance(v, _Replace):
            out.append((f"{prefix}{k}", dict(v)))
        elif isinstance(v, dict):
            out.extend(_replaced_paths(v, f"{prefix}{k}."))
    return out


def _restrict(full: Any, like: Any) -> Any:
    """The part of `full` at the keys of `like` (the keys the user wrote)."""
    if isinstance(like, dict) and isinstance(full, dict):
        return {k: _restrict(full[k], v) for k, v in like.items()}
    return full


def resolve_layers(values: dict, cli_tree: dict, defaults: Optional[dict] = None, keep_defaults: bool = True) -> dict:
    """OmegaConf.merge(defaults, file values, command line) with `${...}` resolved, as a plain
    dict. The defaults are a layer so that `${name}` finds a key the file does not set; with
    keep_defaults=False only the keys of the file and the command line are returned."""
    layers = [defaults or {}, values, cli_tree]
    try:
        cfg = OmegaConf.merge(*(OmegaConf.create(_to_plain(layer)) for layer in layers))
        for key, mapping in _replaced_paths(cli_tree):
            OmegaConf.update(cfg, key, mapping, merge=False)
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        where = f"config key '{key}': " if key else ""
        raise ConfigError(f"{where}{msg}") from None
    if keep_defaults:
        return resolved
    return _restrict(resolved, _deep_merge(values, cli_tree))


def load_config(cls: type[T], argv: Optional[list[str]] = None, config_file: bool = True) -> T:
    """defaults < `config=path.yaml` < `a.b=c` overrides, all strictly checked. With
    config_file=False, `config=...` is an ordinary key (lingua.stool's `config` field)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    is_file = lambda a: config_file and a.startswith("config=")  # noqa: E731
    config_paths = [a.split("=", 1)[1] for a in argv if is_file(a)]
    overrides = [a for a in argv if not is_file(a)]
    if len(config_paths) > 1:
        raise ConfigError("more than one config=... given")
    values: dict = load_yaml(config_paths[0]) if config_paths else {}
    where = f" (in {config_paths[0]} or the command line)" if config_paths else ""
    try:
        values = resolve_layers(values, _dotlist_to_dict(overrides), defaults=to_dict(cls()))
        return _build(cls, values)
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from None


def load_params(path: Any, cls: type[T], section: Optional[str] = None) -> T:
    """`cls` from a checkpoint's params.json (or its `section`), as strictly as a config file:
    a key `cls` lacks is an error naming it. Meta Lingua's non-strict merge drops such keys, so
    a memory model's checkpoint would load as a plain model without a word."""
    import json

    from lingua.storage import resolve  # storage imports this module

    path = resolve(path)  # a path or an fsspec URL
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read '{path}': {e}") from None
    if section is not None:
        if not isinstance(values, dict) or section not in values:
            raise ConfigError(f"'{path}' has no '{section}' section")
        values = values[section]
    try:
        return _build(cls, values, f"{section}." if section else "")
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path}: written by another version of the code? a key this code does not "
                          "know would be silently lost)") from None


def dump_config(obj: Any, path: Any) -> None:
    """Write `obj` as YAML to `path`: a path, an fsspec URL or a storage path (lingua.storage)."""
    from lingua.storage import resolve, write_text_atomic  # storage imports this module

    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def cli_main(cls: type[T], argv: Optional[list[str]] = None, config_file: bool = True) -> T:
    """load_config for entry points: a ConfigError becomes one clear line and exit code 2."""
    try:
        return load_config(cls, argv, config_file)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
