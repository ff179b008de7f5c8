//! The OCI runtime bundle's `config.json`, made from the image config.

use std::path::Path;

use oci_spec::runtime::Spec;
use serde_json::{json, Value};

use crate::error::{BlueprintError, Result};
use crate::image::ImageConfig;
use crate::tree::Tree;

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Builds the runtime spec for `image`, whose root filesystem is staged in
/// `rootfs` (consulted to resolve user and group names). The container runs
/// without a terminal and in the VM's network namespace.
pub fn runtime_spec(image: &ImageConfig, rootfs: &Tree) -> Result<Spec> {
    let cfg = image.config.clone().unwrap_or_default();
    let mut args: Vec<String> = cfg.entrypoint.unwrap_or_default();
    args.extend(cfg.cmd.unwrap_or_default());
    if args.is_empty() {
        return Err(BlueprintError::InvalidImage(
            "image config has neither Entrypoint nor Cmd".into(),
        ));
    }
    let mut env = cfg.env.unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_owned());
    }
    let cwd = cfg
        .working_dir
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".to_owned());
    let (uid, gid) = resolve_user(cfg.user.as_deref().unwrap_or(""), rootfs)?;

    let mut spec = serde_json::to_value(Spec::default())
        .map_err(|e| BlueprintError::Invalid(format!("default runtime spec: {e}")))?;
    let obj = spec
        .as_object_mut()
        .ok_or_else(|| BlueprintError::Invalid("default runtime spec is not an object".into()))?;
    obj.remove("hostname");
    obj.insert(
        "root".into(),
        json!({ "path": "rootfs", "readonly": false }),
    );
    let process = obj.entry("process").or_insert_with(|| json!({}));
    process["terminal"] = json!(false);
    process["args"] = json!(args);
    process["env"] = json!(env);
    process["cwd"] = json!(cwd);
    process["user"] = json!({ "uid": uid, "gid": gid });
    if let Some(namespaces) = obj
        .get_mut("linux")
        .and_then(|l| l.get_mut("namespaces"))
        .and_then(Value::as_array_mut)
    {
        namespaces.retain(|ns| ns["type"] != "network" && ns["type"] != "uts");
    }
    serde_json::from_value(spec)
        .map_err(|e| BlueprintError::Invalid(format!("generated runtime spec is invalid: {e}")))
}

/// Resolves an image `User` (`uid`, `uid:gid`, `name`, `name:group`) to
/// numeric ids using the image's own `/etc/passwd` and `/etc/group`.
pub fn resolve_user(user: &str, rootfs: &Tree) -> Result<(u32, u32)> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(uid) => {
            let gid = lookup(rootfs, "etc/passwd", 2, u)?.and_then(|f| f[3].parse().ok());
            (uid, gid.unwrap_or(0))
        }
        Err(_) => {
            let fields = lookup(rootfs, "etc/passwd", 0, u)?.ok_or_else(|| {
                BlueprintError::InvalidImage(format!(
                    "user {u:?} not found in the image's /etc/passwd"
                ))
            })?;
            let parse = |s: &str| {
                s.parse::<u32>().map_err(|_| {
                    BlueprintError::InvalidImage(format!("bad /etc/passwd entry for {u:?}"))
                })
            };
            (parse(&fields[2])?, parse(&fields[3])?)
        }
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup(rootfs, "etc/group", 0, g)?
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| {
                    BlueprintError::InvalidImage(format!(
                        "group {g:?} not found in the image's /etc/group"
                    ))
                })?,
        },
    };
    Ok((uid, gid))
}

/// Finds the colon-separated line of `file` whose field `col` is `key`.
fn lookup(rootfs: &Tree, file: &str, col: usize, key: &str) -> Result<Option<Vec<String>>> {
    let Some(rel) = rootfs.resolve(Path::new(file))? else {
        return Ok(None);
    };
    let Ok(text) = std::fs::read_to_string(rootfs.root().join(rel)) else {
        return Ok(None);
    };
    Ok(text
        .lines()
        .map(|l| l.split(':').map(str::to_owned).collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f.get(col).is_some_and(|v| v == key)))
}
