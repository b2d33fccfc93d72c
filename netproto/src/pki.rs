//! The private cluster CA and the node identities it issues.
//!
//! A cluster has one CA (a self-signed ECDSA P-256 certificate and its key,
//! kept by whoever runs `cluster init`). Each node gets a certificate whose
//! subject common name **and** a SAN DNS name are the node name; extra SANs
//! (IP addresses, host names) may be added. The certificate says who a node
//! is; whether that node may take part is decided by the member list in the
//! TLS layer ([`crate::tls`]), so dropping a node from the cluster does not
//! need a revocation list.
//!
//! Files are PEM. Key files are written with mode 0600 through a temporary
//! file and a rename, so a crash never leaves a half-written key and a key
//! is never readable by others, even for an instant.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::error::{Error, Result};

/// Organization written in every certificate this crate issues.
const ORGANIZATION: &str = "freezeframe";

/// The cluster's certificate authority: the certificate and the signing key.
/// Only the host that issues node certificates needs this; nodes need only
/// the [`CaCertificate`].
pub struct ClusterCa {
    cluster_name: String,
    cert: CaCertificate,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("ClusterCa")
            .field("cluster_name", &self.cluster_name)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Generates a new CA for the cluster `cluster_name`.
    pub fn generate(cluster_name: &str) -> Result<ClusterCa> {
        if cluster_name.trim().is_empty() {
            return Err(Error::Certificate {
                action: "generate the cluster CA".into(),
                reason: "the cluster name is empty".into(),
            });
        }
        let cert_err = |reason: rcgen::Error| Error::Certificate {
            action: format!("generate the CA of cluster {cluster_name}"),
            reason: reason.to_string(),
        };
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{cluster_name} cluster CA"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, cluster_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = params.self_signed(&key).map_err(cert_err)?;
        let key_pem = key.serialize_pem();
        let cert = CaCertificate::from_der(cert.pem(), cert.der().clone(), "generated CA certificate")?;
        Ok(ClusterCa {
            cluster_name: cluster_name.to_string(),
            cert,
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA saved by [`ClusterCa::save`]. Errors name the file at fault.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<ClusterCa> {
        let cert = CaCertificate::load(cert_path)?;
        let key_pem = read_text(key_path, "read CA key")?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| Error::BadPem {
            path: key_path.to_path_buf(),
            what: format!("not a PEM private key: {e}"),
        })?;
        if public_key_of(cert.der(), "CA certificate")? != key.public_key_raw() {
            return Err(Error::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            });
        }
        let issuer = Issuer::from_ca_cert_der(cert.der(), key).map_err(|e| Error::BadPem {
            path: cert_path.to_path_buf(),
            what: format!("not usable as a CA certificate: {e}"),
        })?;
        Ok(ClusterCa {
            cluster_name: cert.cluster_name().to_string(),
            cert,
            key_pem,
            issuer,
        })
    }

    /// Writes the certificate (mode 0644) and the key (mode 0600).
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<()> {
        self.cert.save(cert_path)?;
        write_file(key_path, self.key_pem.as_bytes(), 0o600)
    }

    /// The cluster this CA belongs to.
    pub fn cluster_name(&self) -> &str {
        &self.cluster_name
    }

    /// The public half, which every node loads as its trust anchor.
    pub fn certificate(&self) -> &CaCertificate {
        &self.cert
    }

    /// Issues a certificate for node `node_name`. `alt_names` are extra SANs:
    /// strings that parse as IP addresses become IP SANs, others DNS SANs.
    pub fn issue_node(&self, node_name: &str, alt_names: &[String]) -> Result<NodeIdentity> {
        validate_node_name(node_name)?;
        let cert_err = |reason: rcgen::Error| Error::Certificate {
            action: format!("issue the certificate of node {node_name}"),
            reason: reason.to_string(),
        };
        let mut sans = vec![node_name.to_string()];
        sans.extend(alt_names.iter().filter(|n| *n != node_name).cloned());
        let mut params = CertificateParams::new(sans).map_err(cert_err)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.distinguished_name.push(DnType::CommonName, node_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, self.cluster_name.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // A node is a server when others dial it and a client when it dials.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err)?;
        Ok(NodeIdentity {
            node_name: node_name.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The cluster CA's certificate: the trust anchor every node checks its
/// peers against.
#[derive(Debug, Clone)]
pub struct CaCertificate {
    cluster_name: String,
    pem: String,
    der: CertificateDer<'static>,
}

impl CaCertificate {
    /// Loads the CA certificate from a PEM file.
    pub fn load(path: &Path) -> Result<CaCertificate> {
        let pem = read_text(path, "read CA certificate")?;
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::BadPem {
            path: path.to_path_buf(),
            what: format!("no PEM certificate: {e}"),
        })?;
        CaCertificate::from_der(pem, der, &path.display().to_string()).map_err(|e| match e {
            Error::BadCredential { reason, .. } => Error::BadPem {
                path: path.to_path_buf(),
                what: reason,
            },
            other => other,
        })
    }

    /// Parses a CA certificate held in memory (PEM).
    pub fn from_pem(pem: &str) -> Result<CaCertificate> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
            Error::BadCredential {
                what: "CA certificate".into(),
                reason: format!("no PEM certificate: {e}"),
            }
        })?;
        CaCertificate::from_der(pem.to_string(), der, "CA certificate")
    }

    fn from_der(pem: String, der: CertificateDer<'static>, what: &str) -> Result<CaCertificate> {
        let bad = |reason: String| Error::BadCredential {
            what: what.to_string(),
            reason,
        };
        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
        if !x509.is_ca() {
            return Err(bad("not a CA certificate (basicConstraints CA is false)".into()));
        }
        let cluster_name = x509
            .subject()
            .iter_organizational_unit()
            .next()
            .and_then(|ou| ou.as_str().ok())
            .ok_or_else(|| bad("no cluster name (OU) in its subject".into()))?
            .to_string();
        Ok(CaCertificate {
            cluster_name,
            pem,
            der,
        })
    }

    /// Writes the certificate as PEM (mode 0644).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_file(path, self.pem().as_bytes(), 0o644)
    }

    /// The cluster name stored in the certificate.
    pub fn cluster_name(&self) -> &str {
        &self.cluster_name
    }

    /// DER bytes.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// PEM text.
    pub fn pem(&self) -> &str {
        &self.pem
    }
}

/// A node's certificate and private key (PEM), and the node name the
/// certificate carries.
#[derive(Clone)]
pub struct NodeIdentity {
    pub node_name: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Parses and checks an identity held in memory: the certificate must
    /// carry a node name, and the key must belong to it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<NodeIdentity> {
        let bad = |what: &str, reason: String| Error::BadCredential {
            what: what.to_string(),
            reason,
        };
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad("node certificate", format!("no PEM certificate: {e}")))?;
        let node_name = node_name_of(&der).map_err(|r| bad("node certificate", r))?;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| bad("node key", format!("not a PEM private key: {e}")))?;
        let cert_key = public_key_of(&der, "node certificate")?;
        if cert_key != key.public_key_raw() {
            return Err(bad(
                "node key",
                format!("does not belong to the certificate of node {node_name}"),
            ));
        }
        Ok(NodeIdentity {
            node_name,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    /// Loads an identity saved by [`NodeIdentity::save`]. Errors name the file.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<NodeIdentity> {
        let cert_pem = read_text(cert_path, "read node certificate")?;
        let key_pem = read_text(key_path, "read node key")?;
        NodeIdentity::from_pem(&cert_pem, &key_pem).map_err(|e| match e {
            Error::BadCredential { what, reason } => {
                let path = if what == "node key" { key_path } else { cert_path };
                if reason.starts_with("does not belong") {
                    Error::KeyMismatch {
                        cert: cert_path.to_path_buf(),
                        key: key_path.to_path_buf(),
                    }
                } else {
                    Error::BadPem {
                        path: path.to_path_buf(),
                        what: reason,
                    }
                }
            }
            other => other,
        })
    }

    /// Writes the certificate (mode 0644) and the key (mode 0600).
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<()> {
        write_file(cert_path, self.cert_pem.as_bytes(), 0o644)?;
        write_file(key_path, self.key_pem.as_bytes(), 0o600)
    }

    /// The certificate in DER, as rustls wants it.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|e| {
            Error::BadCredential {
                what: format!("certificate of node {}", self.node_name),
                reason: e.to_string(),
            }
        })
    }

    /// The private key in DER, as rustls wants it.
    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| Error::BadCredential {
            what: format!("key of node {}", self.node_name),
            reason: e.to_string(),
        })
    }
}

