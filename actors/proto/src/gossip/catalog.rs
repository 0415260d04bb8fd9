//! The replicated catalog: a state-based CRDT that every node holds in full.
//!
//! The catalog is a map `holder → (item key → versioned value)`. Only the
//! holder (the node an item is about) ever writes its items, and it stamps each
//! write with the next value of its own counter, so a plain "higher version
//! wins" merge is a join-semilattice: merging in any order, any number of
//! times, gives the same state. Two extra rules keep deletions from coming back:
//!
//! - **Low-water marks** (`Lwm(volume)`): "every RP of `volume` on this holder
//!   with `seq < below` is gone". They only grow (the merge is `max`), they are
//!   never dropped, and an RP below the mark is rejected on arrival. Retention
//!   that deletes oldest-first needs nothing else, whatever the partition length.
//! - **Tombstones** (`RpGone`): for an RP deleted out of order (above the mark).
//!   A tombstone beats a live entry of the same key whatever their versions.
//!   Tombstones expire `tombstone_ttl` after a node learned them; a tombstone
//!   below the volume's mark is dropped at once (the mark covers it).
//!
//! For anti-entropy each holder also has a `contig` version: this replica
//! holds, for every key of the holder, a value at least as new as the one the
//! holder had at version `contig`. The holder's own `contig` is its counter.

use std::collections::BTreeMap;

use drmesh_topology::NodeId;
use serde::{Deserialize, Serialize};

use crate::bandwidth::Demand;
use crate::blob::RpSeq;

use super::Millis;

pub use drmesh_topology::VolumeName;
/// Longest free-text field (error, drill detail, site, version), in bytes; longer text is cut.
pub const TEXT_BYTES_MAX: usize = 256;

/// How consistent an RP is with respect to the applications writing the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// Snapshot taken without quiescing anything (as after a power cut).
    Crash,
    /// File systems were frozen (fsfreeze / VSS) around the snapshot.
    FileSystem,
    /// Applications were quiesced by hooks around the snapshot.
    Application,
    /// No point-in-time view: the blocks were read from the live volume one
    /// after another, so blocks written meanwhile may come from different
    /// instants (a `file` volume on a filesystem that cannot clone files).
    /// Encoded after the others: a replica saved by an earlier release loads.
    Inconsistent,
}

impl Consistency {
    /// The label RP metadata, `ctl` and the docs use: `inconsistent`,
    /// `crash`, `fs-frozen`, `app`.
    pub fn label(self) -> &'static str {
        match self {
            Consistency::Inconsistent => "inconsistent",
            Consistency::Crash => "crash",
            Consistency::FileSystem => "fs-frozen",
            Consistency::Application => "app",
        }
    }

    /// The level a label names, or `None` for a label this release does not know.
    pub fn from_label(label: &str) -> Option<Consistency> {
        [Consistency::Inconsistent, Consistency::Crash, Consistency::FileSystem, Consistency::Application].into_iter().find(|c| c.label() == label)
    }
}

/// Outcome of a disaster-recovery drill run on an RP (the summary of a
/// [`crate::drill_report::DrillReport`]; the holder keeps the whole report).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillResult {
    /// When the drill finished, Unix milliseconds.
    pub finished_unix_ms: u64,
    /// Whether every check that ran passed.
    pub passed: bool,
    /// Whether the checks covered every check of the volume's policy and passed.
    pub verified: bool,
    /// Each check's verdict, in the order they ran (at most [`DRILL_CHECKS_MAX`]).
    pub checks: Vec<CheckVerdict>,
    /// drmesh version that ran the drill (cut to [`TEXT_BYTES_MAX`]).
    pub software_version: String,
    /// Short human summary (cut to [`TEXT_BYTES_MAX`]).
    pub detail: String,
}

/// Most check verdicts carried per drill result.
pub const DRILL_CHECKS_MAX: usize = 8;

