"""Settings: validated at start-up, bad keys named, secrets never printed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bridge import cli
from bridge.config import load_settings, parse_settings
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


def test_check_config_accepts_the_shipped_examples(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The example reads its secrets from files a Kubernetes pod mounts; stand in for them.
    for key in (
        "KAFKA__SASL_PASSWORD",
        "KAFKA__SSL_CAFILE",
        "VINTER__TOKEN",
        "VINTER__API_KEY",
        "KAIKO__API_KEY",
    ):
        monkeypatch.setenv(f"KAIKO_BRIDGE__{key}", "x")
    root = Path(__file__).resolve().parents[2] / "config"
    for path in sorted(root.glob("*.yaml")):
        assert cli.main(["check-config", str(path)]) == 0, path
    assert "valid" in capsys.readouterr().out


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
