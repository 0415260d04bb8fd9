//! The NBD server of an export: a listener (Unix socket or TCP) and, per
//! client connection, a driver of the sans-IO core [`crate::proto::nbd`] that
//! answers requests from an [`ExportDisk`], several at once, in any order.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::ExportDisk;
use crate::proto::nbd::{Export, Extent, NbdConnection, NbdErrno, NbdEvent, RequestHandle};

/// Requests a connection works on at once; the socket is not read beyond that.
const MAX_PENDING: usize = 16;
/// Bytes read from a client socket at a time.
const READ_BUF_BYTES: usize = 256 << 10;

/// The answer to one request, made by a task and handed back to the connection.
enum Outcome {
    Read(Result<Vec<u8>, NbdErrno>),
    Plain(Result<(), NbdErrno>),
    Status(Result<Vec<Extent>, NbdErrno>),
}

/// Serves one client connection until it disconnects or fails; logs why.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(stream: S, disk: Arc<ExportDisk>, peer: String) {
    let export = Export { name: disk.name().to_string(), size_bytes: disk.size_bytes(), read_only: !disk.writable(), description: Some(disk.description()) };
    let mut conn = match NbdConnection::new(vec![export]) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "export: cannot describe the export to a client");
            return;
        }
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(RequestHandle, Outcome)>();
    let mut buf = vec![0u8; READ_BUF_BYTES];
    let mut tasks = tokio::task::JoinSet::new();
    'conn: loop {
        while let Some(bytes) = conn.poll_transmit() {
            if let Err(e) = wr.write_all(&bytes).await {
                tracing::info!(client = %peer, error = %e, "export: client connection lost");
                break 'conn;
            }
        }
        if conn.is_closed() {
            break;
        }
        while let Some(event) = conn.poll_event() {
            dispatch(event, &disk, &done_tx, &mut tasks, &peer);
        }
        let can_read = conn.wants_input() && conn.pending_requests() < MAX_PENDING;
        tokio::select! {
            read = rd.read(&mut buf), if can_read => match read {
                Ok(0) => conn.handle_eof(),
                Ok(n) => conn.handle_input(&buf[..n]),
                Err(e) => {
                    tracing::info!(client = %peer, error = %e, "export: client connection lost");
                    break 'conn;
                }
            },
            Some((handle, outcome)) = done_rx.recv() => {
                let answered = match outcome {
                    Outcome::Read(r) => conn.reply_read(handle, r),
                    Outcome::Plain(r) => conn.reply(handle, r),
                    Outcome::Status(r) => conn.reply_block_status(handle, r),
                };
                if let Err(e) = answered {
                    tracing::error!(client = %peer, error = %e, "export: answer refused by the protocol core");
                }
            }
        }
    }
    let _ = wr.shutdown().await;
    if let Err(e) = disk.flush().await {
        tracing::error!(client = %peer, error = %e, "export: flushing the overlay at the end of a connection failed");
    }
    match conn.close_error() {
        None => tracing::info!(client = %peer, "export: client disconnected"),
        Some(e) => tracing::info!(client = %peer, reason = %e, "export: connection closed"),
    }
}

fn dispatch(event: NbdEvent, disk: &Arc<ExportDisk>, done: &mpsc::UnboundedSender<(RequestHandle, Outcome)>, tasks: &mut tokio::task::JoinSet<()>, peer: &str) {
    let (disk, done) = (disk.clone(), done.clone());
    match event {
        NbdEvent::Selected { name, .. } => tracing::info!(client = %peer, export = %name, "export: client attached"),
        NbdEvent::Read { handle, offset, len_bytes } => {
            tasks.spawn(async move {
                let _ = done.send((handle, Outcome::Read(disk.read(offset, len_bytes as usize).await)));
            });
        }
        NbdEvent::Write { handle, offset, data, fua } => {
            tasks.spawn(async move {
                let mut r = disk.write(offset, data).await;
                if r.is_ok() && fua {
                    r = disk.flush().await;
                }
                let _ = done.send((handle, Outcome::Plain(r)));
            });
        }
        NbdEvent::WriteZeroes { handle, offset, len_bytes, fua, .. } => {
            tasks.spawn(async move {
                let mut r = disk.write_zeroes(offset, u64::from(len_bytes)).await;
                if r.is_ok() && fua {
                    r = disk.flush().await;
                }
                let _ = done.send((handle, Outcome::Plain(r)));
            });
        }
        // A hint: the data may stay. Keeping it is always correct.
        NbdEvent::Trim { handle, .. } => {
            let _ = done.send((handle, Outcome::Plain(Ok(()))));
        }
        NbdEvent::Flush { handle } => {
            tasks.spawn(async move {
                let _ = done.send((handle, Outcome::Plain(disk.flush().await)));
            });
        }
        NbdEvent::BlockStatus { handle, offset, len_bytes } => {
            let _ = done.send((handle, Outcome::Status(Ok(disk.extents(offset, u64::from(len_bytes))))));
        }
        // The overlay is flushed when the connection ends.
        NbdEvent::Disconnect => {}
    }
}