/// One check's verdict in a [`DrillResult`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckVerdict {
    /// Check name (`fsck`, `boot`, `postgres`, `script`; cut to 32 bytes).
    pub check: String,
    /// Whether it passed.
    pub passed: bool,
    /// How long it ran, milliseconds.
    pub duration_ms: u64,
}

impl DrillResult {
    /// The gossiped summary of a full report.
    pub fn of(report: &crate::drill_report::DrillReport) -> DrillResult {
        DrillResult {
            finished_unix_ms: report.finished_unix_ms,
            passed: report.passed,
            verified: report.verified,
            checks: report
                .checks
                .iter()
                .take(DRILL_CHECKS_MAX)
                .map(|c| CheckVerdict { check: c.check.chars().take(32).collect(), passed: c.passed, duration_ms: c.duration_ms })
                .collect(),
            software_version: report.software_version.clone(),
            detail: report.summary(),
        }
    }
}

/// What the mesh knows about one recovery point held by one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpInfo {
    /// Snapshot instant on the source, Unix milliseconds.
    pub snapshot_unix_ms: u64,
    /// Logical size of the volume image, bytes.
    pub size_bytes: u64,
    /// Merkle root (blake3 over the block ids).
    pub merkle_root: crate::content::MerkleRoot,
    /// Consistency level reached when the snapshot was taken.
    pub consistency: Consistency,
    /// Last drill result, if a drill ran.
    pub drill: Option<DrillResult>,
}

/// One node's self-description (LWW register owned by that node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Site name from the topology.
    pub site: String,
    /// drmesh software version.
    pub software_version: String,
    /// Version of the topology file the node runs on.
    pub topology_version: u64,
    /// Hash of that topology file.
    pub topology_hash: [u8; 32],
}

/// Replication health of one volume, published by the volume's source node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeHealth {
    /// Snapshot time of the newest committed RP, Unix milliseconds.
    pub last_rp_unix_ms: Option<u64>,
    /// The policy's recovery point objective, milliseconds.
    pub rpo_ms: u64,
    /// When the last cycle ended, Unix milliseconds.
    pub last_cycle_unix_ms: Option<u64>,
    /// Error of the last cycle, if it failed (cut to [`TEXT_BYTES_MAX`]).
    pub last_error: Option<String>,
}

/// Key of one item within a holder's part of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ItemKey {
    /// The holder's [`NodeStatus`].
    Status,
    /// [`VolumeHealth`] of a volume whose source is the holder.
    Health(VolumeName),
    /// RP `volume@seq` held by the holder (live or tombstone).
    Rp(VolumeName, RpSeq),
    /// Low-water mark of a volume on the holder.
    Lwm(VolumeName),
    /// What the holder's running transfers want from its site's uplink
    /// (a variant of its own, after the others, so saved replicas still load).
    Demand,
    /// The newest scrub of a volume's RPs on the holder (after the others, so
    /// saved replicas still load).
    Scrub(VolumeName),
}

/// Value of one item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ItemValue {
    /// Under [`ItemKey::Status`].
    Status(NodeStatus),
    /// Under [`ItemKey::Health`].
    Health(VolumeHealth),
    /// Live RP under [`ItemKey::Rp`].
    Rp(RpInfo),
    /// Tombstone under [`ItemKey::Rp`]: the RP expired at this Unix millisecond.
    RpGone {
        /// When the holder deleted it, Unix milliseconds.
        expired_unix_ms: u64,
    },
    /// Under [`ItemKey::Lwm`]: every seq below this is gone.
    Lwm(RpSeq),
    /// Under [`ItemKey::Demand`].
    Demand(Demand),
    /// Under [`ItemKey::Scrub`].
    Scrub(ScrubResult),
}

/// Most damaged RPs a [`ScrubResult`] lists; beyond them it says only that there were more.
pub const SCRUB_DAMAGED_MAX: usize = 64;

