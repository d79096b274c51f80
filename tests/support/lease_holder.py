"""Another host's lease holder, as a process a test can SIGKILL:
python -m support.lease_holder DEVICE INDEX HOST_UUID TIMEOUT IO_TIMEOUT [WAIT]

Acquires lease INDEX of the pool on DEVICE, prints "acquired GENERATION"
(or "busy: why"), then renews it until killed."""

import sys
import threading

from agent.errors import Busy
from agent.stores.blockdev import LocalBlockDevice
from agent.volumes.lun.leases import DeltaLease, LeaseKeeper
from agent.volumes.lun.table import PoolLun


def main() -> None:
    dev, index, host, timeout, io_timeout = sys.argv[1:6]
    wait = len(sys.argv) > 6 and sys.argv[6] == "wait"
    lun = PoolLun(LocalBlockDevice(dev, exclusive=False))
    lease = DeltaLease(lun, int(index), host, timeout=float(timeout), io_timeout=float(io_timeout))
    try:
        rec = lease.acquire(wait=wait)
    except Busy as e:
        print(f"busy: {e}", flush=True)
        return
    print(f"acquired {rec.generation}", flush=True)
    keeper = LeaseKeeper(lambda lease, why: print(f"lost: {why}", flush=True))
    keeper.add(lease)
    threading.Event().wait()


if __name__ == "__main__":
    main()
