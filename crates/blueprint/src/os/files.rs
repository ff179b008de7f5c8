//! Files the OS blueprint installs: the initramfs `/init`, the network
//! script, and busybox init's inittab and scripts that start agent,
//! liveness and the OCI bundle.

/// `/init` of the initramfs: loads the virtio and vsock modules listed in
/// `/lib/modules/order`, mounts the root disk (`drafter.root=`, default
/// `/dev/vda`) and switches to its `/sbin/init`.
pub const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m" || echo "initramfs: cannot load $m"
done
root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        drafter.root=*) root="${arg#drafter.root=}" ;;
    esac
done
tries=0
while [ ! -b "$root" ] && [ "$tries" -lt 500 ]; do
    sleep 0.01
    tries=$((tries + 1))
done
if ! mount -t ext4 -o rw,noatime "$root" /newroot; then
    echo "initramfs: cannot mount $root; dropping to a shell"
    exec sh
fi
echo "initramfs: $root mounted, starting its init"
mount --move /dev /newroot/dev
umount /sys /proc
exec switch_root /newroot /sbin/init
"#;

/// Configures the first non-loopback interface statically. Defaults can be
/// overridden on the kernel command line with `drafter.ip=ADDR/PREFIX`,
/// `drafter.gw=ADDR` and `drafter.iface=NAME`.
pub const NETWORK_SCRIPT: &str = r#"#!/bin/sh
set -eu
ip=172.16.0.2/30
gw=172.16.0.1
iface=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        drafter.ip=*) ip="${arg#drafter.ip=}" ;;
        drafter.gw=*) gw="${arg#drafter.gw=}" ;;
        drafter.iface=*) iface="${arg#drafter.iface=}" ;;
    esac
done
if [ -z "$iface" ]; then
    for dev in /sys/class/net/*; do
        name="${dev##*/}"
        [ "$name" = lo ] && continue
        iface="$name"
        break
    done
fi
ip link set lo up
if [ -z "$iface" ]; then
    echo "drafter-network: no network interface" >&2
    exit 0
fi
ip link set "$iface" up
ip addr replace "$ip" dev "$iface"
ip route replace default via "$gw" dev "$iface"
echo "drafter-network: $iface $ip via $gw"
"#;

/// Mounts the disk labelled `oci` and runs its bundle with crun in the
/// VM's network namespace; exits quietly when there is no such disk.
pub const OCI_SCRIPT: &str = r#"#!/bin/sh
set -eu
dir=/run/drafter/oci
if ! blkid -L oci >/dev/null 2>&1; then
    echo "drafter-oci: no disk labelled oci; nothing to run"
    exit 0
fi
mkdir -p "$dir"
mountpoint -q "$dir" || mount LABEL=oci "$dir"
crun delete -f drafter-oci >/dev/null 2>&1 || true
exec crun run --bundle "$dir" drafter-oci
"#;

/// `/etc/inittab` for busybox init: boot script, agent (respawned),
/// OCI bundle, liveness signal, and a login prompt on the serial console.
pub const INITTAB: &str = "::sysinit:/etc/drafter/rc.sysinit
::respawn:/usr/local/sbin/drafter-agent-run
::once:/usr/local/sbin/drafter-oci
::once:/usr/local/bin/drafter-liveness --vsock-port 25
::respawn:/sbin/agetty --noclear -L ttyS0 115200 vt100
::ctrlaltdel:/usr/lib/drafter/busybox reboot
::shutdown:/etc/drafter/rc.shutdown
";

/// `/etc/drafter/rc.sysinit`: mounts the API file systems (cgroup2 for
/// crun), names the host and configures the network. Everything it starts
/// afterwards comes from `/etc/inittab`.
pub const RC_SYSINIT: &str = r#"#!/bin/sh
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
mount -o remount,rw,noatime /
mkdir -p /run/lock
hostname -F /etc/hostname
/usr/local/sbin/drafter-network
echo "drafter: system up"
"#;

/// `/etc/drafter/rc.shutdown`: stops the bundle and flushes the disks.
pub const RC_SHUTDOWN: &str = r#"#!/bin/sh
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
crun kill drafter-oci TERM >/dev/null 2>&1 || true
sync
umount -a -r >/dev/null 2>&1 || true
"#;

/// Starts the agent with the hook commands from `/etc/drafter/agent.env`
/// (`BEFORE_SUSPEND_CMD`, `AFTER_RESUME_CMD`, shell-quoted).
pub const AGENT_RUN: &str = r#"#!/bin/sh
BEFORE_SUSPEND_CMD=
AFTER_RESUME_CMD=
[ -r /etc/drafter/agent.env ] && . /etc/drafter/agent.env
exec /usr/local/bin/drafter-agent --vsock-port 26 \
    --before-suspend-cmd "$BEFORE_SUSPEND_CMD" --after-resume-cmd "$AFTER_RESUME_CMD"
"#;
