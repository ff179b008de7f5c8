//! Files the OS blueprint installs: the initramfs `/init`, the network
//! script, and the systemd units for agent, liveness and the OCI bundle.

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

/// systemd unit of the network script.
pub const NETWORK_UNIT: &str = "[Unit]
Description=Drafter static network
DefaultDependencies=no
Before=network.target
Wants=network.target
After=local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/drafter-network

[Install]
WantedBy=multi-user.target
";

/// systemd unit of the OCI bundle.
pub const OCI_UNIT: &str = "[Unit]
Description=Drafter OCI bundle (crun)
After=drafter-network.service local-fs.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/drafter-oci
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
";

/// systemd unit of the agent; hook commands come from
/// `/etc/drafter/agent.env` (`BEFORE_SUSPEND_CMD`, `AFTER_RESUME_CMD`).
pub const AGENT_UNIT: &str = "[Unit]
Description=Drafter guest agent
After=drafter-network.service

[Service]
Type=simple
EnvironmentFile=-/etc/drafter/agent.env
ExecStart=/bin/sh -c 'exec /usr/local/bin/drafter-agent --vsock-port 26 --before-suspend-cmd \"$$BEFORE_SUSPEND_CMD\" --after-resume-cmd \"$$AFTER_RESUME_CMD\"'
Restart=always
RestartSec=100ms

[Install]
WantedBy=multi-user.target
";

/// systemd unit of the liveness signal, sent once the bundle has started.
pub const LIVENESS_UNIT: &str = "[Unit]
Description=Drafter liveness signal
After=drafter-oci.service drafter-agent.service drafter-network.service

[Service]
Type=oneshot
ExecStart=/usr/local/bin/drafter-liveness --vsock-port 25

[Install]
WantedBy=multi-user.target
";
