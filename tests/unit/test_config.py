"""Settings: validated at start-up, bad keys named, secrets never printed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from bridge import cli
from bridge.config import Settings
from bridge.configfile import load_settings, parse_settings
from bridge.errors import ConfigError

SENTINEL = "s3cr3t-SENTINEL-7f3a"


def test_defaults_are_valid() -> None:
    settings = parse_settings({}, environ={})
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.kafka.topics.dlq == "bridge.dlq"


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"kafka": {"bootstrap_server": "x:1"}}, environ={})
    assert info.value.key == "kafka.bootstrap_server"


def test_bad_value_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"vinter": {"symbols": ["ok-d", "NOPE"]}}, environ={})
    assert info.value.key == "vinter.symbols.1"
    assert "-d, -h or -r" in str(info.value)


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("kafka:\n  bootstrap_servers: a:1\n  partitions: 3\n")
    env = {
        "KAIKO_BRIDGE__KAFKA__BOOTSTRAP_SERVERS": "b:2",
        "KAIKO_BRIDGE__VINTER__SYMBOLS": "[x-d, y-h]",
    }
    settings = load_settings(path, environ=env)
    assert settings.kafka.bootstrap_servers == "b:2"
    assert settings.kafka.partitions == 3
    assert settings.vinter.symbols == ["x-d", "y-h"]


def test_secret_from_file_and_env(tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text(SENTINEL + "\n")
    settings = parse_settings(
        {"vinter": {"token": {"file": str(secret_file)}, "api_key": {"env": "K"}}},
        environ={"K": SENTINEL},
    )
    assert settings.vinter.token is not None
    assert settings.vinter.token.get_secret_value() == SENTINEL
    assert settings.vinter.api_key is not None
    assert settings.vinter.api_key.get_secret_value() == SENTINEL


def test_sasl_needs_credentials() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"kafka": {"security_protocol": "SASL_SSL"}}, environ={})
    assert info.value.key == "kafka"
    assert "sasl_mechanism" in str(info.value)


def test_secrets_never_print(caplog: pytest.LogCaptureFixture) -> None:
    settings = parse_settings(
        {
            "kafka": {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "u",
                "sasl_password": SENTINEL,
            },
            "vinter": {"token": SENTINEL, "api_key": SENTINEL},
            "kaiko": {"api_key": SENTINEL},
        },
        environ={},
    )
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("settings: %s / %r", settings, settings)
        logging.getLogger("test").info("dump: %s", settings.model_dump())
        logging.getLogger("test").info("json: %s", settings.model_dump_json())
    assert SENTINEL not in caplog.text
    assert SENTINEL not in repr(settings) + str(settings)
    assert "**********" in caplog.text


def test_errors_never_echo_a_secret() -> None:
    # A secret given where a mapping belongs: the error must not quote the value.
    with pytest.raises(ConfigError) as info:
        parse_settings({"kafka": {"sasl_password": [SENTINEL]}}, environ={})
    assert SENTINEL not in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_settings({"vinter": {"ws_url": f"wss://h/ws/?token={SENTINEL}"}}, environ={})
    assert SENTINEL not in str(info.value)
    assert info.value.key == "vinter.ws_url"


def test_check_config_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"kafka:\n  partitions: 0\nvinter:\n  token: {SENTINEL}\n")
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "kafka.partitions" in err
    assert SENTINEL not in err


CONFIG = Path(__file__).resolve().parents[2] / "config"


def test_check_config_accepts_the_shipped_examples(capsys: pytest.CaptureFixture[str]) -> None:
    # The example names secret and CA files a Kubernetes pod mounts: its advertised check
    # skips reading them.
    assert cli.main(["check-config", str(CONFIG / "example.yaml"), "--skip-files"]) == 0
    assert "valid (files not read)" in capsys.readouterr().out
    assert cli.main(["check-config", str(CONFIG / "demo.yaml")]) == 0
    assert "valid" in capsys.readouterr().out


def test_check_config_reads_every_file_it_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "ca.pem"
    path = tmp_path / "c.yaml"
    path.write_text(f"kaiko:\n  ca_file: {missing}\n")
    assert cli.main(["check-config", str(path)]) == 2
    assert f"kaiko.ca_file: cannot read {missing}" in capsys.readouterr().err
    path.write_text(f"kafka:\n  ssl_cafile: {tmp_path}\n")  # a directory
    assert cli.main(["check-config", str(path)]) == 2
    assert f"kafka.ssl_cafile: cannot read {tmp_path}" in capsys.readouterr().err
    path.write_text(f"vinter:\n  token: {{file: {missing}}}\n")
    assert cli.main(["check-config", str(path)]) == 2
    assert f"vinter.token: cannot read secret file {missing}" in capsys.readouterr().err
    assert cli.main(["check-config", str(path), "--skip-files"]) == 0


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every setting's dotted key (the sections themselves left out)."""
    out = []
    for name, field in model.model_fields.items():
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            out += _keys(inner, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_the_example_holds_every_key_with_a_comment() -> None:
    text = (CONFIG / "example.yaml").read_text()
    doc = yaml.safe_load(text)
    lines = text.splitlines()
    for dotted in _keys(Settings):
        node = doc
        for part in dotted.split("."):
            assert isinstance(node, dict), dotted
            assert part in node, f"config/example.yaml has no {dotted}"
            node = node[part]
        leaf = dotted.rpartition(".")[2]
        commented = [line for line in lines if line.lstrip().startswith(f"{leaf}:")]
        assert any("#" in line for line in commented), f"{dotted} has no comment"


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("ws://vinter.example.com", "ws_url"),
        ("http://10.0.0.5:8080", "rest_url"),
        ("ws://[2001:db8::1]/", "ws_url"),
    ],
)
def test_a_plaintext_url_beyond_loopback_is_refused_unless_allowed(url: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"vinter": {key: url}}, environ={})
    assert info.value.key == "vinter"
    assert "vinter.allow_insecure" in str(info.value)
    allowed = parse_settings({"vinter": {key: url, "allow_insecure": True}}, environ={})
    assert getattr(allowed.vinter, key) == url.rstrip("/")
    for local in ("ws://127.0.0.1:8765", "ws://localhost:1", "ws://[::1]:2"):
        parse_settings({"vinter": {"ws_url": local}}, environ={})


