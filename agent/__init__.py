"""blockferry: a storage agent for hypervisor hosts."""

__version__ = "0.1.0"

# The agent's gRPC API level. Bump it when the controller must know that an
# agent has a new RPC or a new field with meaning (never for additions an
# older controller may ignore); the controller refuses agents below its
# registry.MIN_AGENT_API_LEVEL. The wire rules are in docs/development.md ("Proto
# compatibility") and tests/test_proto_compat.py holds them.
API_LEVEL = 1
