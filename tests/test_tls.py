"""gRPC over TCP with TLS, mutual TLS, and the bearer token."""
from __future__ import annotations

import datetime
import socket

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from test_qcow2 import rpc_error
from agent.client import AgentClient, Target


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer_key, issuer_name, key, *, ca: bool, san: str | None = None):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)


@pytest.fixture
def pki(short_tmp):
    d = short_tmp / "pki"
    d.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("blockferry test CA", ca_key, _name("blockferry test CA"), ca_key, ca=True)
    _write(d / "ca.pem", cert=ca)
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(who, ca_key, ca.subject, key, ca=False, san="localhost")
        _write(d / f"{who}.pem", cert=cert)
        _write(d / f"{who}.key", key=key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("other CA", other_key, _name("other CA"), other_key, ca=True)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "rogue.pem", cert=_cert("rogue", other_key, other.subject, rogue_key, ca=False, san="localhost"))
    _write(d / "rogue.key", key=rogue_key)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_target(port, pki, who=None, token=None) -> Target:
    return Target(address=f"localhost:{port}", tls_ca=str(pki / "ca.pem"),
                  tls_cert=str(pki / f"{who}.pem") if who else None,
                  tls_key=str(pki / f"{who}.key") if who else None, token=token)


def test_mutual_tls(make_agent, pki):
    port = free_port()
    a = make_agent(f"""tcp_listen = "localhost:{port}"
tls_cert = "{pki}/server.pem"
tls_key = "{pki}/server.key"
tls_client_ca = "{pki}/ca.pem"
""").start()
    with AgentClient(tls_target(port, pki, "client")) as c:
        assert c.host_info().version
    for who in (None, "rogue"):  # no client certificate, or one from another CA
        with AgentClient(tls_target(port, pki, who)) as c:
            e = rpc_error(lambda: c.host_info())
            assert e.code() == grpc.StatusCode.UNAVAILABLE
    assert a.stop() == 0


def test_tls_with_bearer_token(make_agent, pki):
    port = free_port()
    a = make_agent(f"""tcp_listen = "localhost:{port}"
tls_cert = "{pki}/server.pem"
tls_key = "{pki}/server.key"
auth_token = "tok-123456"
""").start()
    with AgentClient(tls_target(port, pki, token="tok-123456")) as c:
        assert c.host_info().version
        assert c.list() == []
    for token in (None, "wrong"):
        with AgentClient(tls_target(port, pki, token=token)) as c:
            e = rpc_error(lambda: c.host_info())
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    # the unix socket is authorised by its file permissions
    with a.client() as c:
        assert c.host_info().version
    assert a.stop() == 0
    assert "tok-123456" not in a.log_text()