/// The newest scrub of one volume's RPs on the holder: every RP the holder
/// held with `first_seq <= seq <= last_seq` was checked then, and is sound
/// unless listed in `damaged`. One item per (holder, volume), whatever the
/// number of RPs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubResult {
    /// When the scrub finished, Unix milliseconds.
    pub finished_unix_ms: u64,
    /// Share of the blobs it read, percent (1–100).
    pub sample_percent: u8,
    /// Lowest seq it checked.
    pub first_seq: RpSeq,
    /// Highest seq it checked.
    pub last_seq: RpSeq,
    /// The seqs it found damaged, ascending (at most [`SCRUB_DAMAGED_MAX`]).
    pub damaged: Vec<RpSeq>,
    /// Whether more were damaged than `damaged` lists.
    pub damaged_cut: bool,
}

/// What a [`ScrubResult`] says of one RP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubVerdict {
    /// When the scrub finished, Unix milliseconds.
    pub finished_unix_ms: u64,
    /// Share of the blobs it read, percent.
    pub sample_percent: u8,
    /// Whether the RP was found sound (every block's blob read back whole, the
    /// block map with its Merkle root).
    pub sound: bool,
}

impl ScrubResult {
    /// The verdict on RP `seq`, if this scrub checked it and says which
    /// (a seq beyond a cut list of damaged RPs has none).
    pub fn verdict(&self, seq: RpSeq) -> Option<ScrubVerdict> {
        if seq < self.first_seq || seq > self.last_seq {
            return None;
        }
        let damaged = self.damaged.binary_search(&seq).is_ok();
        if !damaged && self.damaged_cut && self.damaged.last().is_none_or(|last| seq > *last) {
            return None;
        }
        Some(ScrubVerdict { finished_unix_ms: self.finished_unix_ms, sample_percent: self.sample_percent, sound: !damaged })
    }
}

impl ItemValue {
    fn fits(&self, key: &ItemKey) -> bool {
        matches!(
            (key, self),
            (ItemKey::Status, ItemValue::Status(_))
                | (ItemKey::Health(_), ItemValue::Health(_))
                | (ItemKey::Rp(..), ItemValue::Rp(_) | ItemValue::RpGone { .. })
                | (ItemKey::Lwm(_), ItemValue::Lwm(_))
                | (ItemKey::Demand, ItemValue::Demand(_))
                | (ItemKey::Scrub(_), ItemValue::Scrub(_))
        )
    }
}

/// One versioned write of a holder, as carried on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// What is written.
    pub key: ItemKey,
    /// The holder's counter at the write.
    pub version: u64,
    /// The value written.
    pub value: ItemValue,
}

/// A stored item with the local time this replica learned it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Stored {
    pub(crate) version: u64,
    pub(crate) value: ItemValue,
    pub(crate) learned_at: Millis,
}

/// A small sorted map. Most holders have a handful of items, and a B-tree
/// allocates a full node even for one entry; with every node holding every
/// holder, that overhead is paid n² times.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ItemMap(Vec<(ItemKey, Stored)>);

impl ItemMap {
    pub(crate) fn get(&self, key: &ItemKey) -> Option<&Stored> {
        self.0.binary_search_by(|(k, _)| k.cmp(key)).ok().map(|i| &self.0[i].1)
    }

    fn remove(&mut self, key: &ItemKey) -> Option<Stored> {
        self.0.binary_search_by(|(k, _)| k.cmp(key)).ok().map(|i| self.0.remove(i).1)
    }

    fn insert(&mut self, key: ItemKey, value: Stored) {
        match self.0.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (key, value));
            }
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ItemKey, &Stored)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut Stored> {
        self.0.iter_mut().map(|(_, v)| v)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    fn has_version(&self, version: u64) -> bool {
        self.0.iter().any(|(_, s)| s.version == version)
    }
}

/// One holder's part of the replica.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct HolderState {
    /// Complete through this version of the holder (see the module doc).
    pub(crate) contig: u64,
    /// Highest version held.
    pub(crate) max_version: u64,
    pub(crate) items: ItemMap,
    /// Last local time a datagram came straight from this node.
    pub(crate) last_heard: Option<Millis>,
}

