//! An NBD export read as a block device: the way a proxy node reads a VM's
//! disk from qemu, qemu-storage-daemon or qemu-nbd, with its dirty bitmap
//! as a meta context (`qemu:dirty-bitmap:NAME`). A thin blocking driver of
//! the sans-IO client core (`drmesh_proto::nbd::client`) over a Unix
//! socket, or over TCP upgraded to TLS with `NBD_OPT_STARTTLS`.

use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::Duration;

use drmesh_proto::nbd::client::{ClientEvent, NbdClient, NbdClientError, RequestId, StatusExtent, MAX_READ_BYTES};

use drmesh_topology::QemuSocket;

use super::device::BlockDevice;
use super::qemu_socket::{QemuStream, QemuTlsClient};

/// How long a reply may take before the read fails (a stuck server never hangs a cycle).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an NBD export could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum NbdDeviceError {
    /// The socket could not be reached or read.
    #[error("NBD server at {socket}: {source}")]
    Io {
        /// The server's socket.
        socket: QemuSocket,
        /// The cause.
        source: std::io::Error,
    },
    /// The server refused or broke the protocol.
    #[error("NBD server at {socket}: {source}")]
    Protocol {
        /// The server's socket.
        socket: QemuSocket,
        /// What happened.
        source: NbdClientError,
    },
}

/// One open export. Reads are served one at a time over one connection.
pub struct NbdDevice {
    describe: String,
    socket: QemuSocket,
    size: u64,
    contexts: Vec<String>,
    conn: Mutex<Conn>,
}

struct Conn {
    stream: QemuStream,
    client: NbdClient,
    /// For a server over TCP: where, and this node's credentials, to start
    /// TLS when the server agreed to.
    tls: Option<(QemuSocket, QemuTlsClient)>,
    /// What the socket read last (kept: reads are many and alike).
    buf: Vec<u8>,
}

impl Conn {
    fn flush(&mut self) -> std::io::Result<()> {
        while let Some(bytes) = self.client.poll_transmit() {
            self.stream.write_all(&bytes)?;
        }
        Ok(())
    }

    /// Runs the connection until `want` says an event is the one awaited.
    fn until<T>(&mut self, mut want: impl FnMut(ClientEvent) -> Option<T>) -> Result<T, NbdClientError> {
        'io: loop {
            self.flush().map_err(|e| NbdClientError::Usage(format!("writing to the socket: {e}")))?;
            while let Some(event) = self.client.poll_event() {
                if event == ClientEvent::StartTls {
                    // What the core sends next goes out over TLS before anything is read.
                    self.start_tls()?;
                    continue 'io;
                }
                if let Some(found) = want(event) {
                    return Ok(found);
                }
            }
            if let Some(e) = self.client.close_error() {
                return Err(e.clone());
            }
            if self.client.is_closed() {
                return Err(NbdClientError::Closed("before answering"));
            }
            match self.stream.read(&mut self.buf) {
                Ok(0) => self.client.handle_eof(),
                Ok(n) => self.client.handle_input(&self.buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(NbdClientError::Usage(format!("reading from the socket: {e}"))),
            }
        }
    }
}

impl Conn {
    /// The server agreed to TLS: the handshake, on the same connection.
    fn start_tls(&mut self) -> Result<(), NbdClientError> {
        let Some((socket, tls)) = &self.tls else {
            return Err(NbdClientError::Usage("the server started TLS on a connection that did not ask for it".into()));
        };
        let plain = std::mem::replace(&mut self.stream, QemuStream::Closed);
        self.stream = plain.start_tls(socket, Some(tls)).map_err(|e| NbdClientError::Usage(e.to_string()))?;
        self.client.handle_tls_started();
        Ok(())
    }
}