/// The node name a certificate carries: its subject CN, which must also be
/// one of its SAN DNS names (the name TLS clients check). Returns a reason
/// when the certificate does not name a node.
pub fn node_name_of(der: &CertificateDer<'_>) -> std::result::Result<String, String> {
    let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let cn = x509
        .subject()
        .iter_common_name()
        .next()
        .ok_or("no common name in its subject")?
        .as_str()
        .map_err(|e| format!("unreadable common name: {e}"))?
        .to_string();
    let sans = x509
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subjectAltName: {e}"))?;
    let in_san = sans.is_some_and(|ext| {
        ext.value.general_names.iter().any(|g| {
            matches!(g, x509_parser::extensions::GeneralName::DNSName(d) if d.eq_ignore_ascii_case(&cn))
        })
    });
    if !in_san {
        return Err(format!("common name {cn:?} is not among its SAN DNS names"));
    }
    Ok(cn)
}

/// Checks that a node name can be a certificate DNS name and a TLS server name.
pub fn validate_node_name(name: &str) -> Result<()> {
    let invalid = |reason: &str| Error::InvalidNodeName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(invalid("an IP address is not a node name"));
    }
    match ServerName::try_from(name) {
        Ok(ServerName::DnsName(_)) => Ok(()),
        Ok(_) => Err(invalid("not a DNS-style name")),
        Err(_) => Err(invalid(
            "use letters, digits, '-' and '.', at most 63 characters per label",
        )),
    }
}

fn public_key_of(der: &CertificateDer<'_>, what: &str) -> Result<Vec<u8>> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| Error::BadCredential {
            what: what.to_string(),
            reason: format!("not an X.509 certificate: {e}"),
        })?;
    Ok(x509.public_key().subject_public_key.data.to_vec())
}

fn read_text(path: &Path, action: &'static str) -> Result<String> {
    fs::read_to_string(path).map_err(|source| Error::File {
        action,
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` with `mode`, through a temporary file in the
/// same directory and a rename, so readers see the old or the new file.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let file_err = |action: &'static str, p: PathBuf| {
        move |source| Error::File {
            action,
            path: p,
            source,
        }
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(file_err("create", tmp.clone()))?;
    // The umask may have narrowed the mode on create; a key must be exactly 0600.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(file_err("set permissions of", tmp.clone()))?;
    f.write_all(bytes).map_err(file_err("write", tmp.clone()))?;
    f.sync_all().map_err(file_err("sync", tmp.clone()))?;
    drop(f);
    fs::rename(&tmp, path).map_err(file_err("rename into place", path.to_path_buf()))
}
