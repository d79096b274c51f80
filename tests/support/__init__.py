"""What the tests share: the real servers they start (Ceph, nfs-ganesha,
smbd, tgtd, PostgreSQL, network namespaces, small file systems, an FC sysfs
tree) and the helpers that drive agents, stores and the controller. Test
modules import from here (and their fixtures from conftest.py), never from
each other."""
