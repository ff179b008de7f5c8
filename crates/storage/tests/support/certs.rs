//! Test certificates made at test time with rcgen (no key is ever
//! committed): a CA per [`Pki`], leaf identities it issues for both server
//! and client use. Shared by the storage, drafter and CLI tests (`#[path]`).
#![allow(dead_code)]

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// A certificate authority.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A peer's certificate, key and the CA it trusts, as PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

impl Pki {
    /// A new CA called `name`.
    pub fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        Pki {
            ca: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A leaf for `names` (DNS names or IP addresses), usable as TLS server
    /// and client, trusting this CA.
    pub fn issue(&self, names: &[&str]) -> Identity {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().copied().unwrap_or("peer"));
        params.distinguished_name = dn;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca).expect("leaf certificate");
        Identity {
            cert: cert.pem(),
            key: key.serialize_pem(),
            ca: self.ca_pem(),
        }
    }
}

impl Identity {
    /// The same certificate and key, trusting `ca_pem` instead.
    pub fn trusting(&self, ca_pem: &str) -> Identity {
        Identity {
            ca: ca_pem.to_string(),
            ..self.clone()
        }
    }

    /// The TLS settings.
    pub fn config(&self) -> drafter_storage::TlsConfig {
        drafter_storage::TlsConfig::from_pem(
            self.cert.as_bytes(),
            self.key.as_bytes(),
            self.ca.as_bytes(),
        )
        .expect("TLS config")
    }

    /// Writes `cert.pem`, `key.pem` (mode 0600) and `ca.pem` into `dir`.
    pub fn write_dir(&self, dir: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).expect("TLS dir");
        std::fs::write(dir.join("cert.pem"), &self.cert).expect("cert.pem");
        std::fs::write(dir.join("key.pem"), &self.key).expect("key.pem");
        std::fs::set_permissions(dir.join("key.pem"), std::fs::Permissions::from_mode(0o600))
            .expect("key.pem mode");
        std::fs::write(dir.join("ca.pem"), &self.ca).expect("ca.pem");
    }
}
