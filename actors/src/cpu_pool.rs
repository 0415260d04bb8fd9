//! The thread pools that do a node's CPU-heavy data work: hashing source
//! blocks and encoding blobs (zstd, AES-GCM, deltas).
//!
//! Two pools, both one thread per core, so a scan's hashing never queues behind
//! the encoding of earlier blocks (the reader would stall and the encoders run
//! dry). Their threads run at a lower scheduling priority than the rest of the
//! node: the threads that move data (QUIC, the applier, the admin socket) get a
//! core as soon as they have work, so sent-but-unacknowledged data never piles
//! up behind the compressors, and the protected server's own work keeps its
//! precedence over replication.

use std::sync::OnceLock;

/// How much nicer than the node the pool threads run (Linux nice levels).
pub const BACKGROUND_NICE: i32 = 5;

/// The pool that hashes source blocks.
pub fn hash_pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| build("drmesh-hash"))
}

/// The pool that encodes blobs.
pub fn encode_pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| build("drmesh-encode"))
}

fn build(name: &'static str) -> rayon::ThreadPool {
    let builder = || rayon::ThreadPoolBuilder::new().thread_name(move |i| format!("{name}-{i}")).start_handler(|_| lower_priority());
    builder()
        .build()
        // Only fails when the OS refuses new threads; one thread is then still worth a try.
        .or_else(|_| builder().num_threads(1).build())
        .unwrap_or_else(|e| panic!("cannot start the {name} thread pool: {e}"))
}

/// Lowers the calling thread's priority by [`BACKGROUND_NICE`]. Best effort: a
/// failure leaves the thread at the node's priority, which is only slower.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    // SAFETY: gettid and getpriority/setpriority take plain integers and touch no
    // memory of ours; on Linux, PRIO_PROCESS with a thread id applies to that thread only.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        if *libc::__errno_location() == 0 {
            libc::setpriority(libc::PRIO_PROCESS, tid, (current + BACKGROUND_NICE).min(19));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn pool_threads_run_at_a_lower_priority() {
        let own = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let nice_of = |stat: &str| -> i32 { stat.rsplit(')').next().unwrap().split_whitespace().nth(16).unwrap().parse().unwrap() };
        let mine = nice_of(&own);
        let theirs = encode_pool().install(|| nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap()));
        assert_eq!(theirs, (mine + BACKGROUND_NICE).min(19));
        let hashing = hash_pool().install(|| std::thread::current().name().map(str::to_string));
        assert!(hashing.unwrap().starts_with("drmesh-hash-"));
    }
}
