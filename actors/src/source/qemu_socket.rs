//! Connections to qemu's sockets (its QMP monitor, its NBD server, a
//! guest agent's channel): a Unix socket on this machine, or TCP to the
//! hypervisor from a proxy on another machine, always with TLS.
//!
//! TLS is mutual, with qemu's x509 credentials in qemu's own folder layout
//! ([`QemuTlsClient::load`]): the server's certificate must be signed by
//! `ca-cert.pem` and name the host the topology gives; this node presents
//! `client-cert.pem`, which qemu's `tls-creds-x509` object (`verify-peer=on`,
//! its default for servers) checks against its CA. The monitor and a guest
//! agent speak TLS from the first byte (a chardev with `tls-creds`); NBD
//! starts plain and upgrades with `NBD_OPT_STARTTLS` ([`QemuStream::start_tls`]).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drmesh_topology::{QemuSocket, QemuTls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// How long a TCP connection or a TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a TLS handshake may take: a monitor serves one client at a
/// time, and answers the next one's handshake only when the last one left
/// (as long as a QMP command may take).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why this node's TLS credentials for qemu cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum QemuTlsError {
    /// A credentials file could not be read or parsed.
    #[error("tls {dir}: {file}: {why}")]
    File {
        /// The credentials folder (`tls` of the volume).
        dir: PathBuf,
        /// Which file.
        file: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

/// This node's client side of qemu's TLS, loaded from a `tls` folder.
#[derive(Clone)]
pub struct QemuTlsClient {
    config: Arc<rustls::ClientConfig>,
    /// The qemu object its NBD server is started with, if named.
    object: Option<String>,
}

impl std::fmt::Debug for QemuTlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("QemuTlsClient").field("object", &self.object).finish_non_exhaustive()
    }
}

impl QemuTlsClient {
    /// Reads `ca-cert.pem`, `client-cert.pem` and `client-key.pem` from the
    /// folder `tls.dir`. The key must be readable by its owner only (0600).
    pub fn load(tls: &QemuTls) -> Result<QemuTlsClient, QemuTlsError> {
        let dir = &tls.dir;
        let fail = |file: &'static str, why: String| QemuTlsError::File { dir: dir.clone(), file, why };
        let certs = |file: &'static str| -> Result<Vec<CertificateDer<'static>>, QemuTlsError> {
            let bytes = read_small_file(&dir.join(file)).map_err(|why| fail(file, why))?;
            let list: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
            let list = list.map_err(|e| fail(file, pem_error(&e)))?;
            if list.is_empty() {
                return Err(fail(file, "holds no PEM certificate".into()));
            }
            Ok(list)
        };
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs("ca-cert.pem")? {
            roots.add(ca).map_err(|e| fail("ca-cert.pem", format!("not a CA certificate rustls accepts: {e}")))?;
        }
        let chain = certs("client-cert.pem")?;
        let key_path = dir.join("client-key.pem");
        let meta = std::fs::metadata(&key_path).map_err(|e| fail("client-key.pem", e.to_string()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(fail("client-key.pem", format!("is readable by other users (mode {:o}); make it 0600 (chmod 600)", meta.mode() & 0o777)));
        }
        let key_bytes = read_small_file(&key_path).map_err(|why| fail("client-key.pem", why))?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| fail("client-key.pem", pem_error(&e)))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail("ca-cert.pem", e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| fail("client-key.pem", format!("does not go with client-cert.pem: {e}")))?;
        Ok(QemuTlsClient { config: Arc::new(config), object: tls.object.clone() })
    }

    /// The id of qemu's `tls-creds-x509` object to start its NBD server
    /// with, when the topology names one.
    pub fn object(&self) -> Option<&str> {
        self.object.as_deref()
    }
}

/// Largest credentials file read: PEM certificates and keys are a few KiB.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// The bytes of a credentials file: a regular file (a symlink to one is
/// fine) of at most [`MAX_PEM_BYTES`]; a FIFO, device or folder is refused
/// without blocking or reading it.
fn read_small_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("is not a regular file (a device, FIFO or folder is not read)".into());
    }
    if meta.len() > MAX_PEM_BYTES {
        return Err(format!("is {} bytes, more than a PEM file of certificates or a key ({} at most)", meta.len(), MAX_PEM_BYTES));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(format!("grew past {MAX_PEM_BYTES} bytes while it was read"));
    }
    Ok(bytes)
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "holds no PEM item of the kind expected".into(),
        other => format!("is not valid PEM ({other})"),
    }
}

