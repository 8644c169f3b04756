"""`serve --config FILE`: a TOML file that holds `pxepeer serve` options.

The accepted keys are not listed here: they are read off the click command's own
options, so an option added to `serve` later is a config key at once. A key is the long
option name without its leading dashes, exactly as typed on the command line
(`cache-dir`, `http-port`, `peer`, `dns-server`, `mdns`); a repeatable option is a TOML
array, an on/off flag a boolean. The file fills click's `default_map`, so anything on
the command line (or in an option's environment variable) wins over the file, and a
repeatable option given on the command line replaces the file's whole array.

There is no implicit default path: the file is read only when named by `--config` or
PXEPEER_CONFIG. A bare `pxepeer serve` on a machine that happens to have
/etc/pxepeer/pxepeer.toml must not start answering DHCP on the interface that file names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

DEFAULT_PATH = Path("/etc/pxepeer/pxepeer.toml")
ENV_VAR = "PXEPEER_CONFIG"
MAX_BYTES = 1024 * 1024  # a config file is a few KiB; a huge one is a mistake
SKIPPED = {"config", "help", "version"}  # options that make no sense inside the file

F = TypeVar("F", bound=Callable[..., Any])


class ConfigFileError(click.ClickException):
    """A config file that cannot be used: one line on stderr and exit code 2, like every
    other bad input of the CLI."""

    exit_code = 2

    def __init__(self, path: Path, reason: str, detail: str):
        super().__init__(f"--config {path}: {detail}")
        self.reason = reason  # short and fixed: "unreadable", "syntax", "unknown_key", ...


def config_keys(command: click.Command) -> dict[str, click.Option]:
    """Every config key of `command` -> its option: the long option names, dashes dropped."""
    keys: dict[str, click.Option] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in SKIPPED:
            continue
        for opt in param.opts:  # not secondary_opts: `mdns = false`, never `no-mdns = true`
            if opt.startswith("--"):
                keys[opt[2:]] = param
    return keys


def _kind(param: click.Option) -> tuple[tuple[type, ...], str, str]:
    """The TOML value types an option takes (one element of it when repeatable), and
    their names for an error: singular, plural."""
    if (param.is_flag and param.is_bool_flag) or isinstance(param.type, click.types.BoolParamType):
        return (bool,), "a boolean (true or false)", "booleans"
    t = param.type
    if isinstance(t, click.types.IntParamType):
        return (int,), "an integer", "integers"
    if isinstance(t, click.types.FloatParamType):
        return (int, float), "a number", "numbers"
    if isinstance(t, (click.types.StringParamType, click.Path, click.Choice, click.File)):
        return (str,), "a string", "strings"
    # A type someone adds later (say a rate schedule): any TOML scalar, and the type's
    # own convert() below says whether it fits.
    return (str, int, float, bool), "a string or a number", "strings or numbers"


def _check_value(
    ctx: click.Context, path: Path, key: str, param: click.Option, value: Any
) -> None:
    types, wanted, plural = _kind(param)
    if param.multiple:
        if not isinstance(value, list):
            raise ConfigFileError(
                path, "type", f"{key}: want an array (it may be repeated), e.g. {key} = [...]"
            )
        items = value
        wanted = f"an array of {plural}"
    else:
        items = [value]
    for item in items:
        # bool is an int in Python; `http-port = true` is still a mistake.
        if not isinstance(item, types) or (isinstance(item, bool) and bool not in types):
            got = f"an array holding {_toml_type(item)}" if param.multiple else _toml_type(item)
            raise ConfigFileError(path, "type", f"{key}: want {wanted}, not {got}")
        try:
            param.type.convert(item, param, ctx)
        except click.BadParameter as exc:
            raise ConfigFileError(path, "value", f"{key}: {exc.message}") from None


def _toml_type(value: Any) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "an array", dict: "a table",
    }.get(type(value), f"a {type(value).__name__}")  # fmt: skip


def load_config(path: Path, command: click.Command, ctx: click.Context | None = None) -> dict:
    """The file's values as a `default_map` for `command` (keyed by parameter name).

    Raises ConfigFileError for an unreadable file, bad TOML, an unknown key or a value
    of the wrong type or out of range."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigFileError(path, "unreadable", "no such file") from None
    except IsADirectoryError:
        raise ConfigFileError(path, "unreadable", "is a directory, not a file") from None
    except OSError as exc:
        raise ConfigFileError(path, "unreadable", exc.strerror or str(exc)) from None
    if len(data) > MAX_BYTES:
        raise ConfigFileError(path, "too_big", f"larger than {MAX_BYTES} bytes")
    import tomllib  # here: every pxepeer command starts, few read a config file

    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigFileError(path, "syntax", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(path, "syntax", f"not TOML: {exc}") from None

    ctx = ctx or click.Context(command)
    keys = config_keys(command)
    default_map: dict[str, Any] = {}
    given: dict[str, str] = {}  # parameter name -> the key that set it
    for key, value in doc.items():
        param = keys.get(key)
        if param is None:
            raise ConfigFileError(path, "unknown_key", _unknown(key, keys))
        assert param.name is not None
        if param.name in given:
            raise ConfigFileError(
                path, "duplicate", f"{key} and {given[param.name]} are the same option"
            )
        _check_value(ctx, path, key, param, value)
        given[param.name] = key
        default_map[param.name] = value
    return default_map


def _unknown(key: str, keys: dict[str, click.Option]) -> str:
    dashed = key.replace("_", "-").removeprefix("--")
    if dashed in keys:
        return f"unknown key {key!r} (keys are the option names: {dashed!r})"
    if dashed.startswith("no-") and dashed[3:] in keys:
        return f"unknown key {key!r} (write {dashed[3:]} = false)"
    return f"unknown key {key!r} (keys are the long option names of 'pxepeer serve --help')"


def _apply(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """Eager callback of --config: runs before any other option is resolved, so the
    file's values are in place as their defaults."""
    if value is None:
        return None
    loaded = load_config(value, ctx.command, ctx)
    ctx.default_map = {**(ctx.default_map or {}), **loaded}
    return value


def config_option(func: F) -> F:
    """Add --config FILE (or PXEPEER_CONFIG) to a click command."""
    return click.option(
        "--config",
        "config",
        type=click.Path(dir_okay=True, path_type=Path),
        envvar=ENV_VAR,
        is_eager=True,
        expose_value=False,
        callback=_apply,
        metavar="FILE",
        help=f"TOML file of these options (e.g. {DEFAULT_PATH}; also {ENV_VAR}): keys are "
        "the long option names (cache-dir, http-port), repeatable options arrays, flags "
        "booleans. The command line overrides it. Read only when named.",
    )(func)


# -- the example file -------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _example(ctx: click.Context, param: click.Option) -> Any:
    """The option's default, or a placeholder of its type when it has none."""
    default = param.get_default(ctx, call=True)
    if isinstance(default, (bool, int, float, str, Path)):
        return default
    if isinstance(default, (list, tuple)) and default:
        return list(default)
    types, _, _ = _kind(param)
    if isinstance(param.type, click.Choice):
        sample: Any = param.type.choices[0]
    elif bool in types and len(types) == 1:
        sample = False
    elif int in types and str not in types:
        low = getattr(param.type, "min", None)
        sample = low if low is not None else 0
    else:
        sample = param.metavar or param.name.upper() if param.name else "VALUE"
    return [sample] if param.multiple else sample


def _help_lines(param: click.Option) -> Iterator[str]:
    words = (param.help or "").split()
    line = "#"
    for word in words:
        if len(line) + 1 + len(word) > 88 and line != "#":
            yield line
            line = "#"
        line += " " + word
    if line != "#":
        yield line


def config_template(command: click.Command) -> str:
    """An example config file naming every option of `command`, each commented out with
    its help and its default (or a placeholder): the file install-service writes."""
    ctx = click.Context(command)
    out = [
        "# pxepeer serve configuration (TOML). `pxepeer serve --config THIS_FILE` reads it.",
        "# Keys are the long option names of `pxepeer serve --help` without the dashes;",
        "# repeatable options are arrays, flags true/false. Options on the command line",
        "# (and environment variables such as PXEPEER_CACHE_DIR) override this file.",
        "# Naming `interface` here is naming it explicitly: the peer answers PXE (DHCP) on it.",
        "",
    ]
    for key, param in config_keys(command).items():
        if param.hidden:
            continue
        out.extend(_help_lines(param))
        if isinstance(param.type, click.Choice):
            out.append("# one of: " + ", ".join(map(str, param.type.choices)))
        out.append(f"# {key} = {_toml_value(_example(ctx, param))}")
        out.append("")
    return "\n".join(out)