/// Number of anti-entropy digest buckets (holders are bucketed by first id byte).
pub const BUCKETS: usize = 256;

/// The whole replica held by one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Catalog {
    pub(crate) me: NodeId,
    pub(crate) holders: BTreeMap<NodeId, HolderState>,
    #[serde(skip, default = "zero_buckets")]
    pub(crate) buckets: Vec<u32>,
    /// Changes applied since the driver last drained them.
    #[serde(skip)]
    pub(crate) changes: Vec<(NodeId, ItemKey)>,
    /// Local time of the input being handled.
    #[serde(skip)]
    pub(crate) now: Millis,
    /// Whether foca's relay queue has room for received deltas.
    #[serde(skip)]
    pub(crate) relay_open: bool,
}

fn zero_buckets() -> Vec<u32> {
    vec![0; BUCKETS]
}

/// Hash of one `(holder, contig)` pair, XOR-ed into its bucket.
fn pair_hash(holder: &NodeId, contig: u64) -> u32 {
    let b = holder.as_bytes();
    let mut x = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) ^ contig.rotate_left(29);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x ^ (x >> 32)) as u32
}

/// Digest bucket of a holder.
pub(crate) fn bucket_of(holder: &NodeId) -> usize {
    holder.as_bytes()[0] as usize
}

/// First 8 bytes of a node id, used to name holders compactly in digests.
pub(crate) fn prefix_of(holder: &NodeId) -> [u8; 8] {
    let b = holder.as_bytes();
    [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]
}

/// Outcome of merging one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Merge {
    /// The replica changed.
    Changed,
    /// Nothing new (older, equal, or below a low-water mark).
    Stale,
    /// Key and value kinds disagree; the item was ignored.
    Malformed,
}

impl Catalog {
    pub(crate) fn new(me: NodeId) -> Self {
        Catalog { me, holders: BTreeMap::new(), buckets: zero_buckets(), changes: Vec::new(), now: Millis(0), relay_open: true }
    }

    /// Recomputes the digest buckets (after a restore).
    pub(crate) fn rebuild_buckets(&mut self) {
        self.buckets = zero_buckets();
        for (holder, state) in &self.holders {
            self.buckets[bucket_of(holder)] ^= pair_hash(holder, state.contig);
        }
    }

    fn holder_mut(&mut self, holder: NodeId) -> &mut HolderState {
        Self::holder_in(&mut self.holders, &mut self.buckets, holder)
    }

