//! Mutual TLS between nodes: who may talk to whom.
//!
//! Both ends of every connection present a node certificate and check the
//! other's. A peer is accepted only when
//! 1. its certificate chains to the cluster CA and nothing else (rustls'
//!    webpki verifiers over a root store holding just that CA),
//! 2. the node name it carries (subject CN, also a SAN DNS name) is in the
//!    cluster's member list, and
//! 3. when we dialed it, that name is the one we meant to reach (the TLS
//!    server name is the peer's node name, checked against the SAN by webpki
//!    and against the CN here).
//!
//! The membership checks live inside the certificate verifiers, so a refused
//! peer fails the handshake itself (both sides see a TLS alert) and never
//! gets to send a single application byte.
//!
//! The crypto provider is always ring, passed explicitly to every builder,
//! so the result does not depend on which provider some other crate in the
//! process installed as the default. Only TLS 1.3 is offered (QUIC requires
//! it) and the ALPN is [`ALPN`].

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme};

use crate::error::{Error, Result};
use crate::pki::{node_name_of, CaCertificate, NodeIdentity};

/// The application protocol both sides must agree on.
pub const ALPN: &[u8] = b"freezeframe/1";

/// The ring crypto provider, built explicitly rather than taken from the
/// process default.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The names of the nodes allowed to connect: a shared, updatable set.
/// Clones share the same set, so the daemon can change membership while
/// endpoints run; new handshakes see the change at once.
#[derive(Debug, Clone, Default)]
pub struct MemberList(Arc<RwLock<BTreeSet<String>>>);

impl MemberList {
    /// A member list holding `names`.
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> MemberList {
        let list = MemberList::default();
        list.set(names);
        list
    }

    /// Replaces the whole list.
    pub fn set<S: Into<String>>(&self, names: impl IntoIterator<Item = S>) {
        let names: BTreeSet<String> = names.into_iter().map(|n| normalize(n.into())).collect();
        match self.0.write() {
            Ok(mut g) => *g = names,
            Err(poisoned) => *poisoned.into_inner() = names,
        }
    }

    /// True when `name` is a member (DNS names compare case-insensitively).
    pub fn contains(&self, name: &str) -> bool {
        let name = normalize(name.to_string());
        match self.0.read() {
            Ok(g) => g.contains(&name),
            Err(poisoned) => poisoned.into_inner().contains(&name),
        }
    }

    /// The members, sorted.
    pub fn names(&self) -> Vec<String> {
        match self.0.read() {
            Ok(g) => g.iter().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().iter().cloned().collect(),
        }
    }
}

impl<S: Into<String>> FromIterator<S> for MemberList {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        MemberList::new(iter)
    }
}

fn normalize(name: String) -> String {
    name.to_ascii_lowercase()
}

/// Where a verifier writes the node name the peer's certificate presented,
/// so the handshake's caller can name it when it logs a refusal (the
/// verifier itself does not know the peer's address).
#[derive(Debug, Clone, Default)]
pub struct PresentedName(Arc<Mutex<Option<String>>>);

impl PresentedName {
    fn record(&self, der: &CertificateDer<'_>) {
        let name = match node_name_of(der) {
            Ok(n) => n,
            Err(reason) => format!("<unreadable certificate: {reason}>"),
        };
        match self.0.lock() {
            Ok(mut g) => *g = Some(name),
            Err(poisoned) => *poisoned.into_inner() = Some(name),
        }
    }

    /// The presented name, if the peer got as far as presenting a certificate.
    pub fn get(&self) -> Option<String> {
        match self.0.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// A refusal that names the node; rustls carries it to the handshake error.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refuse(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(reason)))))
}

/// Checks the membership of the name a verified certificate carries.
fn check_member(der: &CertificateDer<'_>, members: &MemberList, cluster: &str) -> Result<String, rustls::Error> {
    let name = node_name_of(der).map_err(|r| refuse(format!("certificate names no node: {r}")))?;
    if !members.contains(&name) {
        return Err(refuse(format!(
            "node {name} (certificate issued by the CA of cluster {cluster}) is not in the member list"
        )));
    }
    Ok(name)
}

/// Server side: the webpki client verifier (chain to the cluster CA) plus
/// the member list.
#[derive(Debug)]
struct MemberClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    members: MemberList,
    cluster: String,
    presented: PresentedName,
}

