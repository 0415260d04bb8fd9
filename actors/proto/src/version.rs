//! Versions of the message sets that travel on data streams. A data stream's
//! header names the version of its messages (see the transport's
//! `StreamHeader`); the receiver checks it before it reads a message, so two
//! nodes of different releases refuse each other's streams in words that
//! name both versions instead of misreading frames.
//!
//! Every message set keeps its refusal message (`TargetMsg::Failed`,
//! `FetchReply::Error`) at the same place and in the same shape in every
//! version, so a refusal is always readable by the other side.

/// Version of the replication messages (`SourceMsg`, `TargetMsg`); bumped on
/// any change to their encoding.
pub const REPLICATION: u16 = 2;
/// Version of the fetch messages (`FetchRequest`, `FetchReply`); bumped on any
/// change to their encoding.
pub const FETCH: u16 = 2;

/// Version of the lease messages (`LeaseRequest`, `LeaseReply`); bumped on
/// any change to their encoding.
pub const LEASE: u16 = 1;

/// A stream whose messages are of a version this node does not speak.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the peer sent {stream} messages of version {peer}, this node speaks version {ours}; run the same drmesh release on both nodes")]
pub struct VersionMismatch {
    /// Which message set ("replication", "fetch").
    pub stream: &'static str,
    /// The version the stream's header names.
    pub peer: u16,
    /// The version this node speaks.
    pub ours: u16,
}

/// Checks the version a `stream`'s header names against the one this node speaks.
pub fn check(stream: &'static str, peer: u16, ours: u16) -> Result<(), VersionMismatch> {
    if peer == ours {
        Ok(())
    } else {
        Err(VersionMismatch { stream, peer, ours })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::FetchReply;
    use crate::session::TargetMsg;

    #[test]
    fn a_mismatch_names_both_versions() {
        assert_eq!(check("replication", REPLICATION, REPLICATION), Ok(()));
        let e = check("replication", 7, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the peer sent replication messages of version 7, this node speaks version 1; run the same drmesh release on both nodes"
        );
    }

    /// The refusals' encodings are part of every version: variant index and shape.
    #[test]
    fn refusals_keep_their_encoding() {
        let failed = postcard::to_allocvec(&TargetMsg::Failed { reason: "no".into() }).unwrap();
        assert_eq!(failed, [4, 2, b'n', b'o']);
        let error = postcard::to_allocvec(&FetchReply::Error("no".into())).unwrap();
        assert_eq!(error, [3, 2, b'n', b'o']);
    }
}
