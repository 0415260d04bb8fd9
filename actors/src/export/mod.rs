//! Instant recovery: a recovery point served as a disk over NBD before any
//! restore, with a copy-on-write overlay for writes.
//!
//! - [`image::RpImage`] reads the RP: blocks are decoded lazily from the local
//!   store or fetched from a holder ([`fetcher::Fetcher`], which moves to
//!   another holder when one becomes unreachable), each verified against its
//!   content id before it is served; a bad block is an I/O error for the read
//!   that needs it, never other data.
//! - [`overlay::Overlay`] takes every write; the RP is never written.
//! - [`ExportDisk`] is the two together, as a disk; [`server`] speaks NBD for it
//!   on a Unix socket (mode 0600) or a loopback TCP port.

pub mod fetcher;
pub mod image;
pub mod overlay;
pub mod server;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};

use self::image::RpImage;
use self::overlay::{Overlay, OverlayError, PAGE_BYTES};
use std::os::unix::fs::DirBuilderExt;
use crate::proto::nbd::{Extent, NbdErrno};
use crate::store::{RpSeq, VolumeName};

/// Why an export could not start. Nothing was left behind: no socket, no overlay
/// file (an overlay given with `--overlay` is kept as it was).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The overlay could not be made or opened.
    #[error("{0}")]
    Overlay(#[from] OverlayError),
    /// The RP could not be opened (not there, block map damaged, holder unreachable).
    #[error("{0}")]
    Read(#[from] crate::restore::RestoreError),
    /// The listening socket could not be made.
    #[error("cannot listen on {what}: {cause}")]
    Listen {
        /// The socket path or address.
        what: String,
        /// Why, and what to do.
        cause: String,
    },
}

/// An exported RP: reads from the RP and the overlay, writes to the overlay.
pub struct ExportDisk {
    image: Arc<RpImage>,
    overlay: Option<Arc<Overlay>>,
    name: String,
    /// Serializes writes: a partial page is read, merged and written whole.
    writes: tokio::sync::Mutex<()>,
}

fn io_fault(e: impl std::fmt::Display) -> NbdErrno {
    tracing::error!(error = %e, "export: overlay I/O failed");
    NbdErrno::Io
}

impl ExportDisk {
    /// The disk of `image`, writable into `overlay` (read-only when None), named
    /// `name` for NBD clients.
    pub fn new(image: Arc<RpImage>, overlay: Option<Overlay>, name: String) -> Arc<ExportDisk> {
        Arc::new(ExportDisk { image, overlay: overlay.map(Arc::new), name, writes: tokio::sync::Mutex::new(()) })
    }

    /// The NBD export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes of the disk.
    pub fn size_bytes(&self) -> u64 {
        self.image.meta().volume_bytes
    }

    /// Whether writes are taken (into an overlay).
    pub fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    /// The RP image underneath.
    pub fn image(&self) -> &Arc<RpImage> {
        &self.image
    }

    /// The overlay, if writable.
    pub fn overlay(&self) -> Option<&Arc<Overlay>> {
        self.overlay.as_ref()
    }

    /// A line for NBD clients that list exports.
    pub fn description(&self) -> String {
        let m = self.image.meta();
        format!("drmesh recovery point {} ({} bytes, {} consistency){}", m.name(), m.volume_bytes, m.consistency, if self.writable() { ", writes go to an overlay" } else { ", read-only" })
    }

    /// Reads `len` bytes at `offset`: overlay pages where written, the RP elsewhere.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, NbdErrno> {
        let Some(overlay) = &self.overlay else {
            return self.image.read(offset, len).await.map_err(|_| NbdErrno::Io);
        };
        let end = offset + len as u64;
        let first_page = offset / PAGE_BYTES;
        let last_page = (end - 1) / PAGE_BYTES;
        let all_in_overlay = (first_page..=last_page).all(|p| overlay.has_page(p));
        let mut out = if all_in_overlay { vec![0u8; len] } else { self.image.read(offset, len).await.map_err(|_| NbdErrno::Io)? };
        if overlay.has_any(offset, len as u64) {
            let overlay = overlay.clone();
            out = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, NbdErrno> {
                let mut p = first_page;
                while p <= last_page {
                    if !overlay.has_page(p) {
                        p += 1;
                        continue;
                    }
                    let run_start = p;
                    while p <= last_page && overlay.has_page(p) {
                        p += 1;
                    }
                    let from = (run_start * PAGE_BYTES).max(offset);
                    let to = (p * PAGE_BYTES).min(end);
                    overlay.read_at(&mut out[(from - offset) as usize..(to - offset) as usize], from).map_err(io_fault)?;
                }
                Ok(out)
            })
            .await
            .map_err(io_fault)??;
        }
        Ok(out)
    }

    /// Writes `data` at `offset` into the overlay (pages partly covered are
    /// completed from what the disk holds there).
    pub async fn write(&self, offset: u64, data: Vec<u8>) -> Result<(), NbdErrno> {
        let Some(overlay) = self.overlay.clone() else { return Err(NbdErrno::Perm) };
        let _w = self.writes.lock().await;
        let end = offset + data.len() as u64;
        let span_start = offset / PAGE_BYTES * PAGE_BYTES;
        let span_end = end.next_multiple_of(PAGE_BYTES).min(self.size_bytes());
        let head_partial = offset != span_start && !overlay.has_page(span_start / PAGE_BYTES);
        let tail_page = (end - 1) / PAGE_BYTES;
        let tail_partial = end != span_end && !overlay.has_page(tail_page);
        let (buf, at) = if head_partial || tail_partial {
            // Whole pages: the disk's current bytes, then the new ones on top.
            let mut whole = self.read(span_start, (span_end - span_start) as usize).await?;
            whole[(offset - span_start) as usize..(end - span_start) as usize].copy_from_slice(&data);
            (whole, span_start)
        } else {
            (data, offset)
        };
        // Every page `buf` covers partly is in the overlay by now (or was completed above).
        tokio::task::spawn_blocking(move || overlay.write_at(&buf, at)).await.map_err(io_fault)?.map_err(io_fault)
    }

    /// Makes `offset .. offset + len` read as zeros.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), NbdErrno> {
        let Some(overlay) = self.overlay.clone() else { return Err(NbdErrno::Perm) };
        let end = offset + len;
        let inner_start = offset.next_multiple_of(PAGE_BYTES);
        let inner_end = if end == self.size_bytes() { end } else { end / PAGE_BYTES * PAGE_BYTES };
        if inner_start >= inner_end {
            return self.write(offset, vec![0u8; len as usize]).await;
        }
        if offset < inner_start {
            self.write(offset, vec![0u8; (inner_start - offset) as usize]).await?;
        }
        {
            let _w = self.writes.lock().await;
            let o = overlay.clone();
            tokio::task::spawn_blocking(move || o.zero_pages(inner_start, inner_end - inner_start)).await.map_err(io_fault)?.map_err(io_fault)?;
        }
        if inner_end < end {
            self.write(inner_end, vec![0u8; (end - inner_end) as usize]).await?;
        }
        Ok(())
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), NbdErrno> {
        let Some(overlay) = self.overlay.clone() else { return Ok(()) };
        tokio::task::spawn_blocking(move || overlay.flush()).await.map_err(io_fault)?.map_err(io_fault)
    }

    /// Allocation from `offset` for about `len` bytes, a block of the RP at a
    /// time: zero (and a hole) where the RP's block is zero and nothing was
    /// written over it, data elsewhere.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        let meta = self.image.meta();
        let bb = u64::from(meta.block_bytes);
        let end = (offset + len).min(meta.volume_bytes);
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end && out.len() < 1024 {
            let index = at / bb;
            let block_end = ((index + 1) * bb).min(meta.volume_bytes);
            let n = (block_end - at).min(u64::from(u32::MAX));
            let zero = self.image.is_zero_block(index) && !self.overlay.as_ref().is_some_and(|o| o.has_any(at, n));
            match out.last_mut() {
                Some(last) if last.zero == zero && u64::from(last.len_bytes) + n <= u64::from(u32::MAX) => last.len_bytes += n as u32,
                _ => out.push(Extent { len_bytes: n as u32, zero, hole: zero }),
            }
            at = block_end;
        }
        out
    }
}

