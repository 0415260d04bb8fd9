//! Fetch streams: reading a recovery point from the node that holds it, so a
//! node can restore an RP it does not hold itself.
//!
//! The client sends [`FetchRequest`]s and the server answers each with one
//! [`FetchReply`], in order; the client keeps several requests in flight so the
//! link stays busy. Only the volume's source node and its targets may fetch.
//! The blobs of the replies keep to the `[[link]]` cap between the two nodes,
//! shared with the replication this node sends the same peer.

use std::sync::Arc;

use drmesh_topology::{NodeId, Topology};
use drmesh_transport::endpoint::{self, MessageReader};
use drmesh_transport::wire::{StreamHeader, StreamKind, MAX_DATA_FRAME_BYTES};

use crate::actor::pacing::LinkPacers;
use crate::content::ContentId;
use crate::proto::session::WireBlob;
use crate::store::{EncodedBlob, ReadStore, RpMeta, StoreError};

/// Largest fetch reply: a delta chain of full depth over the largest block.
pub const MAX_REPLY_BYTES: usize = MAX_DATA_FRAME_BYTES * 10;
pub use crate::proto::fetch::{FetchReply, FetchRequest, IDS_PER_REQUEST};

fn chain(store: &dyn ReadStore, content: &ContentId) -> Result<Vec<WireBlob>, StoreError> {
    crate::store::blob_chain(store, content).map(|blobs| blobs.into_iter().map(Into::into).collect())
}

/// Requests a server reads ahead and works on at once (their replies still go
/// out in request order).
const SERVE_AHEAD: usize = 8;

/// A reply being made.
enum Pending {
    Ready(Box<FetchReply>),
    Reading(tokio::task::JoinHandle<FetchReply>),
}

/// Serves one fetch stream opened by `peer`; blob chains are sent no faster
/// than `links` lets this node send to `peer`. Up to [`SERVE_AHEAD`] requests
/// are read from the store at once, so disk reads overlap the sending.
pub async fn serve(store: Arc<dyn ReadStore>, topology: Arc<Topology>, links: Arc<LinkPacers>, peer: NodeId, mut send: quinn::SendStream, recv: quinn::RecvStream) {
    let peer_name = topology.node_by_id(&peer).map(|n| n.name.clone()).unwrap_or_default();
    let (req_tx, mut req_rx) = tokio::sync::mpsc::channel::<FetchRequest>(SERVE_AHEAD);
    // Frames are read by a task of their own: a read is never cancelled half-way.
    let reader_task = tokio::spawn(async move {
        let mut reader = MessageReader::with_limit(recv, 1 << 20);
        while let Ok(Some(request)) = reader.next_frame::<FetchRequest>().await {
            if req_tx.send(request).await.is_err() {
                break;
            }
        }
    });
    let mut current: Option<RpMeta> = None;
    let pacing = links.pacing_to(&peer_name);
    let mut queue: std::collections::VecDeque<Pending> = std::collections::VecDeque::new();
    loop {
        if queue.is_empty() {
            match req_rx.recv().await {
                Some(request) => queue.push_back(start_reply(request, &store, &topology, &peer_name, &mut current).await),
                None => break,
            }
        }
        while queue.len() < SERVE_AHEAD {
            match req_rx.try_recv() {
                Ok(request) => queue.push_back(start_reply(request, &store, &topology, &peer_name, &mut current).await),
                Err(_) => break,
            }
        }
        let reply = match queue.pop_front() {
            Some(Pending::Ready(reply)) => *reply,
            Some(Pending::Reading(handle)) => handle.await.unwrap_or_else(|e| FetchReply::Error(format!("server task failed: {e}"))),
            None => continue,
        };
        if let FetchReply::Chain(blobs) = &reply {
            // The link is looked up per reply: a reload that adds, changes or removes it applies at once.
            pacing.pace(blobs.iter().map(|b| b.payload.len() as u64).sum()).await;
        }
        if endpoint::send_frame_with_limit(&mut send, &reply, MAX_REPLY_BYTES).await.is_err() {
            break;
        }
    }
    reader_task.abort();
    let _ = send.finish();
}

