"""blockferry: a storage agent for hypervisor hosts."""

__version__ = "0.1.0"
