"""RBD volumes: the driver (driver.py) over one shared cluster connection
(connection.py), aio readers (reader.py) and writers with the restore
targets (writers.py). The rados and rbd bindings load only when an RBD pool
is used (agent/pools.py imports this package lazily)."""

from agent.volumes.rbd.driver import RbdPool

__all__ = ["RbdPool"]
