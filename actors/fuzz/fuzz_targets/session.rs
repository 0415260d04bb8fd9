//! Feeds arbitrary bytes to the replication-session, fetch and lease decoders as a peer could
//! send them on a data stream: they must decode or fail, never panic.
#![no_main]

use drmesh_actors::actor::fetch::{FetchReply, FetchRequest};
use drmesh_actors::proto::lease::{LeaseReply, LeaseRequest};
use drmesh_actors::proto::session::{SourceMsg, TargetMsg};
use drmesh_transport::wire::{decode_frame_body, FrameDecoder, MAX_DATA_FRAME_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_frame_body::<SourceMsg>(data);
    let _ = decode_frame_body::<TargetMsg>(data);
    let _ = decode_frame_body::<FetchRequest>(data);
    let _ = decode_frame_body::<FetchReply>(data);
    let _ = decode_frame_body::<LeaseRequest>(data);
    let _ = decode_frame_body::<LeaseReply>(data);
    let mut decoder = FrameDecoder::with_limit(MAX_DATA_FRAME_BYTES);
    decoder.handle_bytes(data);
    while let Ok(Some(_)) = decoder.poll_frame::<SourceMsg>() {}
});
