"""Settings from a YAML file plus environment overrides, validated into `bridge.config`'s
models; every problem reported at once, each with where it came from.

Environment overrides: `KAIKO_BRIDGE__KAFKA__BOOTSTRAP_SERVERS=host:9092` sets
`kafka.bootstrap_servers`; values are read as YAML scalars or flow collections, so
`KAIKO_BRIDGE__VINTER__SYMBOLS='[a-d, b-h]'` gives a list.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bridge.config import Settings
from bridge.errors import ConfigError

ENV_PREFIX = "KAIKO_BRIDGE__"


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The overrides as a tree, and the variable that set each dotted key."""
    tree: dict[str, Any] = {}
    names: dict[str, str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part]
        if not path:
            continue
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(path), f"conflicting environment overrides ({name})")
        try:
            node[path[-1]] = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError:
            node[path[-1]] = raw
        names[".".join(path)] = name
    return tree, names


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _model_at(path: tuple[str, ...]) -> type[BaseModel] | None:
    """The settings model that holds the keys under `path` (None past a leaf)."""
    model: type[BaseModel] = Settings
    for part in path:
        field = model.model_fields.get(part)
        inner = field.annotation if field is not None else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return None
        model = inner
    return model


def _suggestion(loc: tuple[str, ...]) -> str:
    """`; did you mean X?` for an unknown key close to a known one."""
    model = _model_at(loc[:-1])
    if model is None:
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _origin(key: str, env_names: Mapping[str, str], path: Path | str | None) -> str:
    for dotted, name in env_names.items():
        if key == dotted or key.startswith(dotted + "."):
            return f"environment variable {name}"
    return str(path) if path is not None else "the defaults"


def _problems(
    exc: ValidationError, env_names: Mapping[str, str], path: Path | str | None
) -> ConfigError:
    # Never echo input values: they may be secrets.
    problems: list[tuple[str, str]] = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = tuple(str(part) for part in err["loc"])
        key = ".".join(loc)
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key" + _suggestion(loc)
        problems.append((key, f"{message} (from {_origin(key, env_names, path)})"))
    return ConfigError.of(problems)


def parse_settings(
    data: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    *,
    read_files: bool = True,
    path: Path | str | None = None,
) -> Settings:
    """Validate a settings mapping plus environment overrides; raise ConfigError naming every
    bad key and where it came from (`path`, or the variable). `read_files=False` leaves
    secret files unread (a file meant for another machine)."""
    environ = os.environ if environ is None else environ
    overrides, env_names = _env_overrides(environ)
    merged = _merge(dict(data), overrides)
    context = {"environ": environ, "skip_files": not read_files}
    try:
        return Settings.model_validate(merged, context=context)
    except ValidationError as exc:
        raise _problems(exc, env_names, path) from None


def check_files(settings: Settings) -> None:
    """Raise ConfigError naming the first file the settings name that cannot be read (CA
    bundles; secret files are read while the settings are parsed)."""
    for key, path in (
        ("kafka.ssl_cafile", settings.kafka.ssl_cafile),
        ("kaiko.ca_file", settings.kaiko.ca_file),
    ):
        if path is None:
            continue
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


def nothing_to_run(settings: Settings) -> bool:
    """No NAV symbol, VWAP subscription or settlement symbol: the bridge would do nothing."""
    return not (
        settings.vinter.symbols or settings.kaiko.subscriptions or settings.settlement.symbols
    )


def load_settings(
    path: Path | str | None,
    environ: Mapping[str, str] | None = None,
    *,
    read_files: bool = True,
) -> Settings:
    """Load a YAML file (or nothing: defaults plus environment) into validated Settings."""
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError("", f"{path} is not valid YAML{where}") from None
        if not isinstance(data, Mapping):
            raise ConfigError("", f"{path} must hold a mapping at the top level")
    return parse_settings(data, environ, read_files=read_files, path=path)