/// Starts the reply to `request`: an RP lookup is done at once (later requests
/// depend on it), block ids and blob chains are read on the blocking pool.
async fn start_reply(request: FetchRequest, store: &Arc<dyn ReadStore>, topology: &Topology, peer_name: &str, current: &mut Option<RpMeta>) -> Pending {
    let store2 = store.clone();
    match request {
        FetchRequest::Rp { volume, seq } => {
            let allowed = topology.volumes.iter().any(|v| v.name == volume && (topology.may_read(v, peer_name) || v.targets.iter().any(|t| t == peer_name)));
            if !allowed {
                return Pending::Ready(Box::new(FetchReply::Error(format!("node {peer_name} may not read volume {volume} (only its source and targets may)"))));
            }
            let found = tokio::task::spawn_blocking(move || match seq {
                Some(s) => store2.rp(&volume, s),
                None => store2.latest_rp(&volume),
            })
            .await;
            Pending::Ready(Box::new(match found {
                Ok(Ok(Some(meta))) => {
                    *current = Some(meta.clone());
                    FetchReply::Rp(meta)
                }
                Ok(Ok(None)) => FetchReply::Error("no such recovery point there".into()),
                Ok(Err(e)) => FetchReply::Error(e.to_string()),
                Err(e) => FetchReply::Error(format!("server task failed: {e}")),
            }))
        }
        FetchRequest::Blocks { start, count } => match current.clone() {
            None => Pending::Ready(Box::new(FetchReply::Error("ask for an RP first".into()))),
            Some(meta) => {
                let count = count.min(IDS_PER_REQUEST);
                Pending::Reading(tokio::task::spawn_blocking(move || match store2.block_ids(&meta.volume, meta.seq, start, count) {
                    Ok(ids) => FetchReply::Blocks(ids),
                    Err(e) => FetchReply::Error(e.to_string()),
                }))
            }
        },
        FetchRequest::Content(content) => {
            if current.is_none() {
                Pending::Ready(Box::new(FetchReply::Error("ask for an RP first".into())))
            } else {
                Pending::Reading(tokio::task::spawn_blocking(move || match chain(store2.as_ref(), &content) {
                    Ok(c) => FetchReply::Chain(c),
                    Err(e) => FetchReply::Error(e.to_string()),
                }))
            }
        }
    }
}

/// The sending half of a [`FetchClient`].
pub struct FetchSender {
    send: quinn::SendStream,
}

impl FetchSender {
    /// Sends a request without waiting for its reply.
    pub async fn request(&mut self, request: &FetchRequest) -> Result<(), String> {
        endpoint::send_frame(&mut self.send, request).await.map_err(|e| e.to_string())
    }
}

/// The replies of a [`FetchClient`], in request order.
pub struct FetchReplies {
    reader: MessageReader,
}

impl FetchReplies {
    /// The next reply (not cancel-safe: await it to the end, e.g. in a task of its own).
    pub async fn reply(&mut self) -> Result<FetchReply, String> {
        self.reader.next_frame::<FetchReply>().await.map_err(|e| e.to_string())?.ok_or_else(|| "the peer closed the fetch stream".to_string())
    }
}

/// Client side of a fetch stream.
pub struct FetchClient {
    send: quinn::SendStream,
    reader: MessageReader,
}

impl FetchClient {
    /// Opens a fetch stream on `conn`.
    pub async fn open(conn: &quinn::Connection) -> Result<Self, String> {
        let (send, recv) = endpoint::open_stream(conn, StreamHeader::data(StreamKind::Fetch, crate::proto::version::FETCH)).await.map_err(|e| e.to_string())?;
        // Replies carry blobs and can fill a window of many round trips: read
        // them unordered, like the replication stream, so a lossy WAN cannot
        // reach quinn's limit of 1024 holes in an ordered stream.
        Ok(FetchClient { send, reader: MessageReader::unordered(recv, MAX_REPLY_BYTES, 0) })
    }

    /// Sends a request without waiting for its reply.
    pub async fn request(&mut self, request: &FetchRequest) -> Result<(), String> {
        endpoint::send_frame(&mut self.send, request).await.map_err(|e| e.to_string())
    }

    /// The next reply, in request order.
    pub async fn reply(&mut self) -> Result<FetchReply, String> {
        self.reader.next_frame::<FetchReply>().await.map_err(|e| e.to_string())?.ok_or_else(|| "the peer closed the fetch stream".to_string())
    }

    /// Splits the stream into its sending half and its replies, so that replies
    /// can be awaited by a task of their own while requests go out.
    pub fn into_parts(self) -> (FetchSender, FetchReplies) {
        (FetchSender { send: self.send }, FetchReplies { reader: self.reader })
    }

    /// Converts a chain reply into stored-form blobs.
    pub fn chain(reply: FetchReply) -> Result<Vec<EncodedBlob>, String> {
        match reply {
            FetchReply::Chain(c) => Ok(c.into_iter().map(Into::into).collect()),
            FetchReply::Error(e) => Err(e),
            FetchReply::Rp(_) => Err("protocol error: the holder answered a block request with an RP".into()),
            FetchReply::Blocks(_) => Err("protocol error: the holder answered a block request with block ids".into()),
        }
    }
}
