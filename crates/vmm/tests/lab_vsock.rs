//! vsock lab test (issue 3 "Done when" 4): 1 MiB echoed guest→host and
//! host→guest through the Firecracker-style hybrid Unix-socket protocol, with
//! the Debian cloud kernel's vsock modules and Debian's `socat` in the guest.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::time::Duration;

use drafter_vmm::config::VsockConfig;
use drafter_vmm::{BuildOptions, VmConfig, Vmm};
use support::{guest_dir, initramfs, scratch, Console, Cpio};

const BOOT: Duration = Duration::from_secs(300);
const IO: Duration = Duration::from_secs(180);
const MIB: usize = 1 << 20;
/// Guest port the echo server listens on (host→guest).
const GUEST_PORT: u32 = 5000;
/// Host port the guest connects to (guest→host).
const HOST_PORT: u32 = 5001;
const SOCAT: &str = "/usr/bin/socat";

/// A second cpio archive (the kernel unpacks concatenated archives) holding
/// `socat`, every library `ldd` lists for it and the dynamic loader, each at
/// the path the loader looks for it.
fn socat_archive() -> Vec<u8> {
    let out = std::process::Command::new("ldd")
        .arg(SOCAT)
        .output()
        .unwrap_or_else(|e| panic!("ldd {SOCAT}: {e} (apt-get install socat)"));
    assert!(
        out.status.success(),
        "ldd {SOCAT} failed: is socat installed?"
    );
    let mut files = vec![PathBuf::from(SOCAT)];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    let mut c = Cpio::new();
    let mut dirs = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix("/").unwrap_or(f);
        for d in rel
            .ancestors()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            let d = d.to_string_lossy().into_owned();
            if !d.is_empty() && dirs.insert(d.clone()) {
                c.dir(&d);
            }
        }
        // fs::read follows the library symlinks to the real file.
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        c.file(&rel.to_string_lossy(), 0o755, &bytes);
    }
    c.into_bytes()
}

/// Guest side: an echo server on [`GUEST_PORT`] (ready once socat says it
/// listens), then an echo client connected to the host's [`HOST_PORT`].
fn guest_body() -> String {
    format!(
        "{SOCAT} -d -d VSOCK-LISTEN:{GUEST_PORT},fork EXEC:/bin/cat 2>/tmp/listen.log &\n\
         until grep -q listening /tmp/listen.log; do \
         if ! kill -0 $! 2>/dev/null; then cat /tmp/listen.log; echo VSOCK-LISTEN-FAILED; break; fi; usleep 20000; done\n\
         ( {SOCAT} VSOCK-CONNECT:2:{HOST_PORT} EXEC:/bin/cat || echo VSOCK-CONNECT-FAILED ) &\n\
         echo VSOCK-READY\n\
         sleep 100000"
    )
}

fn random_mib() -> Vec<u8> {
    let mut buf = vec![0u8; MIB];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .unwrap_or_else(|e| panic!("/dev/urandom: {e}"));
    buf
}

/// Sends 1 MiB of random bytes on `stream` (from a writer thread, so the echo
/// never stalls on full buffers) and checks the same bytes come back.
fn echo_mib(stream: UnixStream, what: &str) {
    let data = random_mib();
    let start = std::time::Instant::now();
    stream
        .set_read_timeout(Some(IO))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut writer = stream.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let sent = data.clone();
    let w = std::thread::spawn(move || writer.write_all(&sent));
    let mut back = vec![0u8; MIB];
    let mut got = 0;
    let mut reader = &stream;
    while got < MIB {
        match reader.read(&mut back[got..]) {
            Ok(0) => panic!("{what}: stream closed after {got} of {MIB} echoed bytes"),
            Ok(n) => got += n,
            Err(e) => panic!("{what}: reading the echo after {got} bytes: {e}"),
        }
    }
    match w.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{what}: sending: {e}"),
        Err(_) => panic!("{what}: writer panicked"),
    }
    if let Some(i) = data.iter().zip(&back).position(|(a, b)| a != b) {
        panic!("{what}: echo differs from what was sent at byte {i}");
    }
    eprintln!("{what}: 1 MiB echoed in {:?}", start.elapsed());
}

/// Host→guest through the hybrid protocol: connect to `uds`, `CONNECT <port>`,
/// expect `OK <hostport>`.
fn connect_to_guest(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).unwrap_or_else(|e| panic!("{}: {e}", uds.display()));
    s.set_read_timeout(Some(IO))
        .unwrap_or_else(|e| panic!("{e}"));
    writeln!(s, "CONNECT {port}").unwrap_or_else(|e| panic!("CONNECT: {e}"));
    // Byte by byte, so no stream data is buffered past the reply line.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match s.read(&mut b) {
            Ok(1) => line.push(b[0]),
            Ok(_) => panic!(
                "VMM closed after {:?} instead of OK",
                String::from_utf8_lossy(&line)
            ),
            Err(e) => panic!("waiting for OK: {e}"),
        }
        assert!(line.len() < 64, "reply too long: {line:?}");
    }
    let reply = String::from_utf8_lossy(&line);
    let host_port = reply
        .trim()
        .strip_prefix("OK ")
        .and_then(|p| p.parse::<u32>().ok());
    assert!(host_port.is_some(), "reply to CONNECT: {reply:?}");
    s
}

#[test]
#[ignore = "lab"]
fn lab_vsock_echo_1mib_both_ways() {
    let dir = scratch("vsock");
    let mut image = initramfs(&guest_body());
    image.extend_from_slice(&socat_archive());
    let init = dir.join("initramfs.cpio");
    std::fs::write(&init, image).unwrap_or_else(|e| panic!("{e}"));

    let uds = dir.join("vsock");
    let listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display()))
        .unwrap_or_else(|e| panic!("listen for the guest: {e}"));
    let (accepted_tx, accepted) = channel();
    std::thread::spawn(move || {
        let _ = accepted_tx.send(listener.accept().map(|(s, _)| s));
    });

    let mut c = VmConfig::new(guest_dir().join("vmlinuz"));
    c.initramfs = Some(init);
    c.vcpus = 2;
    c.memory_mib = 256;
    c.boot_args = "console=ttyS0 reboot=k panic=1 pci=off quiet".into();
    c.vsock = Some(VsockConfig {
        cid: 3,
        uds_path: uds.clone(),
    });
    let (mut console, out) = Console::new();
    let mut vmm = Vmm::boot(
        c,
        BuildOptions {
            console: Some(out),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("boot: {e}"));

    console.wait_for("VSOCK-READY", BOOT);
    // guest→host: the guest's connection to CID 2 arrives on `<uds>_<port>`.
    let guest_to_host = std::thread::spawn(move || {
        let s = match accepted.recv_timeout(BOOT) {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("accept: {e}"),
            Err(_) => panic!("the guest never connected to host port {HOST_PORT}"),
        };
        echo_mib(s, "guest→host");
    });
    // host→guest, concurrently.
    let s = connect_to_guest(&uds, GUEST_PORT);
    echo_mib(s, "host→guest");
    let g2h = guest_to_host.join();
    let failures: Vec<_> = console
        .seen
        .iter()
        .filter(|l| l.contains("VSOCK-") && l.contains("FAILED"))
        .cloned()
        .collect();
    vmm.stop();
    assert!(
        g2h.is_ok(),
        "guest→host echo failed; guest said {failures:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