/// Where an export's writes go.
#[derive(Debug, Clone)]
pub enum OverlayChoice {
    /// Nowhere: the export is read-only.
    ReadOnly,
    /// An unnamed temporary file in this folder, gone when the export ends.
    Temporary(PathBuf),
    /// This file: created if missing, else reopened (it must belong to the same RP).
    File(PathBuf),
}

/// Opens `volume@seq` from `source` as an export named `VOLUME@SEQ` with its
/// overlay (see [`RpImage::open`] for `failover`).
pub async fn open_disk(
    source: crate::restore::RpSource,
    volume: &VolumeName,
    seq: Option<RpSeq>,
    codec: crate::codec::BlockCodec,
    overlay: &OverlayChoice,
    failover: Option<(String, fetcher::Connect)>,
) -> Result<Arc<ExportDisk>, ExportError> {
    let image = Arc::new(RpImage::open(source, volume, seq, codec, image::DEFAULT_CACHE_BYTES, failover).await?);
    let meta = image.meta().clone();
    let overlay = match overlay.clone() {
        OverlayChoice::ReadOnly => None,
        OverlayChoice::Temporary(dir) => Some(tokio::task::spawn_blocking(move || Overlay::create(None, &dir, &meta)).await.map_err(|e| ExportError::Listen { what: "overlay".into(), cause: e.to_string() })??),
        OverlayChoice::File(path) => Some(
            tokio::task::spawn_blocking(move || if path.exists() || std::fs::symlink_metadata(&path).is_ok() { Overlay::open(&path, &meta) } else { Overlay::create(Some(&path), Path::new("."), &meta) })
                .await
                .map_err(|e| ExportError::Listen { what: "overlay".into(), cause: e.to_string() })??,
        ),
    };
    let name = image.meta().name();
    Ok(ExportDisk::new(image, overlay, name))
}