    fn holder_in<'a>(
        holders: &'a mut BTreeMap<NodeId, HolderState>,
        buckets: &mut [u32],
        holder: NodeId,
    ) -> &'a mut HolderState {
        holders.entry(holder).or_insert_with(|| {
            buckets[bucket_of(&holder)] ^= pair_hash(&holder, 0);
            HolderState::default()
        })
    }

    /// Sets `holder`'s contig, keeping the digest in step.
    pub(crate) fn set_contig(&mut self, holder: NodeId, contig: u64) {
        let state = self.holder_mut(holder);
        let old = state.contig;
        if contig <= old {
            return;
        }
        state.contig = contig;
        // Fill forward through versions already held out of order.
        let mut c = contig;
        while c < state.max_version && state.items.has_version(c + 1) {
            c += 1;
        }
        state.contig = c;
        let b = bucket_of(&holder);
        self.buckets[b] ^= pair_hash(&holder, old) ^ pair_hash(&holder, c);
    }

    /// Own counter (= own contig).
    pub(crate) fn counter(&self) -> u64 {
        self.holders.get(&self.me).map_or(0, |h| h.contig)
    }

    /// Writes a local item with the next own version. Returns it for broadcast.
    pub(crate) fn write_local(&mut self, key: ItemKey, value: ItemValue) -> Item {
        let version = self.counter() + 1;
        let item = Item { key, version, value };
        let me = self.me;
        self.store(me, item.clone());
        self.set_contig(me, version);
        item
    }

    /// Merges one item written by `holder`.
    pub(crate) fn merge(&mut self, holder: NodeId, item: Item) -> Merge {
        if !item.value.fits(&item.key) {
            return Merge::Malformed;
        }
        if holder == self.me {
            // We are the only writer of our items: a copy coming back is old
            // news, but its version must never be reused (restored replica).
            if item.version > self.counter() {
                self.set_contig(self.me, item.version);
            }
            return Merge::Stale;
        }
        let Some(state) = self.holders.get(&holder) else {
            self.store(holder, item);
            return Merge::Changed;
        };
        // Below the volume's low-water mark: gone for good.
        if let ItemKey::Rp(volume, seq) = &item.key {
            if let Some(Stored { value: ItemValue::Lwm(below), .. }) = state.items.get(&ItemKey::Lwm(volume.clone())) {
                if seq < below {
                    return Merge::Stale;
                }
            }
        }
        if let Some(old) = state.items.get(&item.key) {
            let wins = match (&old.value, &item.value) {
                (ItemValue::RpGone { .. }, ItemValue::Rp(_)) => false,
                (ItemValue::Rp(_), ItemValue::RpGone { .. }) => true,
                (ItemValue::Lwm(a), ItemValue::Lwm(b)) => b > a,
                _ => item.version > old.version,
            };
            if !wins {
                return Merge::Stale;
            }
        }
        self.store(holder, item);
        Merge::Changed
    }

    /// Stores an item that won the merge, applying low-water-mark pruning.
    fn store(&mut self, holder: NodeId, item: Item) {
        let now = self.now;
        let state = Self::holder_in(&mut self.holders, &mut self.buckets, holder);
        state.items.remove(&item.key);
        state.max_version = state.max_version.max(item.version);
        if let (ItemKey::Lwm(volume), ItemValue::Lwm(below)) = (&item.key, &item.value) {
            let changes = &mut self.changes;
            state.items.0.retain(|(k, _)| match k {
                ItemKey::Rp(v, seq) if v == volume && seq < below => {
                    changes.push((holder, k.clone()));
                    false
                }
                _ => true,
            });
        }
        self.changes.push((holder, item.key.clone()));
        let state = self.holder_mut(holder);
        state.items.insert(item.key, Stored { version: item.version, value: item.value, learned_at: now });
        let contig = state.contig;
        if item.version == contig + 1 {
            self.set_contig(holder, item.version);
        }
    }

    /// Drops tombstones learned more than `ttl_ms` ago. Returns how many.
    pub(crate) fn sweep(&mut self, now: Millis, ttl_ms: u64) -> usize {
        let mut dropped = 0;
        for state in self.holders.values_mut() {
            let before = state.items.len();
            state
                .items
                .0
                .retain(|(_, s)| !(matches!(s.value, ItemValue::RpGone { .. }) && s.learned_at.0.saturating_add(ttl_ms) <= now.0));
            dropped += before - state.items.len();
        }
        dropped
    }

    /// Items of `holder` with a version above `after`, oldest first.
    pub(crate) fn items_after(&self, holder: &NodeId, after: u64) -> Vec<Item> {
        let mut out: Vec<Item> = self
            .holders
            .get(holder)
            .into_iter()
            .flat_map(|state| state.items.iter())
            .filter(|(_, s)| s.version > after)
            .map(|(k, s)| Item { key: k.clone(), version: s.version, value: s.value.clone() })
            .collect();
        out.sort_by_key(|i| i.version);
        out
    }

    /// Live low-water mark of `volume` on `holder` (0 when none).
    pub(crate) fn lwm(&self, holder: &NodeId, volume: &VolumeName) -> RpSeq {
        self.holders
            .get(holder)
            .and_then(|h| h.items.get(&ItemKey::Lwm(volume.clone())))
            .map_or(RpSeq(0), |s| if let ItemValue::Lwm(b) = s.value { b } else { RpSeq(0) })
    }
}

