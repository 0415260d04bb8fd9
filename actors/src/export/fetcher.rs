//! Blob chains of an exported RP fetched from a holder, many requests in
//! flight, moving to another holder when one becomes unreachable.
//!
//! One task owns the fetch stream: it sends requests as they come (up to a
//! window), and a second task reads the replies (in request order) so that a
//! read is never cancelled half-way. When the stream fails, the requests in
//! flight are sent again on a stream to the next holder that has the same RP
//! (same seq and Merkle root); every block is verified by its content id
//! after it arrives, whoever served it.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::actor::fetch::FetchClient;
use crate::proto::fetch::{FetchReply, FetchRequest};
use crate::content::ContentId;
use crate::store::{EncodedBlob, RpMeta};

/// Chain requests kept in flight on the stream.
const WINDOW: usize = 32;
/// Rounds over all holders before the pending requests fail.
const CONNECT_ROUNDS: u32 = 5;

/// Opens a fetch stream to the next holder to try; None when there is none left
/// in this round. The string names the holder, for logs.
pub type Connect = Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = Option<(String, Result<FetchClient, String>)>> + Send>> + Send + Sync>;

type Answer = oneshot::Sender<Result<Vec<EncodedBlob>, String>>;

/// Hands out blob chains; cheap to clone.
#[derive(Clone)]
pub struct Fetcher {
    tx: mpsc::Sender<(ContentId, Answer)>,
}

impl Fetcher {
    /// A fetcher over holders that `connect` opens in turn (index 0, 1, ...),
    /// starting on `first` (already open; its RP request was answered with `meta`).
    pub fn new(first: Option<(String, FetchClient)>, meta: RpMeta, connect: Option<Connect>) -> Fetcher {
        let (tx, rx) = mpsc::channel(WINDOW * 2);
        tokio::spawn(run(first, meta, connect, rx));
        Fetcher { tx }
    }

    /// A fetcher over one open stream, with no other holder to move to.
    pub fn single(client: FetchClient, meta: RpMeta) -> Fetcher {
        Fetcher::new(Some(("the holder".into(), client)), meta, None)
    }

    /// The blob chain of `content`, head first, or why it could not be had.
    pub async fn chain(&self, content: ContentId) -> Result<Vec<EncodedBlob>, String> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((content, tx)).await.map_err(|_| "the fetcher stopped".to_string())?;
        rx.await.map_err(|_| "the fetcher stopped".to_string())?
    }
}

/// Opens the next holder's stream for `meta`: it must answer the RP request with
/// the same Merkle root.
async fn reconnect(connect: &Connect, meta: &RpMeta, next: &mut usize) -> Option<(String, FetchClient)> {
    for _round in 0..CONNECT_ROUNDS {
        loop {
            let Some((name, opened)) = connect(*next).await else {
                *next = 0;
                break;
            };
            *next += 1;
            let mut client = match opened {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(holder = %name, error = %e, "export: holder unreachable");
                    continue;
                }
            };
            let asked = client.request(&FetchRequest::Rp { volume: meta.volume.clone(), seq: Some(meta.seq) }).await;
            match (asked, client.reply().await) {
                (Ok(()), Ok(FetchReply::Rp(m))) if m.merkle_root == meta.merkle_root => {
                    tracing::info!(holder = %name, rp = %meta.name(), "export: fetching blocks from this holder");
                    return Some((name, client));
                }
                (_, Ok(FetchReply::Rp(_))) => tracing::warn!(holder = %name, rp = %meta.name(), "export: holder has another RP under this number; skipped"),
                (_, Ok(FetchReply::Error(e))) | (Err(e), _) | (_, Err(e)) => tracing::warn!(holder = %name, error = %e, "export: holder cannot serve the RP"),
                (_, Ok(_)) => tracing::warn!(holder = %name, "export: holder answered out of turn"),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    None
}

async fn run(first: Option<(String, FetchClient)>, meta: RpMeta, connect: Option<Connect>, mut rx: mpsc::Receiver<(ContentId, Answer)>) {
    let mut queued: VecDeque<(ContentId, Answer)> = VecDeque::new();
    let mut next = 0;
    let mut current = first;
    loop {
        let (holder, client) = match current.take() {
            Some(c) => c,
            None => {
                let found = match &connect {
                    Some(c) => reconnect(c, &meta, &mut next).await,
                    None => None,
                };
                match found {
                    Some(c) => c,
                    None => {
                        let why = format!("no holder of {} is reachable", meta.name());
                        for (_, answer) in queued.drain(..) {
                            let _ = answer.send(Err(why.clone()));
                        }
                        // Later requests fail the same way until a holder comes back.
                        match rx.recv().await {
                            Some(req) => {
                                queued.push_back(req);
                                continue;
                            }
                            None => return,
                        }
                    }
                }
            }
        };
        let (mut sender, mut replies) = client.into_parts();
        let (reply_tx, mut reply_rx) = mpsc::channel(WINDOW);
        let reader = tokio::spawn(async move {
            loop {
                let r = replies.reply().await;
                let failed = r.is_err();
                if reply_tx.send(r).await.is_err() || failed {
                    return;
                }
            }
        });
        let mut in_flight: VecDeque<(ContentId, Answer)> = VecDeque::new();
        let broken = 'stream: loop {
            while in_flight.len() < WINDOW {
                let Some((content, answer)) = queued.pop_front() else { break };
                if answer.is_closed() {
                    continue;
                }
                if let Err(e) = sender.request(&FetchRequest::Content(content)).await {
                    queued.push_front((content, answer));
                    break 'stream Some(e);
                }
                in_flight.push_back((content, answer));
            }
            tokio::select! {
                req = rx.recv() => match req {
                    Some(req) => queued.push_back(req),
                    None if in_flight.is_empty() => break None,
                    None => {}
                },
                reply = reply_rx.recv(), if !in_flight.is_empty() => {
                    let Some((content, answer)) = in_flight.pop_front() else { continue };
                    match reply {
                        Some(Ok(reply)) => {
                            let _ = answer.send(FetchClient::chain(reply));
                        }
                        Some(Err(e)) => {
                            in_flight.push_front((content, answer));
                            break Some(e);
                        }
                        None => {
                            in_flight.push_front((content, answer));
                            break Some("the reply reader stopped".into());
                        }
                    }
                }
            }
        };
        reader.abort();
        match broken {
            None => return,
            Some(e) => {
                tracing::warn!(holder = %holder, error = %e, requests = in_flight.len(), "export: fetch stream lost; moving to another holder");
                // Their contents are asked for again, in the same order, before anything newer.
                for (content, answer) in in_flight.into_iter().rev() {
                    queued.push_front((content, answer));
                }
            }
        }
    }
}