/// Where an export listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A Unix socket at this path (mode 0600).
    Unix(PathBuf),
    /// A TCP address; only loopback addresses are taken (NBD has no authentication here).
    Tcp(SocketAddr),
}

impl Endpoint {
    /// The NBD URI of `export` at this endpoint (as qemu-img and libnbd take it).
    pub fn uri(&self, export: &str) -> String {
        let name: String = export.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect();
        match self {
            Endpoint::Unix(path) => format!("nbd+unix:///{name}?socket={}", path.display()),
            Endpoint::Tcp(addr) => format!("nbd://{addr}/{name}"),
        }
    }
}

/// A running export; dropping it stops the server, ends every client
/// connection and removes the socket.
pub struct RunningExport {
    endpoint: Endpoint,
    task: tokio::task::JoinHandle<()>,
}

impl RunningExport {
    /// Where it listens (for a TCP port 0, the port chosen).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl Drop for RunningExport {
    fn drop(&mut self) {
        self.task.abort();
        if let Endpoint::Unix(path) = &self.endpoint {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds a Unix socket at `path` without a moment in which others could reach
/// it: bound in a fresh private folder beside it, made 0600, then renamed to
/// `path` (never replacing anything; a stale socket left by a killed export is
/// removed first, anything else at `path` is refused).
fn bind_private(path: &Path) -> Result<UnixListener, ExportError> {
    let fail = |cause: String| ExportError::Listen { what: path.display().to_string(), cause };
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(fail("another export answers there".into()));
            }
            std::fs::remove_file(path).map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
        }
        Ok(_) => return Err(fail("something that is not a socket is there; choose another path".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let private = (0..8)
        .find_map(|i| {
            let dir = parent.join(format!(".drmesh-export-{}-{i}", std::process::id()));
            std::fs::DirBuilder::new().mode(0o700).create(&dir).ok().map(|()| dir)
        })
        .ok_or_else(|| fail(format!("cannot make a private folder in {}", parent.display())))?;
    let inner = private.join("sock");
    let result = (|| {
        let listener = UnixListener::bind(&inner).map_err(|e| fail(e.to_string()))?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600)).map_err(|e| fail(e.to_string()))?;
        nix::fcntl::renameat2(nix::fcntl::AT_FDCWD, inner.as_path(), nix::fcntl::AT_FDCWD, path, nix::fcntl::RenameFlags::RENAME_NOREPLACE)
            .or_else(|e| if e == nix::errno::Errno::EINVAL { std::fs::rename(&inner, path).map_err(|_| e) } else { Err(e) })
            .map_err(|e| fail(format!("cannot move the socket into place: {e}")))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&private);
    result
}

/// Starts serving `disk` at `endpoint` on the current tokio runtime.
pub async fn start(disk: Arc<ExportDisk>, endpoint: Endpoint) -> Result<RunningExport, ExportError> {
    match endpoint {
        Endpoint::Unix(path) => {
            let listener = bind_private(&path)?;
            let task = tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                let mut n = 0u64;
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            n += 1;
                            connections.spawn(server::serve_connection(stream, disk.clone(), format!("unix#{n}")));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "export: accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            });
            Ok(RunningExport { endpoint: Endpoint::Unix(path), task })
        }
        Endpoint::Tcp(addr) => {
            if !addr.ip().is_loopback() {
                return Err(ExportError::Listen {
                    what: addr.to_string(),
                    cause: "only loopback addresses are served: NBD over TCP has no authentication or encryption here; reach the export from another machine through an SSH tunnel to its Unix socket".into(),
                });
            }
            let listener = TcpListener::bind(addr).await.map_err(|e| ExportError::Listen { what: addr.to_string(), cause: e.to_string() })?;
            let bound = listener.local_addr().map_err(|e| ExportError::Listen { what: addr.to_string(), cause: e.to_string() })?;
            let task = tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    match listener.accept().await {
                        Ok((stream, peer)) => {
                            let _ = stream.set_nodelay(true);
                            connections.spawn(server::serve_connection(stream, disk.clone(), peer.to_string()));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "export: accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            });
            Ok(RunningExport { endpoint: Endpoint::Tcp(bound), task })
        }
    }
}
