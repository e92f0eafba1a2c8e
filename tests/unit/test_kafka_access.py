"""Kafka connection failures: which ones are configuration errors, and what they say."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    NodeNotReadyError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from bridge import cli
from bridge.config import KafkaSettings
from bridge.errors import ConfigError
from bridge.kafka import access_error, client_kwargs
from bridgedev.sim.tls import TestCA

PASSWORD = "kafka-pass-SENTINEL-4e1a"
ADDRESS = "broker-1:9093"


def sasl_ssl(**override: object) -> KafkaSettings:
    fields: dict[str, object] = {
        "bootstrap_servers": ADDRESS,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "bridge",
        "sasl_password": PASSWORD,
    }
    return KafkaSettings.model_validate({**fields, **override})


def verify_failure() -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify")
    exc.verify_message = "unable to get local issuer certificate"
    return exc


@pytest.mark.parametrize(
    ("exc", "key", "says"),
    [
        (
            SaslAuthenticationFailed("Authentication failed due to invalid credentials"),
            "kafka.sasl_password",
            ["user 'bridge'", "SCRAM-SHA-512", "kafka.sasl_username", "invalid credentials"],
        ),
        (
            UnsupportedSaslMechanismError(
                "Kafka broker does not support SCRAM-SHA-512 sasl mechanism. "
                "Enabled mechanisms are: ['PLAIN']"
            ),
            "kafka.sasl_mechanism",
            ["SCRAM-SHA-512", "it offers ['PLAIN']"],
        ),
        (IllegalSaslStateError(), "kafka.security_protocol", ["SASL_SSL"]),
        (verify_failure(), "kafka.ssl_cafile", ["unable to get local issuer certificate"]),
    ],
)
def test_refusals_name_the_setting(exc: BaseException, key: str, says: list[str]) -> None:
    error = access_error(sasl_ssl(), ADDRESS, exc)
    assert isinstance(error, ConfigError)
    assert error.key == key
    assert str(error).startswith(f"{key}: ")
    for part in [ADDRESS, *says]:
        assert part in str(error)
    assert PASSWORD not in str(error)


@pytest.mark.parametrize(
    "exc",
    [
        KafkaConnectionError("Unable to bootstrap from [('broker-1', 9093)]"),
        NodeNotReadyError("not ready"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
    ],
)
def test_transient_failures_are_retried(exc: BaseException) -> None:
    assert access_error(sasl_ssl(), ADDRESS, exc) is None


def test_a_password_echoed_by_a_broker_is_masked() -> None:
    error = access_error(sasl_ssl(), ADDRESS, SaslAuthenticationFailed(f"bad {PASSWORD}"))
    assert error is not None
    assert PASSWORD not in str(error)
    assert "bad ***" in str(error)


def test_the_ca_file_is_trusted_and_host_names_checked(tmp_path: Path) -> None:
    ca = TestCA().write_ca(tmp_path / "ca.pem")
    kwargs = client_kwargs(sasl_ssl(ssl_cafile=ca))
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert len(context.get_ca_certs()) == 1  # ours, not the system roots
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_password"] == PASSWORD


@pytest.mark.parametrize(
    ("content", "reason"), [(None, "No such file"), (b"not a certificate\n", "")]
)
def test_an_unusable_ca_file_is_a_config_error(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        client_kwargs(sasl_ssl(ssl_cafile=path))
    assert caught.value.key == "kafka.ssl_cafile"
    assert str(path) in str(caught.value)
    assert reason in str(caught.value)


def test_cli_exits_2_naming_the_ca_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` with a CA file that is not there stops before any connection, exit 2."""
    monkeypatch.setenv("KAFKA_PASSWORD", PASSWORD)
    config = tmp_path / "config.yaml"
    config.write_text(
        "kafka:\n"
        "  bootstrap_servers: 127.0.0.1:1\n"
        "  security_protocol: SASL_SSL\n"
        "  sasl_mechanism: SCRAM-SHA-512\n"
        "  sasl_username: bridge\n"
        "  sasl_password: {env: KAFKA_PASSWORD}\n"
        f"  ssl_cafile: {tmp_path / 'missing.pem'}\n"
        "ops: {host: 127.0.0.1, port: 0}\n"
        "log_level: DEBUG\n"
    )
    root, aiokafka = logging.getLogger(), logging.getLogger("aiokafka")
    handlers, level, aiokafka_level = root.handlers[:], root.level, aiokafka.level
    try:
        assert cli.main(["run", "--config", str(config)]) == cli.EXIT_CONFIG
    finally:  # `run` configures logging for the process; give the test session its own back
        root.handlers[:] = handlers
        root.setLevel(level)
        aiokafka.setLevel(aiokafka_level)
    out = capsys.readouterr()
    assert "invalid configuration: kafka.ssl_cafile: cannot read" in out.err
    assert PASSWORD not in out.out + out.err
