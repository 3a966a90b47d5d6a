"""Mutual TLS on the stage channel: a peer with a certificate of the channel CA is served,
a plain TCP peer or one from another CA is not, and the token still applies inside."""
from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import pytest
import torch

from offramp import errors
from offramp.deployments.channel import StageClient, StageServer
from offramp.deployments.config import AppArgs, ChannelTLS
from offramp.errors import ConfigError
from offramp.ops.worker import StepRow

from test_split_moves import _worker


def _ca_and_cert(root: Path, name: str) -> ChannelTLS:
    """A CA and one certificate it signed (what cert-manager puts in a Secret)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    root.mkdir(parents=True, exist_ok=True)

    def build(subject, issuer, key, sign_key, ca: bool):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(sign_key, hashes.SHA256()))

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} channel CA")])
    ca = build(ca_name, ca_name, ca_key, ca_key, True)
    cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} stage")]), ca_name, key, ca_key, False)
    pem = serialization.Encoding.PEM
    (root / "ca.crt").write_bytes(ca.public_bytes(pem))
    (root / "tls.crt").write_bytes(cert.public_bytes(pem))
    (root / "tls.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return ChannelTLS(cert_file=str(root / "tls.crt"), key_file=str(root / "tls.key"), ca_file=str(root / "ca.crt"))


async def _step(port: int, token: str, ssl_context) -> int:
    client = StageClient("127.0.0.1", port, token, label="stage 1", ssl_context=ssl_context)
    try:
        res = await client.step([StepRow("s", torch.tensor([5, 9]), 1)], timeout=5)
        await client.release(["s"])
        return len(res)
    finally:
        client.close()


def test_stage_channel_mutual_tls(tiny_model_dir, tmp_path):
    ours, theirs = _ca_and_cert(tmp_path / "ours", "ours"), _ca_and_cert(tmp_path / "theirs", "theirs")
    srv = StageServer(_worker(tiny_model_dir, (0, 2), 0, 2), "tok", batch_wait_timeout_s=0.0,
                      ssl_context=ours.server_context())
    try:
        assert asyncio.run(_step(srv.port, "tok", ours.client_context())) == 1
        # a certificate from another CA, and plain TCP, never reach the worker
        with pytest.raises(errors.StageUnavailable, match="TLS"):
            asyncio.run(_step(srv.port, "tok", theirs.client_context()))
        with pytest.raises((errors.StageUnavailable, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError)):
            asyncio.run(_step(srv.port, "tok", None))
        # inside TLS the channel token still applies
        with pytest.raises(errors.StageUnavailable, match="refused"):
            asyncio.run(_step(srv.port, "wrong", ours.client_context()))
        assert asyncio.run(_step(srv.port, "tok", ours.client_context())) == 1  # still serving
        assert srv.health() is None
    finally:
        srv.close()


def test_channel_tls_config_names_the_fix(tmp_path):
    args = AppArgs.model_validate({"channel_tls": {"cert_file": str(tmp_path / "no.crt"),
                                                   "key_file": str(tmp_path / "no.key"),
                                                   "ca_file": str(tmp_path / "ca.crt")}})
    with pytest.raises(ConfigError, match="channel_tls.cert_file.*Secret"):
        args.channel_tls.server_context()
    with pytest.raises(ValueError, match="ca_file"):
        AppArgs.model_validate({"channel_tls": {"cert_file": "a", "key_file": "b"}})
