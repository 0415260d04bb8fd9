//! The transport crate's one error type.

use std::path::PathBuf;

/// What went wrong in identity handling, TLS set-up or the QUIC endpoint.
/// None of these leaves partial state behind: a failed `init` writes no files,
/// a failed bind opens no socket.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// An identity already exists and `--force` was not given; nothing was written.
    #[error("an identity already exists in {dir} (node id {node_id}); use --force to replace it, which changes the node id")]
    IdentityExists {
        /// The state directory.
        dir: PathBuf,
        /// The id of the identity that was kept.
        node_id: String,
    },
    /// No identity in the state directory.
    #[error("no node identity in {dir}; create one with `drmesh init --state-dir {dir} --name NAME`")]
    NoIdentity {
        /// The state directory.
        dir: PathBuf,
    },
    /// A key or certificate file is readable or writable by group or others.
    #[error("{path} has mode {mode:o}; key files must not be accessible to group or others (chmod 600 {path})")]
    InsecureMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("reading", "writing", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A key or certificate could not be made or parsed.
    #[error("bad key or certificate {what}: {reason}")]
    BadCertificate {
        /// Which object (a path, or "generated key").
        what: String,
        /// The cause.
        reason: String,
    },
    /// rustls refused the TLS configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The QUIC endpoint could not be opened (address in use, permission, ...).
    #[error("cannot open QUIC endpoint on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A connection attempt failed before the handshake finished.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address dialed.
        addr: std::net::SocketAddr,
        /// The cause, including refusals by the peer-pinning check.
        reason: String,
    },
}
