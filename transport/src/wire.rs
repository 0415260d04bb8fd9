//! Wire messages between nodes and their framing.
//!
//! Every message travels as one frame: a 4-byte big-endian length followed by
//! that many bytes of postcard-encoded [`Message`]. Frames longer than
//! [`MAX_FRAME_BYTES`] are refused before any allocation, and decoding never
//! panics: any bad input becomes a [`WireError`], and the connection that sent
//! it is closed with that error as the logged reason (promise 5).
//!
//! Compatibility: each side's first message is [`Hello`], carrying
//! [`PROTOCOL_VERSION`]. Peers with a different protocol version are told why and
//! disconnected. New message kinds are added only at the end of [`Message`], so
//! older decoders see an unknown variant (a clean error), never a wrong message.

use bytes::{Buf, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of the mesh protocol; bumped on any incompatible change to
/// [`Message`] or to the stream headers ([`StreamHeader`]). Version 2: data
/// streams carry the version of their messages.
pub const PROTOCOL_VERSION: u16 = 2;
/// Largest frame body accepted on the control stream, in bytes.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// Largest frame body accepted on data streams: a 16 MiB block plus its envelope.
pub const MAX_DATA_FRAME_BYTES: usize = (16 << 20) + 4096;

/// What a newly opened stream carries; its first byte, before any frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamKind {
    /// Hello, ping and the like ([`Message`]); one per connection.
    Control = 0,
    /// One replication session (source opens it).
    Replication = 1,
    /// Reading a recovery point from the node that holds it (restore from a peer).
    Fetch = 2,
    /// One lease request of a platform's proxy to a volume's first target.
    Lease = 3,
}

impl StreamKind {
    /// The kind a stream's first byte names, if any.
    pub fn from_byte(byte: u8) -> Option<StreamKind> {
        match byte {
            0 => Some(StreamKind::Control),
            1 => Some(StreamKind::Replication),
            2 => Some(StreamKind::Fetch),
            3 => Some(StreamKind::Lease),
            _ => None,
        }
    }
}
/// What a stream carries and in which version of its messages: the stream's
/// first bytes, before any frame. The control stream's header is its kind
/// byte alone (its version travels in [`Hello`]); a data stream's adds the
/// version of its message set (u16, big-endian), so the receiver refuses a
/// stream it cannot read with a message that names both versions instead of
/// misreading its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    /// What the stream carries.
    pub kind: StreamKind,
    /// Version of its messages ([`PROTOCOL_VERSION`] for the control stream).
    pub version: u16,
}

impl StreamHeader {
    /// Bytes of a data stream's header (kind and version).
    pub const DATA_BYTES: u64 = 3;

    /// The control stream's header.
    pub fn control() -> StreamHeader {
        StreamHeader { kind: StreamKind::Control, version: PROTOCOL_VERSION }
    }

    /// A data stream of `kind` carrying messages of `version`.
    pub fn data(kind: StreamKind, version: u16) -> StreamHeader {
        StreamHeader { kind, version }
    }

    /// The header's bytes on the stream.
    pub fn encode(&self) -> Vec<u8> {
        match self.kind {
            StreamKind::Control => vec![self.kind as u8],
            _ => {
                let [hi, lo] = self.version.to_be_bytes();
                vec![self.kind as u8, hi, lo]
            }
        }
    }
}

/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Everything nodes say to each other on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message in each direction.
    Hello(Hello),
    /// Liveness probe; answered by [`Message::Pong`] with the same nonce.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to [`Message::Ping`].
    Pong {
        /// The nonce of the ping.
        nonce: u64,
    },
    /// The sender is about to close the connection, and why.
    Goodbye {
        /// Human-readable reason, logged by the receiver.
        reason: String,
    },
}

/// What a node says about itself when a connection opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's [`PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The sender's drmesh release, for status output.
    pub software_version: String,
    /// The sender's node name in its topology.
    pub node_name: String,
    /// `[mesh] version` of the sender's topology.
    pub topology_version: u64,
    /// blake3 of the sender's topology file, so ops see who runs another file.
    pub topology_hash: [u8; 32],
}

/// Why bytes from a peer are not a valid frame. The connection is closed; the node runs on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The length prefix announces more than [`MAX_FRAME_BYTES`].
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body is not a postcard-encoded [`Message`] (or has bytes left over).
    #[error("malformed frame of {len} bytes: {reason}")]
    Malformed {
        /// Body length.
        len: usize,
        /// What postcard reported.
        reason: String,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes received of the unfinished frame.
        buffered: usize,
    },
}

/// Encodes `message` as one control frame (length prefix + body).
pub fn encode(message: &Message) -> Vec<u8> {
    encode_frame(message, MAX_FRAME_BYTES)
}

/// Encodes any wire type as one frame; panics if it exceeds `max` (a sender bug).
pub fn encode_frame<T: Serialize>(message: &T, max: usize) -> Vec<u8> {
    // Serializing plain data into a Vec cannot fail; a failure is a bug.
    let mut out = postcard::to_extend(message, vec![0u8; FRAME_HEADER_BYTES]).expect("postcard encodes plain data");
    let len = out.len() - FRAME_HEADER_BYTES;
    assert!(len <= max, "frame of {len} bytes is over the limit of {max}");
    out[..FRAME_HEADER_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    out
}

/// Decodes one control frame body (without its length prefix).
pub fn decode_body(body: &[u8]) -> Result<Message, WireError> {
    decode_frame_body(body)
}

/// Decodes one frame body of any wire type; trailing bytes are an error.
pub fn decode_frame_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    let malformed = |reason: String| WireError::Malformed { len: body.len(), reason };
    let (message, rest) = postcard::take_from_bytes::<T>(body).map_err(|e| malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(malformed(format!("{} bytes after the message", rest.len())));
    }
    Ok(message)
}

