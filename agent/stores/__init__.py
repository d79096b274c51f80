"""Object stores: where a backup point's repository lives (a directory, an
NFS export, an SMB share, a raw LUN over iSCSI or a local block device),
behind one interface (base.ObjectStore), and the lock objects kept in them.
Below both the repository and the volume drivers: NFS volume pools reuse the
NFS store and its lock objects."""