/// An open connection to one of qemu's sockets (blocking).
pub enum QemuStream {
    /// A Unix socket.
    Unix(UnixStream),
    /// TCP before TLS started (NBD's handshake begins in the clear).
    Tcp(TcpStream),
    /// TCP with TLS up.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    /// Nothing: what is left while a connection is being upgraded.
    Closed,
}

impl QemuStream {
    /// Connects to `socket`; over TCP, with TLS from the first byte
    /// (`tls` is required then).
    pub fn connect(socket: &QemuSocket, tls: Option<&QemuTlsClient>) -> std::io::Result<QemuStream> {
        match QemuStream::connect_plain(socket)? {
            QemuStream::Tcp(tcp) => QemuStream::Tcp(tcp).start_tls(socket, tls),
            other => Ok(other),
        }
    }

    /// Connects to `socket` without starting TLS.
    pub fn connect_plain(socket: &QemuSocket) -> std::io::Result<QemuStream> {
        match socket {
            QemuSocket::Unix(path) => Ok(QemuStream::Unix(UnixStream::connect(path)?)),
            QemuSocket::Tcp { host, port } => {
                let mut last = None;
                for addr in std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), *port))? {
                    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                        Ok(tcp) => {
                            tcp.set_nodelay(true)?;
                            return Ok(QemuStream::Tcp(tcp));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("host {host} has no address"))))
            }
        }
    }

    /// Runs the TLS handshake as client on a TCP connection to `socket`,
    /// checking that the server's certificate names its host. A Unix
    /// socket is returned as it is.
    pub fn start_tls(self, socket: &QemuSocket, tls: Option<&QemuTlsClient>) -> std::io::Result<QemuStream> {
        let tcp = match self {
            QemuStream::Tcp(tcp) => tcp,
            QemuStream::Closed => return Err(closed()),
            other => return Ok(other),
        };
        let QemuSocket::Tcp { host, .. } = socket else { return Ok(QemuStream::Tcp(tcp)) };
        let Some(tls) = tls else {
            return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "no TLS credentials for a socket over TCP (the volume's `tls`)"));
        };
        let name = ServerName::try_from(host.clone()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("host {host}: {e}")))?;
        let conn = rustls::ClientConnection::new(tls.config.clone(), name).map_err(std::io::Error::other)?;
        let previous = tcp.read_timeout()?;
        tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).map_err(|e| tls_failed(host, e))?;
        }
        stream.sock.set_read_timeout(previous)?;
        Ok(QemuStream::Tls(Box::new(stream)))
    }

    /// Sets how long a read may wait (see [`std::net::TcpStream::set_read_timeout`]).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            QemuStream::Unix(s) => s.set_read_timeout(timeout),
            QemuStream::Tcp(s) => s.set_read_timeout(timeout),
            QemuStream::Tls(s) => s.sock.set_read_timeout(timeout),
            QemuStream::Closed => Err(closed()),
        }
    }

    /// Sets how long a write may wait.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            QemuStream::Unix(s) => s.set_write_timeout(timeout),
            QemuStream::Tcp(s) => s.set_write_timeout(timeout),
            QemuStream::Tls(s) => s.sock.set_write_timeout(timeout),
            QemuStream::Closed => Err(closed()),
        }
    }
}

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "the connection was lost while TLS was being started")
}

/// A failed handshake, said so that an operator can act on it.
fn tls_failed(host: &str, e: std::io::Error) -> std::io::Error {
    let hint = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(why)) => {
            let what = match why {
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. } => format!("does not name {host}"),
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => "has expired".to_string(),
                rustls::CertificateError::NotValidYet | rustls::CertificateError::NotValidYetContext { .. } => "is not valid yet (is this machine's clock right?)".to_string(),
                rustls::CertificateError::Revoked => "is revoked".to_string(),
                _ => "is not signed by the CA this node trusts".to_string(),
            };
            format!("the server's certificate is not trusted: it {what}; it must be signed by ca-cert.pem of the volume's `tls` folder and name {host}")
        }
        Some(rustls::Error::AlertReceived(_)) => {
            "the server refused the handshake: is this node's client-cert.pem signed by the CA of qemu's tls-creds object?".to_string()
        }
        Some(rustls::Error::InvalidMessage(_)) => "the server does not speak TLS here (it sent plain text): give the socket tls-creds in qemu".to_string(),
        Some(other) => other.to_string(),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "the server closed the connection during the handshake: is the socket set up with tls-creds?".into(),
        None if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            format!("no answer to the TLS handshake within {} s: the socket has no tls-creds and waits for plain text, or it serves another client for that long", HANDSHAKE_TIMEOUT.as_secs())
        }
        None => e.to_string(),
    };
    std::io::Error::new(e.kind(), format!("TLS with {host}: {hint}"))
}

