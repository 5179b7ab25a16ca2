"""Config files and dotted overrides for typed dataclass configs (the machinery behind ``t3d.config``).

    cfg = load_config(PretrainConfig, "configs/quickstart.yaml", ["--train.lr", "1e-4", "--crops.size=[64,64,64]"])
    save_config(cfg, run_dir / "config.yaml")

Flat dataclasses (command requests) also become command-line flags, with each field's docstring as its help:

    add_dataclass_arguments(parser, StudyRequest, required=("checkpoint", "out"))
    request = dataclass_from_args(StudyRequest, args)

Unknown keys are errors that list the valid names; values are coerced to the annotated type (tuples from YAML
lists, floats from ints, ``None`` from ``null``/``native``); each dataclass checks itself in ``__post_init__``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key and the valid choices."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type ``tp``; raise ConfigError naming ``key`` when impossible."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "native")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: cannot use {value!r}: " + "; ".join(errors))
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            where = f"in '{prefix}'" if prefix else "at the top level"
            raise ConfigError(f"unknown config key '{dotted}'; valid keys {where}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr", "1e-4", "--crops.size=[64,64,64]"]`` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected a '--section.key value' override, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, float) and raw.strip().lower() in ("nan", "inf", "-inf"):
            raise ConfigError(f"override {arg!r}: non-finite numbers are not allowed")
        _set_dotted(tree, key.replace("-", "_"), value)
    return tree


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- YAML file <- dotted overrides, validated against ``cls``."""
    values: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        values = loaded
    values = _deep_merge(values, parse_overrides(overrides or []))
    try:
        return _build(cls, values)
    except ConfigError as err:
        where = f" (from {path})" if path else ""
        raise ConfigError(f"{err}{where}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the merged config as YAML (atomically: a crash never leaves half a config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Rebuild a config saved by ``to_dict`` (e.g. from a checkpoint)."""
    return _build(cls, values)


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body (one line; empty when there is none)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, required: tuple[str, ...] = (), defaults: dict[str, Any] | None = None
) -> None:
    """One ``--field-name`` flag per field of the flat dataclass ``cls``: its type, default (or ``defaults``' value)
    and docstring as help; fields in ``required`` must be given."""
    docs, hints, defaults = field_docs(cls), typing.get_type_hints(cls), defaults or {}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        help_text = docs.get(f.name, "").rstrip(".").replace("%", "%%")
        if f.name in required:
            parser.add_argument(flag, required=True, help=help_text)
        elif tp is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            kind = tp if tp in (int, float) else str
            default = defaults.get(f.name, f.default)
            shown = f" (default: {default})" if default not in ("", None) else ""
            parser.add_argument(flag, type=kind, default=default, help=help_text + shown)


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass built from the flags ``add_dataclass_arguments`` added (its checks run as usual)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
