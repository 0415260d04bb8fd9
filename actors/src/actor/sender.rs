//! The sender of a cycle: writes the session's messages to the replication
//! stream in order, pacing blob frames to the cycle's bandwidth limits
//! ([`Pacing`]), and finishes the stream when the session is done.
//!
//! A task, not an actix actor: it owns the QUIC send stream for the life of
//! one cycle. Its mailbox is bounded (8 messages): a slow link or a pacer
//! holds the driver back, which holds the reader back.

use drmesh_transport::endpoint;
use tokio::sync::mpsc;

use crate::actor::pacing::Pacing;
use crate::proto::session::SourceMsg;

/// Messages queued for the stream before the driver waits.
pub const MAILBOX: usize = 8;

/// Starts the sender on `send`; returns its mailbox and the task, which ends
/// with the first write error (`Err`) or, once the mailbox closed, `Ok`.
pub fn start(mut send: quinn::SendStream, pacing: Pacing) -> (mpsc::Sender<SourceMsg>, actix_rt::task::JoinHandle<Result<(), String>>) {
    let (tx, mut rx) = mpsc::channel::<SourceMsg>(MAILBOX);
    let task = actix_rt::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if let SourceMsg::Blob(blob) = &msg {
                pacing.pace(blob.payload.len() as u64).await;
            }
            if let Err(e) = endpoint::send_frame(&mut send, &msg).await {
                return Err(e.to_string());
            }
        }
        let _ = send.finish();
        Ok(())
    });
    (tx, task)
}
