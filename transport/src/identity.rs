//! A node's identity: its key pair, its self-signed certificate and the node id.
//!
//! The identity lives in the node's state directory as `node.key` (PKCS#8 PEM)
//! and `node.crt` (PEM), both mode 0600, in a directory of mode 0700. The key is
//! Ed25519. The node id is blake3 of the certificate's public key, so it can be
//! recomputed by any peer from the certificate it is shown during the handshake.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::TransportError;
use crate::tls::node_id_of_cert;
use crate::NodeId;

/// File name of the private key inside a state directory.
pub const KEY_FILE: &str = "node.key";
/// File name of the certificate inside a state directory.
pub const CERT_FILE: &str = "node.crt";

/// A node's key, certificate and id, loaded and checked to belong together.
pub struct Identity {
    key_der: Vec<u8>,
    cert_der: Vec<u8>,
    node_id: NodeId,
}

impl std::fmt::Debug for Identity {
    // Hand-written so that the private key can never end up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TransportError + 'a {
    move |source| TransportError::Io { action, path: path.to_path_buf(), source }
}

impl Identity {
    /// Makes a fresh Ed25519 key and a self-signed certificate naming `name`.
    pub fn generate(name: &str) -> Result<Identity, TransportError> {
        Self::generate_pem(name).map(|(identity, _, _)| identity)
    }

