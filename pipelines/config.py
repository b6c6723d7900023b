"""The one parser that maps YAML files and CLI overrides onto typed job configs.

Every job has one root dataclass config; its defaults live in that dataclass and nowhere else.
`load_config` reads an optional YAML mapping, applies `dotted.key=value` overrides on top, and
builds the dataclass, checking every key and value against the field types. A wrong key or value
fails at start-up with a `ConfigError` that names it (with a "did you mean" for a misspelt key).
An override may replace a YAML value; the same key given twice among the overrides is an error for a
scalar key (an unquoted brace pattern the shell expanded leaves a run with only the last value) and
appends for a list key (`inputs=a.tar inputs=b.tar`). `config_keys` lists every dotted key with its
type, default and meaning (the field's `# comment` in the source), which the CLI's `--help` shows.
Fields marked `secret()` hold a `SecretStr`: its repr and str are "***", so no repr, log line, error
message or stored run state shows the value; `to_dict` writes "***"; only the store client gets
`reveal()`ed values (`dualtok.pipelines.io.storage`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import re
import io
import json
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

T = TypeVar("T")
REDACTED = "***"
# The one message for a job config without a bundle (tokenize, train, audit).
BUNDLE_REQUIRED = ("bundle= is required: a bundle folder/URI, or a preset name (tiny, small, paper) "
                   "for random weights")


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
        data = _read_config_file(path)
    secrets = secret_keys(cls)
    given: dict[str, str] = {}  # dotted key -> the override that set it, as shown in errors
    for item in overrides or []:
        _apply_override(cls, data, item, secrets, given)
    return from_dict(cls, data)


def _read_config_file(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {type(err).__name__}") from None
    loaded = _parse_yaml(text, str(path))
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the config file must be a YAML mapping of keys, got {type(loaded).__name__}")
    return loaded


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


def _apply_override(cls: type, data: dict[str, Any], item: str, secrets: set[str], given: dict[str, str]) -> None:
    shown = next((f"{k}=***" for k in sorted(secrets) if item.strip().startswith(k)), item)  # never a secret value
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {shown!r} must look like key=value (nested keys with dots: a.b=1)")
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {shown!r}: {part!r} is not a section")
        node = child
    if key in secrets:
        value = raw or None
    else:
        value = _parse_yaml(raw, f"override {shown!r}") if raw.strip() else ""
    earlier = next((k for k in given if k == key or k.startswith(key + ".") or key.startswith(k + ".")), None)
    if earlier == key and _is_list(key_type(cls, key)):  # a list key given again appends
        node[parts[-1]] = _as_list(node[parts[-1]]) + _as_list(value)
        return
    if earlier is not None:
        raise ConfigError(
            f"{key} given twice: {given[earlier]!r} and {shown!r}; a key takes one value (list keys append). "
            "Did the shell expand an unquoted {a..b} pattern or glob? Quote it."
        )
    given[key] = shown
    node[parts[-1]] = value


def key_type(cls: Any, key: str) -> Any:
    """The type hint of dotted `key` in dataclass `cls`, or None when there is no such key."""
    tp: Any = cls
    for part in key.split("."):
        tp = _unwrap_optional(tp)
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _is_list(tp: Any) -> bool:
    tp = _unwrap_optional(tp)
    return typing.get_origin(tp) in (list, tuple) or tp in (list, tuple)


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


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
            f"unknown config key {where}{unknown[0]!r}{_did_you_mean(cls, where, unknown[0])}; "
            f"valid keys here: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or 'config'}: {err}") from err


def _did_you_mean(cls: Any, where: str, unknown: str) -> str:
    """A suggestion among every dotted key under `cls`: the same last name in a section
    (batch_size -> encoder.batch_size), else the closest spelling (encoder.batchsize)."""
    keys = [where + k.key for k in config_keys(cls)]
    same_name = [k for k in keys if k.rsplit(".", 1)[-1] == unknown]
    close = same_name or difflib.get_close_matches(where + unknown, keys, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
        elif isinstance(value, (list, tuple)):
            out[f.name] = [to_dict(v, redact) if dataclasses.is_dataclass(v) else v for v in value]
        else:
            out[f.name] = value
    return out


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One dotted key of a config type, as `--help` lists it."""

    key: str
    type_name: str
    default: str  # as it would be written in YAML; "(not shown)" for a secret, "(required)" for none
    meaning: str  # the field's `# comment` in the source, or ""
    is_list: bool
    is_bool: bool


def config_keys(cls: Any, prefix: str = "", defaults: Any = None) -> list[ConfigKey]:
    """Every leaf key of dataclass `cls`, dotted, in declaration order; nested sections take their
    defaults from the parent's default instance (`image: ImageConfig = ImageConfig(...)`)."""
    keys: list[ConfigKey] = []
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in (f for f in dataclasses.fields(cls) if f.init):
        tp = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else _field_default(f)
        if dataclasses.is_dataclass(_unwrap_optional(tp)) and dataclasses.is_dataclass(default):
            keys += config_keys(_unwrap_optional(tp), f"{prefix}{f.name}.", default)
            continue
        shown = "(not shown)" if f.metadata.get("secret") else _show(default)
        keys.append(ConfigKey(prefix + f.name, type_name(tp), shown, comments.get(f.name, ""),
                              _is_list(tp), _unwrap_optional(tp) is bool))
    return keys


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(to_dict(value) if dataclasses.is_dataclass(value) else value, default=str)
    return str(value)


def type_name(tp: Any) -> str:
    """A type hint as a user reads it: `int | null`, `both|guide|semantic`, `list[str]`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if tp is SecretStr:
        return "secret str"
    return getattr(tp, "__name__", str(tp))


_TYPE_IGNORE = re.compile(r"^type:\s*ignore(\[[^\]]*\])?\s*#?\s*")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Each field's meaning: the `# comment` ending its line, else the comment lines just above it,
    read from the source of `cls` and its dataclass bases (a subclass may only change defaults)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_class_comments(klass))
    return comments


def _class_comments(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source (a frozen app, a class made at run time): no meanings
        return {}
    comments: dict[str, str] = {}
    above: list[str] = []
    depth, line_start, current, previous = 0, True, None, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.INDENT, tokenize.DEDENT):
            depth += 1 if tok.type == tokenize.INDENT else -1
            continue
        text = tok.string.lstrip("#").strip() if tok.type == tokenize.COMMENT else ""
        text = _TYPE_IGNORE.sub("", text)  # a checker's pragma is not a meaning
        if tok.type == tokenize.COMMENT and current is not None:
            if text:  # the trailing comment wins over the lines above (and an empty one over nothing)
                comments[current] = text
        elif tok.type == tokenize.COMMENT and line_start and depth == 1:
            above.append(text)
        elif tok.type == tokenize.OP and tok.string == ":" and previous is not None and depth == 1:
            current, previous = previous, None
            if above:
                comments[current] = " ".join(above)
        elif tok.type == tokenize.NEWLINE:
            line_start, current, previous, above = True, None, None, []
        elif tok.type not in (tokenize.NL, tokenize.COMMENT):
            previous = tok.string if (line_start and tok.type == tokenize.NAME) else None
            line_start = False
    return comments
