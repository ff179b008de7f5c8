//! End-to-end `oci` conversion of a busybox image the test builds itself,
//! from an OCI layout, a docker archive and a local registry, checked inside
//! the resulting ext4 with debugfs.

mod common;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{debugfs, digest, owner_mode, TestImage, BUSYBOX};
use drafter_blueprint::oci::{convert, ImageSource, OciOptions};
use drafter_blueprint::BlueprintError;

fn options(source: ImageSource, output: PathBuf) -> OciOptions {
    OciOptions {
        source,
        output,
        arch: "amd64".into(),
        plain_http: false,
        headroom: 8 * 1024 * 1024,
    }
}

/// Checks everything the busybox test image must look like on the disk.
fn check_disk(image: &Path) {
    let label = Command::new("e2label").arg(image).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), "oci");

    let config: serde_json::Value =
        serde_json::from_str(&debugfs(image, "cat /config.json")).unwrap();
    let p = &config["process"];
    assert_eq!(
        p["args"],
        serde_json::json!(["/bin/sh", "-c", "echo hi; sleep 1000"])
    );
    assert_eq!(p["env"], serde_json::json!(["PATH=/bin", "GREETING=hello"]));
    assert_eq!(p["cwd"], "/home/app");
    assert_eq!(p["user"]["uid"], 1000);
    assert_eq!(p["user"]["gid"], 50);
    assert_eq!(p["terminal"], false);
    assert_eq!(config["root"]["path"], "rootfs");
    let namespaces: Vec<&str> = config["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    assert!(namespaces.contains(&"mount") && namespaces.contains(&"pid"));
    assert!(
        !namespaces.contains(&"network"),
        "container must share the VM network"
    );

    // Content, ownership (the image's, not the builder's) and modes.
    let bb = debugfs(image, "stat /rootfs/bin/busybox");
    assert!(bb.contains("Links: 2"), "hard link lost: {bb}");
    assert_eq!(owner_mode(image, "/rootfs/bin/busybox"), (0, 0, 0o755));
    assert_eq!(owner_mode(image, "/rootfs/home/app"), (1000, 1000, 0o750));
    assert_eq!(
        owner_mode(image, "/rootfs/home/app/data"),
        (1000, 1000, 0o640)
    );
    assert_eq!(owner_mode(image, "/rootfs/tmp"), (0, 0, 0o1777));
    assert_eq!(owner_mode(image, "/config.json"), (0, 0, 0o644));
    assert_eq!(
        debugfs(image, "cat /rootfs/home/app/data"),
        "hello from the image\n"
    );
    let dumped = tempfile::NamedTempFile::new().unwrap();
    debugfs(
        image,
        &format!("dump /rootfs/bin/busybox {}", dumped.path().display()),
    );
    assert_eq!(fs::read(dumped.path()).unwrap(), fs::read(BUSYBOX).unwrap());
    assert!(debugfs(image, "stat /rootfs/bin/echo").contains("Fast link dest: \"busybox\""));
    let null = debugfs(image, "stat /rootfs/dev/null");
    assert!(null.contains("Type: character special"), "{null}");
    assert!(null.contains("Device major/minor number: 01:03"), "{null}");
    assert!(debugfs(image, "ea_get /rootfs/home/app/data user.origin").contains("drafter-test"));
    // Layer 2: whiteout applied, new file present.
    assert!(debugfs(image, "ls /rootfs/tmp").find("gone").is_none());
    assert_eq!(owner_mode(image, "/rootfs/etc/layer2"), (0, 0, 0o600));

    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn converts_an_oci_layout() {
    let dir = tempfile::tempdir().unwrap();
    TestImage::busybox().write_layout(&dir.path().join("layout"));
    let out = dir.path().join("out/oci.ext4");
    let size = convert(&options(
        ImageSource::parse(dir.path().join("layout").to_str().unwrap()),
        out.clone(),
    ))
    .unwrap();
    assert_eq!(fs::metadata(&out).unwrap().len(), size);
    check_disk(&out);
    // Only the disk is left behind.
    let left: Vec<_> = fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["oci.ext4"]);
}

#[test]
fn converts_a_docker_save_archive() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    TestImage::busybox().write_docker_archive(&archive);
    let out = dir.path().join("oci.ext4");
    convert(&options(
        ImageSource::parse(archive.to_str().unwrap()),
        out.clone(),
    ))
    .unwrap();
    check_disk(&out);
}

#[test]
fn bad_images_fail_clearly_and_keep_the_existing_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("oci.ext4");
    fs::write(&out, b"previous disk").unwrap();
    let layout = dir.path().join("layout");
    let image = TestImage::busybox();
    image.write_layout(&layout);

    // A corrupted layer blob.
    let blob = layout
        .join("blobs/sha256")
        .join(&digest(&image.layers[0].0)[7..]);
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let err = convert(&options(ImageSource::Layout(layout.clone()), out.clone())).unwrap_err();
    assert!(
        matches!(err, BlueprintError::DigestMismatch { .. }),
        "{err}"
    );

    // An unsupported layer media type.
    let mut odd = TestImage::busybox();
    odd.layers[1].1 = "application/vnd.example.layer.v1+squashfs".into();
    let odd_layout = dir.path().join("odd");
    odd.write_layout(&odd_layout);
    let err = convert(&options(ImageSource::Layout(odd_layout), out.clone())).unwrap_err();
    assert!(
        err.to_string()
            .contains("unsupported media type application/vnd.example"),
        "{err}"
    );

    // Not an image at all.
    let err = convert(&options(
        ImageSource::Layout(dir.path().to_owned()),
        out.clone(),
    ))
    .unwrap_err();
    assert!(err.to_string().contains("not an OCI image layout"), "{err}");
    let garbage = dir.path().join("garbage.tar");
    fs::write(&garbage, b"definitely not a tar archive, just text").unwrap();
    let err = convert(&options(ImageSource::DockerArchive(garbage), out.clone())).unwrap_err();
    assert!(matches!(err, BlueprintError::InvalidImage(_)), "{err}");

    assert_eq!(fs::read(&out).unwrap(), b"previous disk");
}

/// Debian's `docker-registry` on a free loopback port, with its own storage.
struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry must be installed");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "registry did not come up");
            std::thread::yield_now();
        }
        Self {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn push(image: &TestImage, reference: &str) {
    use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let reference: oci_client::Reference = reference.parse().unwrap();
    let layers: Vec<ImageLayer> = image
        .layers
        .iter()
        .map(|(d, mt)| ImageLayer::new(d.clone(), mt.clone(), None))
        .collect();
    let config = Config::new(
        image.config.clone(),
        "application/vnd.oci.image.config.v1+json".into(),
        None,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(client.push(
        &reference,
        &layers,
        config,
        &oci_client::secrets::RegistryAuth::Anonymous,
        None,
    ))
    .unwrap();
}

#[test]
fn converts_an_image_pulled_from_a_local_registry() {
    let registry = Registry::start();
    let reference = format!("{}/drafter/busybox:test", registry.addr);
    push(&TestImage::busybox(), &reference);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("oci.ext4");
    convert(&options(ImageSource::parse(&reference), out.clone())).unwrap();
    check_disk(&out);

    let missing = format!("{}/drafter/nothing:here", registry.addr);
    let err = convert(&options(ImageSource::parse(&missing), out.clone())).unwrap_err();
    assert!(matches!(err, BlueprintError::Registry(_)), "{err}");
    assert!(err.to_string().contains("drafter/nothing"), "{err}");
    check_disk(&out);
}