impl ClientCertVerifier for MemberClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.presented.record(end_entity);
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_member(end_entity, &self.members, &self.cluster)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the webpki server verifier (chain to the cluster CA, SAN
/// matches the name we dialed) plus: the CN is that name, and it is a member.
#[derive(Debug)]
struct MemberServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    members: MemberList,
    cluster: String,
    presented: PresentedName,
}

impl ServerCertVerifier for MemberServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.presented.record(end_entity);
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let name = check_member(end_entity, &self.members, &self.cluster)?;
        let wanted = server_name.to_str();
        if !name.eq_ignore_ascii_case(&wanted) {
            return Err(refuse(format!("dialed node {wanted} but the certificate is node {name}")));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Everything needed to build TLS configurations for one node: its
/// certificate and key, the cluster CA as the only root, the member list.
/// Configurations are built per connection so that each handshake gets its
/// own [`PresentedName`] slot.
#[derive(Debug)]
pub struct TlsSetup {
    node_name: String,
    cluster: String,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    members: MemberList,
}

impl TlsSetup {
    /// Checks that `identity` was issued by `ca` (so a misconfigured node
    /// fails at start, not at its first handshake) and prepares the roots.
    pub fn new(identity: &NodeIdentity, ca: &CaCertificate, members: MemberList) -> Result<TlsSetup> {
        let node = identity.node_name.clone();
        let tls_err = |reason: String| Error::Tls {
            node: node.clone(),
            reason,
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.der().clone())
            .map_err(|e| tls_err(format!("the cluster CA certificate is not a usable root: {e}")))?;
        let setup = TlsSetup {
            node_name: node.clone(),
            cluster: ca.cluster_name().to_string(),
            provider: crypto_provider(),
            roots: Arc::new(roots),
            cert: identity.cert_der()?,
            key: identity.key_der()?,
            members,
        };
        let verifier = setup.webpki_server_verifier()?;
        let own_name = ServerName::try_from(node.clone()).map_err(|e| Error::InvalidNodeName {
            name: node.clone(),
            reason: e.to_string(),
        })?;
        verifier
            .verify_server_cert(&setup.cert, &[], &own_name, &[], UnixTime::now())
            .map_err(|e| Error::NotIssuedByCa {
                node: node.clone(),
                ca: ca.cluster_name().to_string(),
                reason: e.to_string(),
            })?;
        Ok(setup)
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The cluster name from the CA.
    pub fn cluster_name(&self) -> &str {
        &self.cluster
    }

    /// The member list the verifiers consult.
    pub fn members(&self) -> &MemberList {
        &self.members
    }

    fn tls_err(&self, reason: String) -> Error {
        Error::Tls {
            node: self.node_name.clone(),
            reason,
        }
    }

    fn webpki_server_verifier(&self) -> Result<Arc<WebPkiServerVerifier>> {
        WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
            .build()
            .map_err(|e| self.tls_err(format!("server certificate verifier: {e}")))
    }

    /// The rustls server configuration for one incoming connection.
    pub fn server_config(&self, presented: PresentedName) -> Result<rustls::ServerConfig> {
        let inner = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
            .build()
            .map_err(|e| self.tls_err(format!("client certificate verifier: {e}")))?;
        let verifier = Arc::new(MemberClientVerifier {
            inner,
            members: self.members.clone(),
            cluster: self.cluster.clone(),
            presented,
        });
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.tls_err(format!("TLS 1.3 with ring: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(|e| self.tls_err(format!("node certificate and key: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// The rustls client configuration for one outgoing connection.
    pub fn client_config(&self, presented: PresentedName) -> Result<rustls::ClientConfig> {
        let verifier = Arc::new(MemberServerVerifier {
            inner: self.webpki_server_verifier()?,
            members: self.members.clone(),
            cluster: self.cluster.clone(),
            presented,
        });
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.tls_err(format!("TLS 1.3 with ring: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(|e| self.tls_err(format!("node certificate and key: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}
