"""Start-up failures the user fixes: one line naming the setting or resource and what to do.

The CLI prints them as ``funnel-kpi: <message>`` and exits with code 2, without a traceback and
without the value of any secret setting.
"""

from __future__ import annotations

import argparse
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, SecretStr, ValidationError

M = TypeVar("M", bound=BaseModel)


class StartupError(Exception):
    """A setting, file or resource that stops a command from starting."""


def is_secret(model: type[BaseModel], field: str) -> bool:
    """Secret settings are typed ``SecretStr`` (alone or in a union)."""
    info = model.model_fields.get(field)
    if info is None:
        return False
    annotation = info.annotation
    return annotation is SecretStr or SecretStr in get_args(annotation)


def env_name(model: type[BaseModel], field: str) -> str:
    prefix = model.model_config.get("env_prefix", "")
    return f"{prefix}{field}".upper()


def shown_default(model: type[BaseModel], field: str) -> str:
    """A setting's default as ``--help`` shows it: ``unset`` rather than a Python ``None`` or ``{}``,
    ``on``/``off`` for a switch."""
    default = model.model_fields[field].get_default(call_default_factory=True)
    if default is None or default == {} or default == []:
        return "unset"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def add_setting_flag(group: argparse._ArgumentGroup, model: type[BaseModel], field: str) -> None:
    """``--<field>`` overriding ``FUNNEL_<FIELD>``; a boolean is a switch (``--x`` / ``--no-x``),
    never a flag that takes a value. Unset flags are ``None``: the environment then decides."""
    if is_secret(model, field):
        raise ValueError(f"{field} is a secret: no flag")
    info = model.model_fields[field]
    flag, variable = f"--{field.replace('_', '-')}", env_name(model, field)
    if info.annotation is bool:
        group.add_argument(flag, dest=field, default=None, action=argparse.BooleanOptionalAction,
                           help=f"{info.description} [env {variable}=true|false, "
                           f"default {shown_default(model, field)}]")
        return
    group.add_argument(flag, dest=field, default=None, metavar="VALUE",
                       help=f"{info.description} [env {variable}, default {shown_default(model, field)}]")


def add_setting_flags(parser: argparse.ArgumentParser, model: type[BaseModel], names: list[str],
                      title: str) -> None:
    """A group of :func:`add_setting_flag` flags."""
    group = parser.add_argument_group(title)
    for name in names:
        add_setting_flag(group, model, name)


def from_flags(model: type[M], args: argparse.Namespace) -> M:
    """``model`` from the environment and the flags given (an unset flag is None)."""
    return load_settings(model, **{name: value for name, value in vars(args).items()
                                   if name in model.model_fields and value is not None})


def settings_error(exc: ValidationError, model: type[BaseModel]) -> StartupError:
    """One line for every invalid setting: its variable, the value unless secret, the reason."""
    problems = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        name = env_name(model, field) if field else model.__name__
        shown = _shown_input(error.get("input"))
        value = "" if is_secret(model, field) or shown is None else f"={shown}"
        problems.append(f"{name}{value}: {error['msg']}")
    return StartupError("invalid setting " + "; ".join(problems)
                        + " (fix the environment variable, its flag, or for a secret its _FILE)")


def _shown_input(value: Any) -> str | None:
    """The offending input if it is a plain value (not the whole settings mapping)."""
    if isinstance(value, (str, int, float, bool)):
        return repr(value)
    return None


def load_settings(model: type[M], **overrides: Any) -> M:
    """``model(**overrides)`` (flags), reading the environment; invalid: :class:`StartupError`."""
    try:
        return model(**overrides)
    except ValidationError as exc:
        raise settings_error(exc, model) from None
