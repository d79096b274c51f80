"""gRPC over TCP with TLS, mutual TLS, and the bearer token."""

from __future__ import annotations

import grpc

from agent.client import AgentClient

from support.tls import free_port, tls_target
from support.volumes import rpc_error


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
