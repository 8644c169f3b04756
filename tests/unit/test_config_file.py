"""`pxepeer serve --config FILE`: every serve option from TOML, the command line over it,
and every bad file one line and exit 2. Also the JSON log line format."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from peer.cli import main
from peer.config_file import (
    ConfigFileError,
    config_keys,
    config_option,
    config_template,
    load_config,
)
from peer.serve import serve
from pxe.log_format import JsonLineFormatter


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PXEPEER_CONFIG", "PXEPEER_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    # serve configures logging in-process: keep its note for child processes out of
    # the environment later tests start servers in.
    monkeypatch.setenv("PXEPEER_LOG_FORMAT", "text")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pxepeer.toml"
    path.write_text(text)
    return path


def params(*args: str) -> dict:
    """What serve would be called with, without running it."""
    return serve.make_context("serve", list(args)).params


def test_every_long_option_of_serve_is_a_key_named_as_on_the_command_line() -> None:
    keys = config_keys(serve)
    for param in serve.params:
        if isinstance(param, click.Option) and param.name != "config":
            longs = [o[2:] for o in param.opts if o.startswith("--")]
            assert longs and all(keys[k] is param for k in longs), param.name
    assert "config" not in keys and "no-mdns" not in keys
    assert {"cache-dir", "http-port", "peer", "dns-server", "mdns", "log-format"} <= set(keys)


def test_file_values_become_the_options_of_serve(tmp_path: Path) -> None:
    path = write(tmp_path, """
