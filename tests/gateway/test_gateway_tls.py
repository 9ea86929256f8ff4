"""The gateway serving HTTPS itself (tls_cert_file/tls_key_file), for apps on other machines with nothing in front."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import httpx
import openai
import pytest

from sovereign.errors import SovereignError
from tests.gateway.conftest import start_gateway_process, write_gateway_config


def self_signed(tmp_path: Path, name: str = "gateway") -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as an IT department's CA would issue them (here signed by itself)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sovereign-gateway")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_the_gateway_serves_https_to_the_openai_sdk_and_refuses_plain_http(tmp_path, upstream):
    cert, key = self_signed(tmp_path)
    config = write_gateway_config(tmp_path / "gateway.yaml", models={"fake-model": [upstream.url]},
                                  database_url=f"sqlite:///{tmp_path / 'gateway.db'}",
                                  tls_cert_file=str(cert), tls_key_file=str(key))
    gw = start_gateway_process(config, tmp_path, name="tls-gateway", tls_ca=cert)
    try:
        assert gw.url.startswith("https://")
        secret = gw.make_key("apps")
        client = gw.client(secret)  # trusting the certificate, as an app given the company's CA would
        answer = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
        assert [c.choices for c in client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True)]
        with pytest.raises(openai.APIConnectionError):  # a client that does not trust the certificate
            openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0).models.list()
        with pytest.raises(httpx.HTTPError):  # nothing is served in the clear on that port
            httpx.get(gw.url.replace("https://", "http://") + "/healthz", timeout=5)
    finally:
        gw.stop()


def test_a_half_or_mismatched_tls_configuration_is_refused_at_load_naming_the_files(tmp_path):
    from gateway.config import load_gateway_config

    cert, key = self_signed(tmp_path)
    _, other_key = self_signed(tmp_path, "other")
    half = write_gateway_config(tmp_path / "half.yaml", tls_cert_file=str(cert))
    with pytest.raises(SovereignError, match="tls_key_file is missing"):
        load_gateway_config(str(half))
    wrong = write_gateway_config(tmp_path / "wrong.yaml", tls_cert_file=str(cert), tls_key_file=str(other_key))
    with pytest.raises(SovereignError, match="other.key") as refused:
        load_gateway_config(str(wrong))
    assert "key values mismatch" in str(refused.value).lower()
