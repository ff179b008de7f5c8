//! The `--tls-*` flags, shared by every command that talks the migration
//! protocol over the network: `drafter-peer` (dials and listens),
//! `drafter-registry` (listens) and `drafter-terminator` (dials).
//!
//! [`TlsArgs`] names this side's certificate, key and the CA it trusts
//! (`--tls-cert`, `--tls-key`, `--tls-ca`, or `--tls-dir` holding
//! `cert.pem`, `key.pem` and `ca.pem`); [`TlsDialArgs`] adds
//! `--tls-server-name` for a command that dials. Without any of them the
//! command speaks plain TCP. See [`drafter_storage::tls`] for the TLS itself.

use std::path::PathBuf;

use drafter_storage::{TlsConfig, TlsError, TlsFiles};

/// The TLS identity flags of a command that listens (and of one that dials,
/// inside [`TlsDialArgs`]).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This side's certificate (PEM). With --tls-key and --tls-ca,
    /// connections run over TLS 1.3 with mutual certificate authentication
    /// (the secret, if any, is checked inside TLS); both ends need them.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate the other side's certificate must chain to (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// A directory holding cert.pem, key.pem and ca.pem (instead of
    /// --tls-cert, --tls-key and --tls-ca).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub tls_dir: Option<PathBuf>,
}

impl TlsArgs {
    /// The files the flags name, or `None` for plain TCP.
    pub fn files(&self) -> Option<TlsFiles> {
        match (&self.tls_dir, &self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(dir), ..) => Some(TlsFiles::in_dir(dir)),
            (None, Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            _ => None,
        }
    }

    /// Loads the TLS settings the flags name (`None`: plain TCP). A file
    /// that cannot be read or used is an error naming it.
    pub fn load(&self) -> Result<Option<TlsConfig>, TlsError> {
        self.files().map(|f| TlsConfig::load(&f)).transpose()
    }
}

/// The TLS flags of a command that dials: [`TlsArgs`] and the name the
/// listener's certificate must carry.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsDialArgs {
    /// This side's identity and the CA it trusts.
    #[command(flatten)]
    pub identity: TlsArgs,
    /// Name the certificate of the side at --raddr must carry (default:
    /// the host part of --raddr).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

/// Why the `--tls-*` flags cannot be used.
#[derive(Debug)]
pub enum TlsArgsError {
    /// A TLS file is unusable.
    Tls(TlsError),
    /// `--tls-server-name` without the files it applies to.
    ServerNameAlone,
}

impl std::fmt::Display for TlsArgsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsArgsError::Tls(e) => write!(f, "{e}"),
            TlsArgsError::ServerNameAlone => f.write_str(
                "--tls-server-name needs --tls-dir or --tls-cert, --tls-key and --tls-ca",
            ),
        }
    }
}

impl std::error::Error for TlsArgsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsArgsError::Tls(e) => Some(e),
            TlsArgsError::ServerNameAlone => None,
        }
    }
}

impl TlsDialArgs {
    /// Loads the TLS settings (`None`: plain TCP), checking the listener's
    /// certificate against `--tls-server-name` if given.
    pub fn load(&self) -> Result<Option<TlsConfig>, TlsArgsError> {
        match self.identity.load().map_err(TlsArgsError::Tls)? {
            Some(tls) => Ok(Some(match &self.tls_server_name {
                Some(name) => tls.with_server_name(name.clone()),
                None => tls,
            })),
            None if self.tls_server_name.is_some() => Err(TlsArgsError::ServerNameAlone),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Dialler {
        #[command(flatten)]
        tls: TlsDialArgs,
    }

    fn parse(args: &[&str]) -> Result<Dialler, clap::Error> {
        Dialler::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
    }

    #[test]
    fn no_flags_is_plain_tcp() {
        let d = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(d.tls.identity.files().is_none());
        assert!(matches!(d.tls.load(), Ok(None)));
    }

    #[test]
    fn a_dir_names_its_three_files() {
        let d = parse(&["--tls-dir", "/etc/x"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            d.tls.identity.files(),
            Some(TlsFiles::in_dir(std::path::Path::new("/etc/x")))
        );
    }

    #[test]
    fn incomplete_or_conflicting_flags_are_refused() {
        assert!(parse(&["--tls-cert", "c"]).is_err());
        assert!(parse(&["--tls-cert", "c", "--tls-key", "k"]).is_err());
        assert!(parse(&["--tls-dir", "d", "--tls-ca", "a"]).is_err());
        assert!(parse(&["--tls-cert", "c", "--tls-key", "k", "--tls-ca", "a"]).is_ok());
    }

    #[test]
    fn a_server_name_alone_is_refused() {
        let d = parse(&["--tls-server-name", "peer"]).unwrap_or_else(|e| panic!("{e}"));
        let e = d
            .tls
            .load()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("--tls-server-name needs"), "{e}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let d = parse(&["--tls-dir", "/nonexistent-tls-dir"]).unwrap_or_else(|e| panic!("{e}"));
        let e = d
            .tls
            .load()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("/nonexistent-tls-dir/cert.pem"), "{e}");
    }
}