interface = "lan0"
cache-dir = "/srv/cache"
trust = ["/etc/pxepeer/a.pub", "/etc/pxepeer/b.pub"]
http-port = 8081
mdns = false
catalog-poll = 60          # an integer where a number is wanted is fine
offer-check = 2.5
peer = ["10.0.0.2:8080"]
log-format = "json"
""")  # fmt: skip
    got = params("--config", str(path))
    assert got["interface"] == "lan0"
    assert got["cache_dir"] == Path("/srv/cache")
    assert got["trust"] == (Path("/etc/pxepeer/a.pub"), Path("/etc/pxepeer/b.pub"))
    assert got["http_port"] == 8081 and got["mdns"] is False
    assert got["catalog_poll"] == 60.0 and got["offer_check"] == 2.5
    assert got["peers"] == ("10.0.0.2:8080",) and got["log_format"] == "json"
    assert got["tftp_port"] == 69  # not in the file: serve's own default


def test_the_command_line_overrides_the_file_and_a_repeated_option_replaces_its_array(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, 'trust = ["/a.pub", "/b.pub"]\nhttp-port = 8081\nmdns = false\n')
    got = params("--http-port", "9000", "--config", str(path), "--trust", "/c.pub", "--mdns")
    assert got["http_port"] == 9000  # wherever --config stands on the line
    assert got["trust"] == (Path("/c.pub"),)
    assert got["mdns"] is True


def test_an_environment_variable_of_an_option_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, 'trust = ["/a.pub"]\ncache-dir = "/from/file"\n')
    assert params("--config", str(path))["cache_dir"] == Path("/from/file")
    monkeypatch.setenv("PXEPEER_CACHE_DIR", "/from/env")
    assert params("--config", str(path))["cache_dir"] == Path("/from/env")


def test_pxepeer_config_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'trust = ["/a.pub"]\nhttp-port = 8082\n')
    monkeypatch.setenv("PXEPEER_CONFIG", str(path))
    assert params()["http_port"] == 8082


def test_no_file_is_read_unless_named() -> None:
    # /etc/pxepeer/pxepeer.toml may exist on this machine: it must not matter.
    assert params("--trust", "/a.pub")["interface"] is None


def test_a_required_option_may_come_from_the_file_alone(tmp_path: Path) -> None:
    assert params("--config", str(write(tmp_path, 'trust = ["/a.pub"]\n')))["trust"]
    with pytest.raises(click.MissingParameter):
        params("--config", str(write(tmp_path, "http-port = 8081\n")))


@pytest.mark.parametrize(
    "text, reason, message",
    [
        ("cache_dir = '/x'", "unknown_key",
         "unknown key 'cache_dir' (keys are the option names: 'cache-dir')"),
        ("no-mdns = true", "unknown_key", "unknown key 'no-mdns' (write mdns = false)"),
        ("colour = 'blue'", "unknown_key", "unknown key 'colour'"),
        ("http-port = '8080'", "type", "http-port: want an integer, not a string"),
        ("http-port = true", "type", "http-port: want an integer, not a boolean"),
        ("http-port = 8080.5", "type", "http-port: want an integer, not a number"),
        ("http-port = 70000", "value", "http-port: 70000 is not in the range 1<=x<=65535"),
        ("trust = '/a.pub'", "type", "trust: want an array (it may be repeated)"),
        ("trust = ['/a.pub', 3]", "type",
         "trust: want an array of strings, not an array holding an integer"),
        ("mdns = 'no'", "type", "mdns: want a boolean (true or false), not a string"),
        ("interface = 7", "type", "interface: want a string, not an integer"),
        ("dhcp = 'maybe'", "value", "dhcp: 'maybe' is not one of 'proxy', 'full', 'off'"),
        ("[serve]\ninterface = 'lan0'", "unknown_key", "unknown key 'serve'"),
        ("interface = ", "syntax", "not TOML: "),
        ("interface = 'lan0'\ninterface = 'lan1'", "syntax", "not TOML: "),
    ],
)  # fmt: skip
def test_a_bad_file_names_the_key_and_the_problem(
    tmp_path: Path, text: str, reason: str, message: str
) -> None:
    with pytest.raises(ConfigFileError) as caught:
        load_config(write(tmp_path, text), serve)
    assert caught.value.reason == reason
    assert message in caught.value.message, caught.value.message
    assert caught.value.exit_code == 2


def test_unreadable_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="no such file"):
        load_config(tmp_path / "missing.toml", serve)
    with pytest.raises(ConfigFileError, match="is a directory"):
        load_config(tmp_path, serve)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"interface = '\xff'\n")
    with pytest.raises(ConfigFileError, match="not UTF-8"):
        load_config(binary, serve)


@pytest.mark.parametrize(
    "text", ["http-port = 'x'", "nonsense = 1", "= =", None], ids=["type", "key", "toml", "missing"]
)
def test_serve_with_a_bad_file_is_one_line_on_stderr_and_exit_2(
    tmp_path: Path, text: str | None
) -> None:
    path = write(tmp_path, text) if text is not None else tmp_path / "missing.toml"
    cache = tmp_path / "cache"
    result = CliRunner().invoke(
        main, ["serve", "--config", str(path), "--trust", "/a.pub", "--cache-dir", str(cache)]
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pxepeer: error: --config {path}: "), lines
    assert not cache.exists()


def test_an_interface_named_in_the_file_is_named_explicitly(tmp_path: Path) -> None:
    """Network safety: DHCP needs a named interface; the file naming it counts."""
    runner = CliRunner()
    base = ["serve", "--trust", "/a.pub", "--cache-dir", str(tmp_path / "c")]
    no_interface = write(tmp_path, 'dhcp = "proxy"\n')
    result = runner.invoke(main, [*base, "--config", str(no_interface)])
    assert result.exit_code == 2 and "refusing to answer DHCP (proxy) without" in result.stderr
    named = write(tmp_path, 'interface = "nosuch0"\n')
    result = runner.invoke(main, [*base, "--config", str(named)])
    assert result.exit_code == 2
    assert "no network interface named 'nosuch0'" in result.stderr, result.stderr


def test_an_option_added_to_a_command_later_is_a_config_key_with_no_change_here(
    tmp_path: Path,
) -> None:
    @click.command()
    @config_option
    @click.option("--lan-rate", default="0")
    @click.option("--window", type=(int, int), default=(1, 2))
    @click.option("--token-loopback/--no-token-loopback", default=True)
    def cmd(**kw: object) -> None:
        click.echo(json.dumps(kw))

    path = write(tmp_path, 'lan-rate = "5Mbit"\ntoken-loopback = false\n')
    ctx = cmd.make_context("cmd", ["--config", str(path)])
    assert ctx.params["lan_rate"] == "5Mbit" and ctx.params["token_loopback"] is False


def test_the_example_file_names_every_option_and_loads_once_uncommented(tmp_path: Path) -> None:
    template = config_template(serve)
    settings = [line[2:] for line in template.splitlines() if re.match(r"^# [a-z0-9-]+ = ", line)]
    keys = {line.split(" = ")[0] for line in settings}
    assert keys == {k for k, p in config_keys(serve).items() if not p.hidden}
    loaded = load_config(write(tmp_path, "\n".join(settings)), serve)
    assert loaded["http_port"] == 8080 and loaded["cache_dir"] == "/var/lib/pxepeer"
    assert loaded["mdns"] is True and loaded["peers"] == ["HOST:PORT"]


# -- JSON log lines ---------------------------------------------------------------------


def record(message: str, *args: object, exc_info=None) -> logging.LogRecord:
    rec = logging.LogRecord("pxepeer.dhcp", logging.WARNING, __file__, 1, message, args, exc_info)
    rec.created = 1796032800.25  # 2026-11-30T10:00:00.250Z
    return rec


def test_a_json_log_line_has_time_level_logger_and_message() -> None:
    line = JsonLineFormatter().format(record("offer from %s", "10.0.0.9"))
    assert json.loads(line) == {
        "time": "2026-11-30T10:00:00.250Z", "level": "warning", "logger": "pxepeer.dhcp",
        "message": "offer from 10.0.0.9",
    }  # fmt: skip


def test_a_json_log_line_stays_one_line_with_a_traceback_newlines_and_odd_bytes() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    name = b"ker\xffnel".decode("utf-8", "surrogateescape")
    line = JsonLineFormatter().format(record("two\nlines %r", name, exc_info=exc_info))
    assert "\n" not in line and line.isascii()
    doc = json.loads(line)
    assert doc["message"].startswith("two\nlines ")
    assert doc["exception"].startswith("Traceback") and "ValueError: boom" in doc["exception"]