@pytest.mark.parametrize(
    ("given", "key", "meant"),
    [
        ("wss://h.example/ws/nav", "ws_url", "wss://h.example"),
        ("wss://h.example/ws/nav/", "ws_url", "wss://h.example"),
        ("https://h.example/api/v3", "rest_url", "https://h.example"),
        ("https://proxy.example/vinter/api/v3/", "rest_url", "https://proxy.example/vinter"),
        ("wss://proxy.example:8443/vinter", "ws_url", "wss://proxy.example:8443/vinter"),
    ],
)
def test_a_base_url_with_a_path_means_what_its_writer_meant(
    given: str, key: str, meant: str
) -> None:
    settings = parse_settings({"vinter": {key: given}}, environ={})
    assert getattr(settings.vinter, key) == meant


@pytest.mark.parametrize(
    ("given", "key", "problem"),
    [
        ("https://h.example", "ws_url", "must start with ws:// or wss://"),
        ("wss://h.example", "rest_url", "must start with http:// or https://"),
        ("wss:///ws/nav", "ws_url", "has no host"),
        ("https://h.example:port", "rest_url", "port that is not a number"),
    ],
)
def test_a_base_url_that_cannot_be_meant_is_refused(given: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"vinter": {key: given}}, environ={})
    assert info.value.key == f"vinter.{key}"
    assert problem in str(info.value)


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", environ={})
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(path, environ={})
    path.write_text("kafka: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(path, environ={})


def test_every_problem_is_reported_at_once_with_its_origin(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("kafka:\n  partitions: 0\n  bootstrap_server: x:1\n")
    env = {"KAIKO_BRIDGE__VINTER__PING_INTERVAL_S": "-1"}
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=env)
    assert dict(info.value.problems) == {
        "kafka.partitions": f"Input should be greater than or equal to 1 (from {path})",
        "kafka.bootstrap_server": f"unknown key; did you mean bootstrap_servers? (from {path})",
        "vinter.ping_interval_s": "Input should be greater than 0 "
        "(from environment variable KAIKO_BRIDGE__VINTER__PING_INTERVAL_S)",
    }
    assert str(info.value).startswith("3 problems:\n  kafka.partitions: ")
