//! The node's use of the C allocator: how many heaps it keeps, and giving
//! freed memory back to the system when work ends.
//!
//! glibc's malloc gives each thread that allocates under contention a heap of
//! its own ("arena"), up to eight per core, and keeps what is freed in each
//! for later. A node allocates blocks and blobs on many threads (QUIC, the
//! compressor pool, the blocking pool of store writes) and frees them on
//! others, so every arena ends up holding part of a sync's peak. With two
//! arenas, `scripts/bench-sizes` measured a 16 GiB volume's target at 162 MiB
//! peak and 126 MiB idle instead of 218 and 181, and the source at 213 MiB
//! instead of 244, with sync times within the machine's run-to-run spread
//! (docs/performance.md, "Memory at volume sizes").

/// Arenas glibc may create when the environment does not say otherwise.
pub const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's arenas at [`MALLOC_ARENAS`], unless the operator set
/// `MALLOC_ARENA_MAX` (glibc reads it at start, and it wins). Call it first
/// thing in `main`, before any thread starts. Does nothing with another libc.
pub fn tune_allocator() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets a parameter of glibc's allocator under its own
    // lock; it takes no pointer and is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}

/// Gives the memory glibc keeps after `free` back to the system (a node that
/// just finished a sync would otherwise idle near the sync's peak). Takes a
/// moment on a large heap: call it on a blocking thread, when work ends.
pub fn give_back_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only releases free pages of the allocator's own heaps
    // under its locks; it takes no pointer and is safe from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