impl NbdDevice {
    /// Connects to the server at `socket` (over TCP: TLS with `tls`,
    /// started with `NBD_OPT_STARTTLS`; never in the clear), opens `export`
    /// and asks for the meta contexts `contexts` (see
    /// [`NbdDevice::contexts`] for those granted).
    pub fn connect(socket: &QemuSocket, tls: Option<&QemuTlsClient>, export: &str, contexts: &[&str]) -> Result<NbdDevice, NbdDeviceError> {
        let io = |source| NbdDeviceError::Io { socket: socket.clone(), source };
        let stream = QemuStream::connect_plain(socket).map_err(io)?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        let (client, tls) = match (socket.is_tcp(), tls) {
            (false, _) => (NbdClient::new(export, contexts), None),
            (true, Some(tls)) => (NbdClient::new_tls(export, contexts), Some((socket.clone(), tls.clone()))),
            (true, None) => return Err(io(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "no TLS credentials for an NBD server over TCP (the volume's `tls`)"))),
        };
        let mut conn = Conn { stream, client, tls, buf: vec![0; 256 << 10] };
        let (size, granted) = conn
            .until(|e| match e {
                ClientEvent::Ready { size, contexts, .. } => Some((size, contexts)),
                _ => None,
            })
            .map_err(|source| NbdDeviceError::Protocol { socket: socket.clone(), source })?;
        Ok(NbdDevice { describe: format!("NBD export {export:?} at {socket}"), socket: socket.clone(), size, contexts: granted, conn: Mutex::new(conn) })
    }

    /// The meta contexts the server granted.
    pub fn contexts(&self) -> &[String] {
        &self.contexts
    }

    /// The status of `len` bytes from `offset` in meta context `context`,
    /// as extents covering exactly that range, in order.
    pub fn block_status(&self, offset: u64, len: u64, context: &str) -> Result<Vec<StatusExtent>, NbdDeviceError> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<StatusExtent> = Vec::new();
        let mut at = offset;
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        while at < end {
            let ask = (end - at).min(u64::from(u32::MAX) & !0xFFF) as u32;
            let protocol = |source| NbdDeviceError::Protocol { socket: self.socket.clone(), source };
            let id = conn.client.block_status(at, ask, context).map_err(protocol)?;
            let result = conn.until(|e| match e {
                ClientEvent::BlockStatus { id: got, result } if got == id => Some(result),
                _ => None,
            });
            let extents = result.map_err(protocol)?.map_err(|e| protocol(NbdClientError::Refused { what: format!("block status at byte {at}"), message: format!("error {}: {}", e.errno, e.message) }))?;
            for mut x in extents {
                if x.offset >= end {
                    break;
                }
                x.len = x.len.min(end - x.offset);
                at = x.offset + x.len;
                match out.last_mut() {
                    Some(last) if last.flags == x.flags && last.offset + last.len == x.offset => last.len += x.len,
                    _ => out.push(x),
                }
            }
        }
        Ok(out)
    }

    fn read_once(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let len = (buf.len() as u64).min(self.size.saturating_sub(offset)).min(u64::from(MAX_READ_BYTES)) as usize;
        if len == 0 {
            return Ok(0);
        }
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let id: RequestId = conn.client.read(offset, len as u32).map_err(std::io::Error::other)?;
        let result = conn
            .until(|e| match e {
                ClientEvent::Read { id: got, result } if got == id => Some(result),
                _ => None,
            })
            .map_err(|e| std::io::Error::other(format!("{}: {e}", self.describe)))?;
        let data = result.map_err(|e| std::io::Error::other(format!("{}: reading {len} bytes at {offset}: error {} {}", self.describe, e.errno, e.message)))?;
        buf[..len].copy_from_slice(&data);
        Ok(len)
    }
}

impl BlockDevice for NbdDevice {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn aligned(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.read_once(buf, offset)
    }

