//! Mutual TLS with node-id pinning (promise 4: only listed peers get in).
//!
//! Certificates are self-signed, so there is no CA to trust. Instead both sides
//! compute the node id of the certificate they are shown (blake3 of its public
//! key) and accept the handshake only when:
//! - accepting: that id is in the current topology ([`AllowedPeers`]);
//! - dialing: that id is exactly the node the address was dialed for, so a
//!   listed node answering on another listed node's address is refused too.
//!
//! The handshake signature is still checked against the certificate's key, so
//! presenting someone else's certificate without its key fails.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::error::TransportError;
use crate::identity::Identity;
use crate::NodeId;

/// ALPN protocol name of the drmesh mesh protocol; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"drmesh/1";

/// The node id of a DER certificate: blake3 of its SubjectPublicKeyInfo.
pub fn node_id_of_cert(cert_der: &[u8]) -> Result<NodeId, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(NodeId::from_public_key(cert.tbs_certificate.subject_pki.raw))
}

/// The set of node ids allowed to connect, shared with the verifiers and
/// replaced on topology reload (new handshakes see the new set at once).
#[derive(Clone, Default)]
pub struct AllowedPeers(Arc<RwLock<HashSet<NodeId>>>);

impl AllowedPeers {
    /// A set holding `ids`.
    pub fn new(ids: impl IntoIterator<Item = NodeId>) -> Self {
        AllowedPeers(Arc::new(RwLock::new(ids.into_iter().collect())))
    }

    /// Replaces the whole set.
    pub fn replace(&self, ids: impl IntoIterator<Item = NodeId>) {
        let mut set = self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        *set = ids.into_iter().collect();
    }

    /// Whether `id` may connect.
    pub fn contains(&self, id: &NodeId) -> bool {
        self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner()).contains(id)
    }
}

impl fmt::Debug for AllowedPeers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        f.debug_set().entries(set.iter()).finish()
    }
}

/// The crypto provider used everywhere: ring, which builds without extra tools.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn refuse(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(PeerRefused(reason)))))
}

/// Why a peer certificate was refused; carried inside the TLS error so logs name the node id.
#[derive(Debug)]
struct PeerRefused(String);

impl fmt::Display for PeerRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PeerRefused {}

/// rustls shows a custom certificate error with Rust debug text
/// (`invalid peer certificate: Other(OtherError(PeerRefused("...")))`), and
/// quinn passes that text on. This puts the refusal's own words in its place,
/// in any error text, so people read "invalid peer certificate: node X is
/// not in the topology".
pub fn readable(text: &str) -> String {
    const OPEN: &str = "Other(OtherError(PeerRefused(\"";
    const CLOSE: &str = "\")))";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let inner = &rest[start + OPEN.len()..];
        // The debug text escapes quotes and backslashes: find the unescaped end.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in inner.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' if inner[i..].starts_with(CLOSE) => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            out.push_str(&rest[start..]);
            return out;
        };
        let mut unescaped = String::new();
        let mut chars = inner[..end].chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(n) = chars.next() {
                    unescaped.push(n);
                }
            } else {
                unescaped.push(c);
            }
        }
        out.push_str(&unescaped);
        rest = &inner[end + CLOSE.len()..];
    }
    out.push_str(rest);
    out
}

fn check_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    verify_tls13_signature(message, cert, dss, &provider.signature_verification_algorithms)
}

/// Client side: accepts only the one node id that was dialed.
#[derive(Debug)]
struct DialedPeerVerifier {
    expected: NodeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for DialedPeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = node_id_of_cert(end_entity).map_err(refuse)?;
        if id != self.expected {
            return Err(refuse(format!(
                "peer answered as node {id}, but node {} was dialed at this address",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only; a 1.2 signature means something is badly wrong.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Server side: demands a client certificate whose node id is in the topology.
#[derive(Debug)]
struct ListedPeerVerifier {
    allowed: AllowedPeers,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for ListedPeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = node_id_of_cert(end_entity).map_err(refuse)?;
        if !self.allowed.contains(&id) {
            tracing::warn!(peer = %id, "refused a connection from a node that is not in the topology");
            return Err(refuse(format!("node {id} is not in the topology")));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS configuration for accepting connections from listed peers.
pub fn server_config(identity: &Identity, allowed: AllowedPeers) -> Result<rustls::ServerConfig, TransportError> {
    let provider = provider();
    let verifier = Arc::new(ListedPeerVerifier { allowed, provider: provider.clone() });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert_der()], identity.key_der())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// TLS configuration for dialing the node `expected` (and nobody else).
pub fn client_config(identity: &Identity, expected: NodeId) -> Result<rustls::ClientConfig, TransportError> {
    let provider = provider();
    let verifier = Arc::new(DialedPeerVerifier { expected, provider: provider.clone() });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert_der()], identity.key_der())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod readable_tests {
    use super::*;

    #[test]
    fn a_refusal_reads_as_its_own_words() {
        let rustls_text = rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(PeerRefused("node ABC is not in the topology (\"quoted\" \\ back)".into()))))).to_string();
        let shown = readable(&format!("cannot connect to 127.0.0.1:7400: aborted by peer: the cryptographic handshake failed: error 42: {rustls_text}"));
        assert!(shown.ends_with("invalid peer certificate: node ABC is not in the topology (\"quoted\" \\ back)"), "{shown}");
        assert!(!shown.contains("Other(") && !shown.contains("PeerRefused"), "{shown}");
        // Text without the pattern, or with a cut one, is left as it is.
        assert_eq!(readable("timed out"), "timed out");
        assert_eq!(readable("x Other(OtherError(PeerRefused(\"cut"), "x Other(OtherError(PeerRefused(\"cut");
    }
}