impl Read for QemuStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            QemuStream::Unix(s) => s.read(buf),
            QemuStream::Tcp(s) => s.read(buf),
            QemuStream::Tls(s) => match s.read(buf) {
                // qemu closes without close_notify; what was read was whole records.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
                other => other,
            },
            QemuStream::Closed => Err(closed()),
        }
    }
}

impl Write for QemuStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            QemuStream::Unix(s) => s.write(buf),
            QemuStream::Tcp(s) => s.write(buf),
            QemuStream::Tls(s) => s.write(buf),
            QemuStream::Closed => Err(closed()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            QemuStream::Unix(s) => s.flush(),
            QemuStream::Tcp(s) => s.flush(),
            QemuStream::Tls(s) => s.flush(),
            QemuStream::Closed => Err(closed()),
        }
    }
}

/// A key that names `socket` for locks and logs (`monitor/node` style).
pub fn socket_key(socket: &QemuSocket) -> PathBuf {
    match socket {
        QemuSocket::Unix(path) => path.clone(),
        tcp => Path::new("/").join(tcp.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::process::Command;

    use super::*;
    use crate::test_util::run;

    /// Good credentials for 127.0.0.1 in `dir` (scripts/qemu-tls-creds); the client folder.
    fn creds(dir: &Path) -> PathBuf {
        run(Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/qemu-tls-creds")).arg(dir).arg("127.0.0.1"));
        dir.join("client")
    }

    fn load(dir: &Path) -> Result<QemuTlsClient, String> {
        QemuTlsClient::load(&QemuTls { dir: dir.to_path_buf(), object: None }).map_err(|e| e.to_string())
    }

    #[test]
    fn credentials_that_are_not_files_of_pem_are_refused_saying_which_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let client = creds(&tmp.path().join("pki"));
        load(&client).unwrap();
        let at = |file: &str| format!("tls {}: {file}: ", client.display());
        let key = client.join("client-key.pem");
        let good_key = std::fs::read(&key).unwrap();

        // A FIFO where the key was: opening it would wait for a writer forever.
        std::fs::remove_file(&key).unwrap();
        nix::unistd::mkfifo(&key, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = load(&client).unwrap_err();
        assert_eq!(e, format!("{}is not a regular file (a device, FIFO or folder is not read)", at("client-key.pem")));
        std::fs::remove_file(&key).unwrap();
        // A folder.
        std::fs::create_dir(&key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(load(&client).unwrap_err().starts_with(&at("client-key.pem")));
        std::fs::remove_dir(&key).unwrap();
        std::fs::write(&key, &good_key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        load(&client).unwrap();

        // An endless device behind a symlink is never read to its end.
        let ca = client.join("ca-cert.pem");
        let good_ca = std::fs::read(&ca).unwrap();
        std::fs::remove_file(&ca).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &ca).unwrap();
        assert_eq!(load(&client).unwrap_err(), format!("{}is not a regular file (a device, FIFO or folder is not read)", at("ca-cert.pem")));
        std::fs::remove_file(&ca).unwrap();
        // A huge file, an empty one, garbage.
        std::fs::write(&ca, vec![b'A'; 2 << 20]).unwrap();
        assert!(load(&client).unwrap_err().starts_with(&format!("{}is 2097152 bytes, more than a PEM file", at("ca-cert.pem"))));
        std::fs::write(&ca, b"").unwrap();
        assert_eq!(load(&client).unwrap_err(), format!("{}holds no PEM certificate", at("ca-cert.pem")));
        std::fs::write(&ca, b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n").unwrap();
        assert!(load(&client).unwrap_err().starts_with(&format!("{}is not valid PEM", at("ca-cert.pem"))));
        std::fs::write(&ca, &good_ca).unwrap();
        load(&client).unwrap();

        // A key that is not the certificate's.
        let other = creds(&tmp.path().join("other"));
        std::fs::copy(other.join("client-key.pem"), &key).unwrap();
        assert!(load(&client).unwrap_err().starts_with(&format!("{}does not go with client-cert.pem", at("client-key.pem"))));
        // A missing folder.
        let e = load(&tmp.path().join("none")).unwrap_err();
        assert!(e.starts_with(&format!("tls {}: ca-cert.pem: No such file", tmp.path().join("none").display())), "{e}");
    }

    #[test]
    fn the_key_is_never_in_debug_output() {
        let tmp = tempfile::tempdir().unwrap();
        let client = load(&creds(&tmp.path().join("pki"))).unwrap();
        let key = std::fs::read_to_string(tmp.path().join("pki/client/client-key.pem")).unwrap();
        let shown = format!("{client:?}");
        let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!shown.contains(&body[..20]), "{shown}");
    }
}