/// Splits a byte stream into messages; sans-IO, fed by whoever reads the socket.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: BytesMut,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// An empty decoder for control frames ([`MAX_FRAME_BYTES`]).
    pub fn new() -> Self {
        Self::with_limit(MAX_FRAME_BYTES)
    }

    /// An empty decoder refusing frames over `max` bytes.
    pub fn with_limit(max: usize) -> Self {
        FrameDecoder { buffer: BytesMut::new(), max }
    }

    /// Appends bytes received from the peer.
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Next complete message, `Ok(None)` if more bytes are needed, or the error
    /// that must close the connection. Checks the length before buffering a body.
    pub fn poll_message(&mut self) -> Result<Option<Message>, WireError> {
        self.poll_frame()
    }

    /// Like [`FrameDecoder::poll_message`] for any wire type.
    pub fn poll_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, WireError> {
        if self.buffer.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let mut len_bytes = [0u8; FRAME_HEADER_BYTES];
        len_bytes.copy_from_slice(&self.buffer[..FRAME_HEADER_BYTES]);
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len > self.max {
            return Err(WireError::Oversized { len, max: self.max });
        }
        if self.buffer.len() < FRAME_HEADER_BYTES + len {
            return Ok(None);
        }
        self.buffer.advance(FRAME_HEADER_BYTES);
        let body = self.buffer.split_to(len);
        decode_frame_body(&body).map(Some)
    }

    /// Call at end of stream: an unfinished frame is an error.
    pub fn handle_end(&self) -> Result<(), WireError> {
        if self.buffer.is_empty() {
            Ok(())
        } else {
            Err(WireError::Truncated { buffered: self.buffer.len() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            software_version: "0.1.0".into(),
            node_name: "branch-1".into(),
            topology_version: 7,
            topology_hash: [9; 32],
        })
    }

    fn all_messages() -> Vec<Message> {
        vec![hello(), Message::Ping { nonce: 1 }, Message::Pong { nonce: u64::MAX }, Message::Goodbye { reason: "bye".into() }]
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let mut stream = Vec::new();
        for m in all_messages() {
            stream.extend(encode(&m));
        }
        let mut decoder = FrameDecoder::new();
        let mut got = Vec::new();
        for b in stream {
            decoder.handle_bytes(&[b]);
            while let Some(m) = decoder.poll_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, all_messages());
        decoder.handle_end().unwrap();
    }

    #[test]
    fn oversized_frame_is_refused_before_buffering() {
        let mut decoder = FrameDecoder::new();
        decoder.handle_bytes(&u32::MAX.to_be_bytes());
        assert_eq!(decoder.poll_message(), Err(WireError::Oversized { len: u32::MAX as usize, max: MAX_FRAME_BYTES }));
    }

    #[test]
    fn malformed_and_trailing_bytes_are_errors() {
        let mut decoder = FrameDecoder::new();
        decoder.handle_bytes(&[0, 0, 0, 2, 200, 1]);
        assert!(matches!(decoder.poll_message(), Err(WireError::Malformed { len: 2, .. })));

        let mut frame = encode(&Message::Ping { nonce: 5 });
        frame.push(0);
        let len = (frame.len() - FRAME_HEADER_BYTES) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let mut decoder = FrameDecoder::new();
        decoder.handle_bytes(&frame);
        let err = decoder.poll_message().unwrap_err();
        assert!(err.to_string().contains("after the message"), "{err}");
    }

    #[test]
    fn truncated_stream_is_reported() {
        let frame = encode(&hello());
        let mut decoder = FrameDecoder::new();
        decoder.handle_bytes(&frame[..frame.len() - 1]);
        assert_eq!(decoder.poll_message(), Ok(None));
        assert!(matches!(decoder.handle_end(), Err(WireError::Truncated { .. })));
    }

    /// Replays the fuzz corpus and a deterministic stream of mutated frames:
    /// the decoder may refuse them but must never panic or over-allocate.
    #[test]
    fn corpus_and_mutations_never_panic() {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&corpus) {
            for entry in entries.flatten() {
                inputs.push(std::fs::read(entry.path()).unwrap());
            }
        }
        assert!(inputs.len() >= 4, "fuzz corpus missing at {}", corpus.display());
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for m in all_messages() {
            let frame = encode(&m);
            for _ in 0..2000 {
                let mut f = frame.clone();
                for _ in 0..(next() % 4 + 1) {
                    let i = (next() as usize) % f.len();
                    f[i] = next() as u8;
                }
                if next() % 3 == 0 {
                    f.truncate((next() as usize) % f.len());
                }
                inputs.push(f);
            }
        }
        for input in inputs {
            let mut decoder = FrameDecoder::new();
            decoder.handle_bytes(&input);
            while let Ok(Some(_)) = decoder.poll_message() {}
        }
    }
}