/// Cuts `text` to at most [`TEXT_BYTES_MAX`] bytes on a character boundary.
pub fn cut_text(text: &str) -> String {
    if text.len() <= TEXT_BYTES_MAX {
        return text.to_string();
    }
    let mut end = TEXT_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    fn rp(vol: &'static str, seq: RpSeq, version: u64) -> Item {
        Item {
            key: ItemKey::Rp(VolumeName::from_static(vol), seq),
            version,
            value: ItemValue::Rp(RpInfo {
                snapshot_unix_ms: seq.0,
                size_bytes: 1,
                merkle_root: crate::content::MerkleRoot([0; 32]),
                consistency: Consistency::Crash,
                drill: None,
            }),
        }
    }

    fn gone(vol: &'static str, seq: RpSeq, version: u64) -> Item {
        Item { key: ItemKey::Rp(VolumeName::from_static(vol), seq), version, value: ItemValue::RpGone { expired_unix_ms: 0 } }
    }

    fn lwm(vol: &'static str, below: RpSeq, version: u64) -> Item {
        Item { key: ItemKey::Lwm(VolumeName::from_static(vol)), version, value: ItemValue::Lwm(below) }
    }

    fn fingerprint(c: &Catalog) -> Vec<(NodeId, ItemKey, u64)> {
        c.holders
            .iter()
            .flat_map(|(h, s)| s.items.iter().map(move |(k, v)| (*h, k.clone(), v.version)))
            .collect()
    }

    #[test]
    fn merge_order_does_not_matter() {
        let items = vec![rp("a", RpSeq(1), 1), rp("a", RpSeq(2), 2), gone("a", RpSeq(2), 3), rp("a", RpSeq(3), 4), lwm("a", RpSeq(2), 5), rp("b", RpSeq(9), 6)];
        let mut reference = None;
        // every rotation and the reverse
        for r in 0..items.len() {
            for rev in [false, true] {
                let mut order = items.clone();
                order.rotate_left(r);
                if rev {
                    order.reverse();
                }
                let mut c = Catalog::new(id(0));
                for it in order {
                    c.merge(id(1), it.clone());
                    c.merge(id(1), it); // idempotent
                }
                let fp = fingerprint(&c);
                assert!(!fp.iter().any(|(_, k, _)| *k == ItemKey::Rp(crate::blob::VolumeName::from_static("a"), RpSeq(1))), "below lwm");
                match &reference {
                    None => reference = Some(fp),
                    Some(r) => assert_eq!(r, &fp),
                }
            }
        }
    }

    #[test]
    fn tombstone_beats_live_and_lwm_blocks_return() {
        let mut c = Catalog::new(id(0));
        c.merge(id(1), gone("a", RpSeq(5), 2));
        assert_eq!(c.merge(id(1), rp("a", RpSeq(5), 9)), Merge::Stale);
        c.merge(id(1), lwm("a", RpSeq(10), 3));
        assert_eq!(c.merge(id(1), rp("a", RpSeq(7), 1)), Merge::Stale);
        assert_eq!(c.sweep(Millis(0), 0), 0, "tombstone below the mark was already dropped");
    }

    #[test]
    fn contig_fills_forward() {
        let mut c = Catalog::new(id(0));
        c.merge(id(1), rp("a", RpSeq(1), 2));
        assert_eq!(c.holders[&id(1)].contig, 0);
        c.merge(id(1), rp("a", RpSeq(2), 1));
        assert_eq!(c.holders[&id(1)].contig, 2);
    }

    #[test]
    fn tombstones_expire() {
        let mut c = Catalog::new(id(0));
        c.merge(id(1), gone("a", RpSeq(5), 1));
        assert_eq!(c.sweep(Millis(10), 100), 0);
        assert_eq!(c.sweep(Millis(100), 100), 1);
    }
}