    /// Like [`Identity::generate`], also returning the key and certificate as PEM.
    fn generate_pem(name: &str) -> Result<(Identity, String, String), TransportError> {
        let bad = |e: rcgen::Error| TransportError::BadCertificate {
            what: "generated key".into(),
            reason: e.to_string(),
        };
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(bad)?;
        let mut params = rcgen::CertificateParams::new(vec!["drmesh".to_string()]).map_err(bad)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("drmesh node {name}"));
        let cert = params.self_signed(&key).map_err(bad)?;
        let identity = Self::from_der(key.serialize_der(), cert.der().to_vec(), "generated key")?;
        Ok((identity, key.serialize_pem(), cert.pem()))
    }

    fn from_der(key_der: Vec<u8>, cert_der: Vec<u8>, what: &str) -> Result<Identity, TransportError> {
        let node_id = node_id_of_cert(&cert_der).map_err(|reason| TransportError::BadCertificate {
            what: what.to_string(),
            reason,
        })?;
        let key = rcgen::KeyPair::try_from(key_der.as_slice()).map_err(|e| TransportError::BadCertificate {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
        if NodeId::from_public_key(&key.public_key_der()) != node_id {
            return Err(TransportError::BadCertificate {
                what: what.to_string(),
                reason: "the certificate does not belong to the private key".into(),
            });
        }
        Ok(Identity { key_der, cert_der, node_id })
    }

    /// Creates a new identity in `dir` (made with mode 0700 if missing).
    /// Refuses to replace an existing one unless `force`; on error nothing changed.
    pub fn create(dir: &Path, name: &str, force: bool) -> Result<Identity, TransportError> {
        if !force && (dir.join(KEY_FILE).exists() || dir.join(CERT_FILE).exists()) {
            let node_id = Identity::load(dir).map(|i| i.node_id.to_string()).unwrap_or_else(|e| format!("unreadable: {e}"));
            return Err(TransportError::IdentityExists { dir: dir.to_path_buf(), node_id });
        }
        ensure_private_dir(dir)?;
        let (identity, key_pem, cert_pem) = Identity::generate_pem(name)?;
        write_private(&dir.join(KEY_FILE), key_pem.as_bytes())?;
        write_private(&dir.join(CERT_FILE), cert_pem.as_bytes())?;
        Ok(identity)
    }

    /// Loads the identity of `dir`, refusing key files that others can read.
    pub fn load(dir: &Path) -> Result<Identity, TransportError> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        if !key_path.exists() {
            return Err(TransportError::NoIdentity { dir: dir.to_path_buf() });
        }
        for path in [&key_path, &cert_path] {
            let meta = fs::metadata(path).map_err(io_err("reading", path))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(TransportError::InsecureMode { path: path.clone(), mode });
            }
        }
        let key_der = read_pem(&key_path, "PRIVATE KEY")?;
        let cert_der = read_pem(&cert_path, "CERTIFICATE")?;
        Self::from_der(key_der, cert_der, &cert_path.display().to_string())
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The certificate, as presented to peers.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    /// A secret for QUIC stateless resets, derived from the private key so that it
    /// is the same after a restart: a restarted node can then reset connections its
    /// previous run left behind, and peers reconnect at once instead of waiting for
    /// the idle timeout. One-way: it reveals nothing about the key.
    pub(crate) fn reset_secret(&self) -> [u8; 32] {
        blake3::derive_key("drmesh 2026 QUIC stateless reset", &self.key_der)
    }

    /// The private key, for the TLS configuration only.
    pub(crate) fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// Creates `dir` with mode 0700, or tightens an existing one that others can enter.
pub fn ensure_private_dir(dir: &Path) -> Result<(), TransportError> {
    fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
    let meta = fs::metadata(dir).map_err(io_err("reading", dir))?;
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err("setting mode 0700 on", dir))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` through a 0600 temporary file, fsync and rename, so a
/// crash leaves either the old file or the new one.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TransportError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    file.write_all(bytes).map_err(io_err("writing", &tmp))?;
    file.sync_all().map_err(io_err("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io_err("syncing directory", parent))?;
    }
    Ok(())
}

fn read_pem(path: &Path, label: &str) -> Result<Vec<u8>, TransportError> {
    let text = fs::read_to_string(path).map_err(io_err("reading", path))?;
    use rustls::pki_types::pem::PemObject;
    let bad = |reason: String| TransportError::BadCertificate { what: path.display().to_string(), reason };
    match label {
        "CERTIFICATE" => CertificateDer::from_pem_slice(text.as_bytes())
            .map(|c| c.to_vec())
            .map_err(|e| bad(format!("not a PEM certificate: {e:?}"))),
        _ => PrivatePkcs8KeyDer::from_pem_slice(text.as_bytes())
            .map(|k| k.secret_pkcs8_der().to_vec())
            .map_err(|e| bad(format!("not a PEM PKCS#8 private key: {e:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_load_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let made = Identity::create(&state, "branch-1", false).unwrap();
        for file in [KEY_FILE, CERT_FILE] {
            let mode = fs::metadata(state.join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
        assert_eq!(fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        let loaded = Identity::load(&state).unwrap();
        assert_eq!(made.node_id(), loaded.node_id());

        let err = Identity::create(&state, "branch-1", false).unwrap_err();
        assert!(err.to_string().contains(&made.node_id().to_string()), "{err}");
        assert_eq!(Identity::load(&state).unwrap().node_id(), made.node_id());

        let forced = Identity::create(&state, "branch-1", true).unwrap();
        assert_ne!(forced.node_id(), made.node_id());
        assert_eq!(Identity::load(&state).unwrap().node_id(), forced.node_id());
    }

    #[test]
    fn refuses_key_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        Identity::create(dir.path(), "n", false).unwrap();
        fs::set_permissions(dir.path().join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(dir.path()).unwrap_err();
        assert!(matches!(err, TransportError::InsecureMode { mode: 0o644, .. }), "{err}");
    }

    #[test]
    fn refuses_mismatched_key_and_certificate() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        Identity::create(a.path(), "a", false).unwrap();
        Identity::create(b.path(), "b", false).unwrap();
        fs::copy(b.path().join(CERT_FILE), a.path().join(CERT_FILE)).unwrap();
        let err = Identity::load(a.path()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn debug_never_shows_the_key() {
        let id = Identity::generate("x").unwrap();
        let shown = format!("{id:?}");
        assert!(!shown.contains("key_der"));
    }
}
