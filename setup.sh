#!/usr/bin/env bash
# blockferry setup: installs every Debian package and every Python package the
# project needs on a fresh Debian 12 machine, into ./.venv.
#
# Both README commands call this script. It is idempotent: a second run only
# re-checks and re-installs the project itself.
#
#   ./setup.sh            install everything (needs root for apt)
#   PYTHON=python3.11 ./setup.sh   pick the interpreter (must be CPython 3.11)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
venv="${BLOCKFERRY_VENV:-$here/.venv}"
log() { printf '[setup] %s\n' "$*" >&2; }

# Debian packages. Grouped by what needs them; keep this list the only one.
apt_packages=(
    # build: the C extension agent._native
    gcc libc6-dev pkg-config libssl-dev libxxhash-dev libzstd-dev
    # Python bindings that exist only in Debian (linked into the venv below)
    python3-rados python3-rbd python3-libnbd python3-libvirt
    # qcow2 volumes: qemu-img, qemu-nbd; nbdcopy; setpriv (util-linux)
    qemu-utils libnbd-bin util-linux
    # read-only NBD exports of backups: nbdkit with its python plugin;
    # backups opened on the host (blockferry backups mount/files/extract):
    # nbdfuse (libnbd-bin) with fuse3, blkid/partx/mount (util-linux), and
    # the tests partition and format their disks with sfdisk and mkfs.xfs
    nbdkit nbdkit-plugin-python fuse3 fdisk xfsprogs
    # Ceph RBD: the test cluster (mon, osd, mgr) and the ceph/rbd CLIs;
    # its S3 gateway for S3 backup points, and s3cmd, which the tests read
    # back with (another S3 client than ours)
    ceph-mon ceph-osd ceph-mgr ceph-common radosgw s3cmd
    # systemd-analyze verify for the unit tests
    systemd
    # remote backup points in user space: libnfs (NFSv3) and libiscsi for the
    # C extension, plus their CLIs the tests read back with
    libnfs-dev libnfs-utils libiscsi-dev libiscsi-bin
    # running VMs: qemu-system for live snapshots and backups through QMP
    # (the tests start VMs without a guest OS, under KVM or TCG)
    qemu-system-x86
    # VMs a libvirtd manages (the tests run a session-mode libvirtd)
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
    # a VM's TPM state kept with its backups: the tests' VMs (and libvirt's) get a real swtpm
    swtpm swtpm-tools
    # the real guest of the freeze test: its ext4 data disk, checked on the host
    e2fsprogs
    # qemu's nfs:// driver for NFS volume pools (and its iscsi:// driver for
    # the targets bench peer)
    qemu-block-extra
    # test servers: nfs-ganesha + rpcbind, smbd (+ smbclient), tgtd
    nfs-ganesha nfs-ganesha-vfs rpcbind samba smbclient tgt
    # the controller's optional PostgreSQL backend (the tests start a server)
    postgresql
    # promtool: the tests check both daemons' metrics, the shipped alert
    # rules and their unit tests (contrib/prometheus/)
    prometheus
    # the controller's status page, opened by the tests in a real headless browser
    chromium chromium-driver
    # IANA time zones for policy retention (python's zoneinfo reads them)
    tzdata
    # the Ansible roles' test deploys to this machine with Debian's python3
    # (tests/test_ansible.py): its venv module, and apt for the apt module
    python3 python3-venv python3-apt python3-setuptools openssl
)

need_apt=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_apt+=("$p")
done

# Interpreter: CPython 3.11 only (the Debian bindings are built for its ABI).
py="${PYTHON:-}"
if [ -z "$py" ]; then
    for cand in python3.11 python3 /usr/bin/python3.11; do
        if command -v "$cand" >/dev/null 2>&1 &&
           "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            py=$(command -v "$cand"); break
        fi
    done
fi
if [ -z "$py" ]; then
    need_apt+=(python3.11 python3.11-venv python3.11-dev)
    py=/usr/bin/python3.11
elif ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
    need_apt+=(python3.11-venv)
fi
if [ "$py" = /usr/bin/python3.11 ] && [ ! -e /usr/include/python3.11/Python.h ]; then
    need_apt+=(python3.11-dev)
fi

if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        log "missing Debian packages: ${need_apt[*]}; run this script as root"; exit 1
    fi
    log "apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null
fi

"$py" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
    log "$py is not CPython 3.11"; exit 1; }

if [ ! -x "$venv/bin/python" ]; then
    log "creating venv $venv with $py"
    "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"

# Link just the Debian-only binding files into a folder inside the venv and
# name that folder in a .pth file. All of dist-packages would shadow ~90 pip
# packages, so it is never put on the path.
suffix=$("$vpy" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
linkdir="$venv/debian-bindings"
mkdir -p "$linkdir"
for f in "rados$suffix" "rbd$suffix" nbd.py "libnbdmod$suffix" \
    libvirt.py "libvirtmod$suffix" libvirt_qemu.py "libvirtmod_qemu$suffix"; do
    src="/usr/lib/python3/dist-packages/$f"
    [ -e "$src" ] || { log "missing $src (Debian binding)"; exit 1; }
    ln -sfn "$src" "$linkdir/$f"
done
echo "$linkdir" > "$site/blockferry-debian-bindings.pth"

log "installing blockferry and its Python dependencies"
"$vpy" -m pip install -q --upgrade pip setuptools wheel >/dev/null
"$vpy" -m pip install -q -e "$here[test,bench,deploy]"
"$venv/bin/blockferry-agent" --check-bindings >/dev/null
log "ready: $venv"
