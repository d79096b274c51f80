"""Volume drivers: qcow2 on directory pools, RBD on Ceph pools."""