    /// One read request per buffer, all sent before the first reply is
    /// awaited (NBD pipelines them; a round trip per block would leave the
    /// server and the link idle), each reply copied to its buffer as it
    /// comes (in any order): a proxy far from the hypervisor reads at the
    /// link's rate, not one block per round trip. Stops at the end of the
    /// export.
    fn read_vectored_at(&self, bufs: &mut [std::io::IoSliceMut<'_>], offset: u64) -> std::io::Result<usize> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut asked: Vec<(RequestId, usize, usize)> = Vec::with_capacity(bufs.len());
        let mut at = offset;
        for (i, buf) in bufs.iter().enumerate() {
            let len = (buf.len() as u64).min(self.size.saturating_sub(at)).min(u64::from(MAX_READ_BYTES)) as usize;
            if len == 0 {
                break;
            }
            let id = conn.client.read(at, len as u32).map_err(std::io::Error::other)?;
            asked.push((id, i, len));
            at += len as u64;
            if len < buf.len() {
                break;
            }
        }
        let mut left = asked.len();
        while left > 0 {
            let (id, result) = conn
                .until(|e| match e {
                    ClientEvent::Read { id, result } => Some((id, result)),
                    _ => None,
                })
                .map_err(|e| std::io::Error::other(format!("{}: {e}", self.describe)))?;
            // A reply to a read of an earlier call that failed part-way is not this call's.
            let Some(&(_, i, len)) = asked.iter().find(|(want, _, _)| *want == id) else { continue };
            let data = result.map_err(|e| std::io::Error::other(format!("{}: reading {len} bytes: error {} {}", self.describe, e.errno, e.message)))?;
            bufs[i][..len].copy_from_slice(&data);
            left -= 1;
        }
        Ok(asked.iter().map(|(_, _, len)| len).sum())
    }
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        let conn = self.conn.get_mut().unwrap_or_else(|p| p.into_inner());
        conn.client.disconnect();
        let _ = conn.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::Arc;

    use std::path::Path;

    use super::*;
    use crate::source::file::FileSource;
    use crate::test_util::{run, wait_for, Daemon};

    /// qemu-nbd serving `image` read-only as export "vm1" at `socket`, with
    /// the persistent bitmap `bitmap` as a meta context.
    fn qemu_nbd(image: &Path, socket: &Path, bitmap: &str) -> Daemon {
        let child = Command::new("qemu-nbd")
            .args(["--read-only", "--persistent", "--format=qcow2", "--export-name=vm1"])
            .arg(format!("--bitmap={bitmap}"))
            .arg(format!("--socket={}", socket.display()))
            .arg(image)
            .spawn()
            .expect("qemu-nbd (scripts/install-deps installs qemu-utils)");
        let server = Daemon(child);
        wait_for(socket);
        server
    }

    #[test]
    fn a_qcow2_with_a_dirty_bitmap_is_read_through_qemu_nbd() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vm.qcow2");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("64M"));
        run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x11 0 2M"]).arg(&image));
        // The bitmap records what changes from here on: the VM's writes since the last RP.
        run(Command::new("qemu-img").args(["bitmap", "--add"]).arg(&image).arg("b0"));
        run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 1M 64k", "-c", "write -P 0xa5 10M 1M"]).arg(&image));
        let socket = dir.path().join("nbd.sock");
        let _server = qemu_nbd(&image, &socket, "b0");
        let disk = NbdDevice::connect(&QemuSocket::Unix(socket.clone()), None, "vm1", &["base:allocation", "qemu:dirty-bitmap:b0"]).unwrap();
        assert_eq!(disk.size(), 64 << 20);
        assert_eq!(disk.contexts(), ["base:allocation", "qemu:dirty-bitmap:b0"]);

        // Dirty: exactly what was written after the bitmap was added.
        let dirty: Vec<(u64, u64)> = disk.block_status(0, 64 << 20, "qemu:dirty-bitmap:b0").unwrap().into_iter().filter(|x| x.flags & 1 != 0).map(|x| (x.offset, x.len)).collect();
        assert_eq!(dirty, vec![(1 << 20, 64 << 10), (10 << 20, 1 << 20)]);
        // Allocated (not a hole): the first 2 MiB and the 1 MiB at 10 MiB.
        let allocated: Vec<(u64, u64)> = disk.block_status(0, 64 << 20, "base:allocation").unwrap().into_iter().filter(|x| x.flags & 1 == 0).map(|x| (x.offset, x.len)).collect();
        assert_eq!(allocated, vec![(0, 2 << 20), (10 << 20, 1 << 20)]);

        // The whole disk read through the file source equals qemu-img's raw conversion.
        let raw = dir.path().join("vm.raw");
        drop(disk);
        run(Command::new("qemu-img").args(["convert", "-U", "-f", "qcow2", "-O", "raw"]).arg(&image).arg(&raw));
        let disk: Arc<dyn BlockDevice> = Arc::new(NbdDevice::connect(&QemuSocket::Unix(socket.clone()), None, "vm1", &[]).unwrap());
        let source = FileSource::on(disk, 1 << 20);
        let read: Vec<u8> = source.read_run(0, source.block_count() as usize).unwrap().iter().flat_map(|b| b.to_vec()).collect();
        assert!(read == std::fs::read(&raw).unwrap(), "the disk read over NBD differs from qemu-img convert's");
        assert!(read[(1 << 20)..(1 << 20) + 65536].iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn a_missing_server_export_or_bitmap_says_what() {
        let dir = tempfile::tempdir().unwrap();
        let e = NbdDevice::connect(&QemuSocket::Unix(dir.path().join("none.sock")), None, "vm1", &[]).err().unwrap().to_string();
        assert!(e.starts_with(&format!("NBD server at {}", dir.path().join("none.sock").display())), "{e}");
        let image = dir.path().join("vm.qcow2");
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("16M"));
        run(Command::new("qemu-img").args(["bitmap", "--add"]).arg(&image).arg("b0"));
        let socket = dir.path().join("nbd.sock");
        let _server = qemu_nbd(&image, &socket, "b0");
        let e = NbdDevice::connect(&QemuSocket::Unix(socket.clone()), None, "other", &[]).err().unwrap().to_string();
        assert!(e.contains("refused export \"other\""), "{e}");
        // A bitmap the server does not export is not granted.
        let disk = NbdDevice::connect(&QemuSocket::Unix(socket.clone()), None, "vm1", &["qemu:dirty-bitmap:b9"]).unwrap();
        assert!(disk.contexts().is_empty());
        let e = disk.block_status(0, 4096, "qemu:dirty-bitmap:b9").err().unwrap().to_string();
        assert!(e.contains("was not granted"), "{e}");
    }
}
