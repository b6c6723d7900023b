"""The one parser that maps YAML files and CLI overrides onto typed job configs.

Every job has one root dataclass config; its defaults live in that dataclass and nowhere else.
`load_config` reads an optional YAML mapping, applies `dotted.key=value` overrides on top, and
builds the dataclass, checking every key and value against the field types. A wrong key or value
fails at start-up with a `ConfigError` that names it. Fields marked `secret()` hold a `SecretStr`:
its repr and str are "***", so no repr, log line, error message or stored run state shows the value;
`to_dict` writes "***"; only the store client gets `reveal()`ed values (`pipelines.storage`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

T = TypeVar("T")
REDACTED = "***"


class ConfigError(ValueError):
    """A config key or value that does not fit the job's config type."""


class SecretStr:
    """A credential. Dataclass reprs, dict reprs, f-strings and Ray Train's stored run state all
    go through repr/str, which show "***"; `reveal()` is the one way to the value. It pickles
    whole (Ray ships it to workers) and equals a SecretStr or str holding the same value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a SecretStr holds a string, not a {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return REDACTED

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SecretStr):
            return self._value == other._value
        return self._value == other if isinstance(other, str) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return SecretStr, (self._value,)


def secret(default: Any = None) -> Any:
    """A dataclass field typed `SecretStr | None` whose value is never written out (credentials)."""
    return dataclasses.field(default=default, metadata={"secret": True}, repr=False)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from a YAML file (optional) plus `a.b=value` overrides (YAML-typed values;
    a secret key's value is taken verbatim, so that YAML never retypes or echoes it)."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = _parse_yaml(text, str(path))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config file must be a YAML mapping, got {type(loaded).__name__}")
        data = loaded
    secrets = secret_keys(cls)
    for item in overrides or []:
        _apply_override(data, item, secrets)
    return from_dict(cls, data)


def secret_keys(cls: Any, prefix: str = "") -> set[str]:
    """The dotted keys of `cls`'s secret fields (e.g. 'storage.secret')."""
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("secret"):
            keys.add(prefix + f.name)
        elif dataclasses.is_dataclass(hints.get(f.name)):
            keys |= secret_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def _apply_override(data: dict[str, Any], item: str, secrets: set[str]) -> None:
    shown = next((f"{k}=***" for k in sorted(secrets) if item.strip().startswith(k)), item)  # never a secret value
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {shown!r} must look like key=value (nested keys with dots: a.b=1)")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {shown!r}: {part!r} is not a section")
        node = child
    if key.strip() in secrets:
        node[parts[-1]] = raw or None
    else:
        node[parts[-1]] = _parse_yaml(raw, f"override {shown!r}") if raw.strip() else ""


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        hint = " (quote values with {, [, : or #, e.g. 'inputs=[\"s3://b/{00000..00009}.tar\"]')"
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(err)}{hint}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's message without its snippet of the text: the line may hold a credential."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return type(err).__name__
    context = f"{err.context}, " if getattr(err, "context", None) else ""
    return f"{context}{err.problem} (line {mark.line + 1}, column {mark.column + 1})"


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and mistyped values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!r}; valid keys here: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or 'config'}: {err}") from err


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, f"{key}.")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = [value]  # a single item where a list is expected, e.g. inputs=s3://b/x.tar
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return _coerce_scalar(tp, value, key)


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:
        return value
    if tp is SecretStr:
        if isinstance(value, (str, SecretStr)):
            return value if isinstance(value, SecretStr) else SecretStr(value)
        raise ConfigError(f"{key}: expected a string, got a {type(value).__name__} (quote it; the value is not shown)")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def to_dict(config: Any, redact: bool = True) -> dict[str, Any]:
    """The resolved config as plain data, secrets replaced by '***' (what outputs record)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, SecretStr) or (f.metadata.get("secret") and value):
            out[f.name] = REDACTED if redact else getattr(value, "reveal", lambda: value)()
        elif dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value, redact)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out
