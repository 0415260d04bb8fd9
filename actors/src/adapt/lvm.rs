//! LVM2 physical volumes: the label, the metadata area header and the
//! metadata text, enough to find logical volumes made of one linear range.
//!
//! On-disk format (lvm2's `format_text`): a label in one of the first four
//! sectors (`LABELONE` … `LVM2 001`, then the PV header: the PV UUID, the data
//! area list and the metadata area list, each ended by a zero entry); a
//! metadata area starts with a 512-byte header (magic ` LVM2 x[5A%r0N*>`,
//! then the locations of the metadata text in a circular buffer that can wrap
//! around to just after the header). Every offset and length read is checked
//! against the volume and against fixed limits.

use std::collections::HashMap;

use super::layout::ReadAt;

/// Largest metadata text read (lvm2's default metadata area is 1 MiB).
const METADATA_BYTES_MAX: u64 = 8 << 20;
/// Deepest nesting of sections in the metadata text.
const DEPTH_MAX: usize = 16;
/// Most values, sections and list items in one metadata text.
const ITEMS_MAX: usize = 200_000;
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
const MDA_HEADER_BYTES: u64 = 512;

/// A scalar or list value of the metadata text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// An integer.
    Int(i64),
    /// A string.
    Str(String),
    /// A list of scalars.
    List(Vec<Value>),
}

/// A node of the metadata text: a section or a value.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// `name { ... }`.
    Section(Vec<(String, Node)>),
    /// `name = value`.
    Value(Value),
}

fn section<'a>(items: &'a [(String, Node)], name: &str) -> Option<&'a [(String, Node)]> {
    items.iter().find_map(|(k, n)| match n {
        Node::Section(s) if k == name => Some(s.as_slice()),
        _ => None,
    })
}

fn value<'a>(items: &'a [(String, Node)], name: &str) -> Option<&'a Value> {
    items.iter().find_map(|(k, n)| match n {
        Node::Value(v) if k == name => Some(v),
        _ => None,
    })
}

fn int(items: &[(String, Node)], name: &str) -> Option<i64> {
    match value(items, name)? {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

fn string<'a>(items: &'a [(String, Node)], name: &str) -> Option<&'a str> {
    match value(items, name)? {
        Value::Str(s) => Some(s),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Int(i64),
    Eq,
    Open,
    Close,
    ListOpen,
    ListClose,
    Comma,
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if tokens.len() > ITEMS_MAX * 4 {
            return Err("metadata text has too many tokens".into());
        }
        match c {
            c if c.is_whitespace() || c == '\0' => {}
            '#' => {
                while chars.next_if(|&(_, c)| c != '\n').is_some() {}
            }
            '=' => tokens.push(Token::Eq),
            '{' => tokens.push(Token::Open),
            '}' => tokens.push(Token::Close),
            '[' => tokens.push(Token::ListOpen),
            ']' => tokens.push(Token::ListClose),
            ',' => tokens.push(Token::Comma),
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, e)) => s.push(e),
                            None => return Err("unterminated string".into()),
                        },
                        Some((_, c)) => s.push(c),
                        None => return Err("unterminated string".into()),
                    }
                }
                tokens.push(Token::Str(s));
            }
            c if c.is_alphanumeric() || "_.+-".contains(c) => {
                let mut end = i + c.len_utf8();
                while let Some((j, d)) = chars.next_if(|&(_, d)| d.is_alphanumeric() || "_.+-".contains(d)) {
                    end = j + d.len_utf8();
                }
                let word = &text[i..end];
                let numeric = word.strip_prefix('-').unwrap_or(word);
                if numeric.starts_with(|d: char| d.is_ascii_digit()) && numeric.chars().all(|d| d.is_ascii_digit() || d == '.') {
                    // Floats (rare) are kept as their integer part.
                    let int_part = word.split('.').next().unwrap_or(word);
                    let n = int_part.parse::<i64>().map_err(|_| format!("bad number '{word}'"))?;
                    tokens.push(Token::Int(n));
                } else {
                    tokens.push(Token::Ident(word.to_string()));
                }
            }
            other => return Err(format!("unexpected character '{}' in metadata text", other.escape_default())),
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    items: usize,
}

impl Parser {
    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn count(&mut self) -> Result<(), String> {
        self.items += 1;
        if self.items > ITEMS_MAX {
            return Err("metadata text has too many items".into());
        }
        Ok(())
    }

    fn body(&mut self, depth: usize, closed: bool) -> Result<Vec<(String, Node)>, String> {
        if depth > DEPTH_MAX {
            return Err("metadata sections nest too deep".into());
        }
        let mut items = Vec::new();
        loop {
            match self.next() {
                None if !closed => return Ok(items),
                None => return Err("metadata section not closed".into()),
                Some(Token::Close) if closed => return Ok(items),
                Some(Token::Ident(name)) => {
                    self.count()?;
                    match self.next() {
                        Some(Token::Eq) => {
                            let v = self.value()?;
                            items.push((name, Node::Value(v)));
                        }
                        Some(Token::Open) => {
                            let s = self.body(depth + 1, true)?;
                            items.push((name, Node::Section(s)));
                        }
                        _ => return Err(format!("expected '=' or '{{' after '{name}'")),
                    }
                }
                Some(t) => return Err(format!("unexpected {} in metadata text", describe(&t))),
            }
        }
    }

    fn value(&mut self) -> Result<Value, String> {
        match self.next() {
            Some(Token::Int(i)) => Ok(Value::Int(i)),
            Some(Token::Str(s)) => Ok(Value::Str(s)),
            Some(Token::ListOpen) => {
                let mut list = Vec::new();
                loop {
                    match self.next() {
                        Some(Token::ListClose) => return Ok(Value::List(list)),
                        Some(Token::Comma) => {}
                        Some(Token::Int(i)) => list.push(Value::Int(i)),
                        Some(Token::Str(s)) => list.push(Value::Str(s)),
                        Some(t) => return Err(format!("unexpected {} in a list", describe(&t))),
                        None => return Err("list not closed".into()),
                    }
                    self.count()?;
                }
            }
            Some(t) => Err(format!("unexpected {} where a value belongs", describe(&t))),
            None => Err("value missing at the end".into()),
        }
    }
}

fn describe(t: &Token) -> String {
    match t {
        Token::Ident(s) => format!("word '{s}'"),
        Token::Str(_) => "string".into(),
        Token::Int(i) => format!("number {i}"),
        Token::Eq => "'='".into(),
        Token::Open => "'{'".into(),
        Token::Close => "'}'".into(),
        Token::ListOpen => "'['".into(),
        Token::ListClose => "']'".into(),
        Token::Comma => "','".into(),
    }
}

/// Parses LVM2 metadata text into its tree of sections and values.
pub fn parse_text(text: &str) -> Result<Vec<(String, Node)>, String> {
    let tokens = tokenize(text)?;
    Parser { tokens, pos: 0, items: 0 }.body(0, false)
}

/// A segment of a logical volume.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Its first extent within the LV.
    pub start_extent: u64,
    /// Its length in extents.
    pub extent_count: u64,
    /// Its type (`striped` for linear ones).
    pub kind: String,
    /// How many stripes.
    pub stripe_count: u64,
    /// The PVs and first extents of the stripes.
    pub stripes: Vec<(String, u64)>,
}

/// A logical volume of a volume group.
#[derive(Debug, Clone, PartialEq)]
pub struct LogicalVolume {
    /// Its name.
    pub name: String,
    /// Whether it is visible (hidden LVs are parts of other LVs).
    pub visible: bool,
    /// Its segments.
    pub segments: Vec<Segment>,
}

/// A physical volume as the metadata names it.
#[derive(Debug, Clone, PartialEq)]
pub struct PvEntry {
    /// Its name in the metadata (`pv0`).
    pub name: String,
    /// Its UUID, dashes removed.
    pub id: String,
    /// Where its extents start, in 512-byte sectors.
    pub pe_start: u64,
    /// How many extents it has (0 when the metadata does not say).
    pub pe_count: u64,
}

/// What the metadata text says about a volume group.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeGroup {
    /// Its name.
    pub name: String,
    /// The size of an extent, in 512-byte sectors.
    pub extent_sectors: u64,
    /// Its PVs.
    pub pvs: Vec<PvEntry>,
    /// Its LVs.
    pub lvs: Vec<LogicalVolume>,
}

fn uint(items: &[(String, Node)], name: &str, what: &str) -> Result<u64, String> {
    int(items, name).and_then(|i| u64::try_from(i).ok()).ok_or_else(|| format!("{what}: '{name}' missing or negative"))
}

/// Reads the volume group out of parsed metadata text.
pub fn volume_group(tree: &[(String, Node)]) -> Result<VolumeGroup, String> {
    let (name, vg) = tree
        .iter()
        .find_map(|(k, n)| match n {
            Node::Section(s) if section(s, "physical_volumes").is_some() => Some((k.clone(), s.as_slice())),
            _ => None,
        })
        .ok_or("no volume group in the metadata text")?;
    let extent_sectors = uint(vg, "extent_size", "volume group")?;
    if extent_sectors == 0 {
        return Err("extent_size is 0".into());
    }
    let mut pvs = Vec::new();
    for (pv_name, node) in section(vg, "physical_volumes").unwrap_or_default() {
        let Node::Section(pv) = node else { continue };
        pvs.push(PvEntry {
            name: pv_name.clone(),
            id: string(pv, "id").unwrap_or_default().replace('-', ""),
            pe_start: uint(pv, "pe_start", pv_name)?,
            pe_count: int(pv, "pe_count").and_then(|i| u64::try_from(i).ok()).unwrap_or(0),
        });
    }
    let mut lvs = Vec::new();
    for (lv_name, node) in section(vg, "logical_volumes").unwrap_or_default() {
        let Node::Section(lv) = node else { continue };
        let visible = matches!(value(lv, "status"), Some(Value::List(l)) if l.contains(&Value::Str("VISIBLE".into())));
        let mut segments = Vec::new();
        for (seg_name, node) in lv {
            let Node::Section(seg) = node else { continue };
            if !seg_name.starts_with("segment") {
                continue;
            }
            let what = format!("{lv_name}/{seg_name}");
            let mut stripes = Vec::new();
            if let Some(Value::List(list)) = value(seg, "stripes") {
                for pair in list.chunks(2) {
                    if let [Value::Str(pv), Value::Int(pe)] = pair {
                        stripes.push((pv.clone(), u64::try_from(*pe).map_err(|_| format!("{what}: negative extent"))?));
                    }
                }
            }
            segments.push(Segment {
                start_extent: uint(seg, "start_extent", &what)?,
                extent_count: uint(seg, "extent_count", &what)?,
                kind: string(seg, "type").unwrap_or("?").to_string(),
                stripe_count: int(seg, "stripe_count").and_then(|i| u64::try_from(i).ok()).unwrap_or(0),
                stripes,
            });
        }
        lvs.push(LogicalVolume { name: lv_name.clone(), visible, segments });
    }
    Ok(VolumeGroup { name, extent_sectors, pvs, lvs })
}

/// A physical volume found on a volume: its UUID and its metadata.
#[derive(Debug, Clone)]
pub struct PhysicalVolume {
    /// Its UUID (dashes removed).
    pub id: String,
    /// Its volume group.
    pub vg: VolumeGroup,
}

fn le32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

fn read(disk: &dyn ReadAt, start: u64, size: u64, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(format!("bytes {offset}+{len} lie outside the physical volume"));
    }
    let at = start.checked_add(offset).ok_or("offset overflows")?;
    let len = usize::try_from(len).map_err(|_| "length too large")?;
    let mut buf = vec![0u8; len];
    disk.read_at(&mut buf, at).map_err(|e| format!("reading byte {at}: {e}"))?;
    Ok(buf)
}

/// Reads the PV label, the first usable metadata area and its text from the
/// volume at `start` (`size` bytes) of `disk`.
pub fn read_pv(disk: &dyn ReadAt, start: u64, size: u64) -> Result<PhysicalVolume, String> {
    let head = read(disk, start, size, 0, 2048)?;
    let sector = super::superblock::lvm_label_sector(&head).ok_or("no LVM2 label")?;
    let label = &head[sector * 512..sector * 512 + 512];
    let pvh = le32(label, 20).map(|o| o as usize).filter(|&o| (32..512 - 48).contains(&o)).ok_or("bad PV header offset")?;
    let id = String::from_utf8_lossy(&label[pvh..pvh + 32]).into_owned();
    // Data area list, then metadata area list, each ended by a zero entry.
    let mut pos = pvh + 40;
    let mut lists: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
    for list in lists.iter_mut() {
        loop {
            let (Some(offset), Some(len)) = (le64(label, pos), le64(label, pos + 8)) else {
                return Err("PV header lists run past the label sector".into());
            };
            pos += 16;
            if offset == 0 {
                break;
            }
            list.push((offset, len));
        }
    }
    let mut last_error = String::from("no metadata area");
    for &(mda_offset, mda_size) in &lists[1] {
        match read_metadata(disk, start, size, mda_offset, mda_size) {
            Ok(Some(text)) => {
                let vg = parse_text(&text).and_then(|tree| volume_group(&tree))?;
                return Ok(PhysicalVolume { id, vg });
            }
            Ok(None) => last_error = "every metadata area is empty or ignored".into(),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

/// The current metadata text of one metadata area (`None`: empty or ignored).
fn read_metadata(disk: &dyn ReadAt, start: u64, size: u64, mda_offset: u64, mda_size: u64) -> Result<Option<String>, String> {
    if mda_size <= MDA_HEADER_BYTES {
        return Err("metadata area too small".into());
    }
    let header = read(disk, start, size, mda_offset, MDA_HEADER_BYTES)?;
    if &header[4..20] != MDA_MAGIC {
        return Err("metadata area header has no LVM2 magic".into());
    }
    // raw_locn list from byte 40: offset, size, checksum, flags.
    let (Some(text_offset), Some(text_len), Some(flags)) = (le64(&header, 40), le64(&header, 48), le32(&header, 60)) else {
        return Err("metadata area header too short".into());
    };
    if text_offset == 0 || text_len == 0 || flags & 1 != 0 {
        return Ok(None);
    }
    if text_len > METADATA_BYTES_MAX || text_len > mda_size - MDA_HEADER_BYTES || text_offset >= mda_size || text_offset < MDA_HEADER_BYTES {
        return Err(format!("metadata text location {text_offset}+{text_len} does not fit its area of {mda_size} bytes"));
    }
    // The text is in a circular buffer after the header: it may wrap.
    let first = text_len.min(mda_size - text_offset);
    let mut text = read(disk, start, size, mda_offset + text_offset, first)?;
    if first < text_len {
        text.extend(read(disk, start, size, mda_offset + MDA_HEADER_BYTES, text_len - first)?);
    }
    while text.last() == Some(&0) {
        text.pop();
    }
    String::from_utf8(text).map(Some).map_err(|_| "metadata text is not UTF-8".into())
}

/// What became of one logical volume of a PV.
#[derive(Debug, Clone, PartialEq)]
pub enum LvPlace {
    /// A linear LV on this PV: its byte range from the PV's start.
    Here {
        /// Offset from the PV's first byte.
        offset: u64,
        /// Length in bytes.
        bytes: u64,
    },
    /// A linear LV whose extents are on another PV (by its metadata name).
    OnOtherPv(String),
    /// Not a single linear range: why.
    Unsupported(String),
}

/// Segment types whose data lies in other (hidden) LVs, never directly on
/// a PV, or nowhere.
const SEGMENTS_WITHOUT_EXTENTS: &[&str] = &["snapshot", "thin", "thin-pool", "error", "zero"];

/// Which extents of `pv` the volume group allocates to some LV (visible or
/// hidden): entry `i` is true when extent `i` is. An error, and nothing
/// called unallocated, when the metadata does not say how many extents the
/// PV has, or holds a segment type that may place data on PVs some other
/// way (mirrors, RAID, caches, a pvmove in progress) or extents past the PV.
pub fn allocated_extents(pv: &PhysicalVolume) -> Result<(PvEntry, Vec<bool>), String> {
    let vg = &pv.vg;
    let me = vg.pvs.iter().find(|p| p.id == pv.id).ok_or("the volume group's metadata does not list this physical volume")?;
    if me.pe_count == 0 {
        return Err("its metadata does not say how many extents it has".into());
    }
    // 2^24 extents: 64 TiB at LVM's default 4 MiB; more is read whole
    // rather than mapped (a map byte per extent).
    let count = usize::try_from(me.pe_count).map_err(|_| "too many extents")?;
    if count > 1 << 24 {
        return Err(format!("it has {count} extents, more than drmesh maps"));
    }
    let mut used = vec![false; count];
    for lv in &vg.lvs {
        for seg in &lv.segments {
            if SEGMENTS_WITHOUT_EXTENTS.contains(&seg.kind.as_str()) {
                continue;
            }
            if seg.kind != "striped" || seg.stripe_count == 0 || seg.stripes.len() as u64 != seg.stripe_count || !seg.extent_count.is_multiple_of(seg.stripe_count) {
                return Err(format!("logical volume {} has a segment of type {} drmesh does not map", lv.name, seg.kind));
            }
            let per_stripe = seg.extent_count / seg.stripe_count;
            for (_, first) in seg.stripes.iter().filter(|(name, _)| *name == me.name) {
                let end = first.checked_add(per_stripe).filter(|&e| e <= me.pe_count).ok_or_else(|| format!("logical volume {} has extents past the end of the physical volume", lv.name))?;
                used[*first as usize..end as usize].fill(true);
            }
        }
    }
    Ok((me.clone(), used))
}

/// Where each visible LV of `pv`'s volume group is, seen from this PV.
pub fn place_lvs(pv: &PhysicalVolume) -> Vec<(String, LvPlace)> {
    let vg = &pv.vg;
    let me: HashMap<&str, &PvEntry> = vg.pvs.iter().filter(|p| p.id == pv.id).map(|p| (p.name.as_str(), p)).collect();
    let mut out = Vec::new();
    for lv in vg.lvs.iter().filter(|lv| lv.visible) {
        let place = match lv.segments.as_slice() {
            [] => LvPlace::Unsupported("it has no segments".into()),
            [seg] if seg.kind == "striped" && seg.stripe_count == 1 && seg.stripes.len() == 1 => {
                let (pv_name, first_pe) = &seg.stripes[0];
                match me.get(pv_name.as_str()) {
                    None => LvPlace::OnOtherPv(pv_name.clone()),
                    Some(entry) => {
                        let offset = first_pe
                            .checked_mul(vg.extent_sectors)
                            .and_then(|s| s.checked_add(entry.pe_start))
                            .and_then(|s| s.checked_mul(512));
                        let bytes = seg.extent_count.checked_mul(vg.extent_sectors).and_then(|s| s.checked_mul(512));
                        match (offset, bytes) {
                            (Some(offset), Some(bytes)) => LvPlace::Here { offset, bytes },
                            _ => LvPlace::Unsupported("its extents overflow a 64-bit byte offset".into()),
                        }
                    }
                }
            }
            [seg] if seg.kind == "striped" => LvPlace::Unsupported(format!("it is striped over {} physical volumes", seg.stripe_count)),
            [seg] => LvPlace::Unsupported(format!("its segment type is {} (thin, RAID, mirror, cache and snapshot LVs need LVM itself)", seg.kind)),
            segs => LvPlace::Unsupported(format!("it is made of {} segments, not one linear range (LVM itself maps it)", segs.len())),
        };
        out.push((lv.name.clone(), place));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const TEXT: &str = r#"vg0 {
id = "Zt1Yq5-aaaa-bbbb-cccc-dddd-eeee-ffffff"
seqno = 4
format = "lvm2" # informational
status = ["RESIZEABLE", "READ", "WRITE"]
flags = []
extent_size = 8192
max_lv = 0
max_pv = 0
metadata_copies = 0

physical_volumes {

pv0 {
id = "AbCdEf-0123-4567-89ab-cdef-ghij-klmnop"
device = "/dev/sda2"
status = ["ALLOCATABLE"]
flags = []
dev_size = 41940992
pe_start = 2048
pe_count = 5119
}
}

logical_volumes {

root {
id = "x"
status = ["READ", "WRITE", "VISIBLE"]
flags = []
creation_time = 1700000000
creation_host = "srv"
segment_count = 1

segment1 {
start_extent = 0
extent_count = 2560
type = "striped"
stripe_count = 1

stripes = [
"pv0", 0
]
}
}

home {
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 2
segment1 {
start_extent = 0
extent_count = 100
type = "striped"
stripe_count = 1
stripes = ["pv0", 2560]
}
segment2 {
start_extent = 100
extent_count = 100
type = "striped"
stripe_count = 1
stripes = ["pv0", 3000]
}
}

pool_tmeta {
status = ["READ", "WRITE"]
segment_count = 1
segment1 { start_extent = 0 extent_count = 1 type = "striped" stripe_count = 1 stripes = ["pv0", 4000] }
}

thin {
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 1
segment1 { start_extent = 0 extent_count = 10 type = "thin" thin_pool = "pool" }
}
}
}
# Generated by LVM2 version 2.03.16(2) (2022-05-18): Tue Dec  5 00:00:00 2023

contents = "Text Format Volume Group"
version = 1

description = "Created *after* executing 'vgcfgbackup'"

creation_host = "srv"	# Linux srv 6.1.0 #1 SMP x86_64
creation_time = 1700000000	# Tue Dec  5 00:00:00 2023
"#;

    #[test]
    fn metadata_text_to_lvs() {
        let vg = volume_group(&parse_text(TEXT).unwrap()).unwrap();
        assert_eq!(vg.name, "vg0");
        assert_eq!(vg.extent_sectors, 8192);
        assert_eq!(vg.pvs, vec![PvEntry { name: "pv0".into(), id: "AbCdEf0123456789abcdefghijklmnop".into(), pe_start: 2048, pe_count: 5119 }]);
        let pv = PhysicalVolume { id: "AbCdEf0123456789abcdefghijklmnop".into(), vg };
        let places = place_lvs(&pv);
        assert_eq!(places.len(), 3, "the hidden pool_tmeta is not listed: {places:?}");
        assert_eq!(places[0], ("root".into(), LvPlace::Here { offset: 2048 * 512, bytes: 2560 * 8192 * 512 }));
        assert!(matches!(&places[1], (n, LvPlace::Unsupported(r)) if n == "home" && r.contains("2 segments")));
        assert!(matches!(&places[2], (n, LvPlace::Unsupported(r)) if n == "thin" && r.contains("thin")));
        let other = PhysicalVolume { id: "someoneelse".into(), vg: pv.vg.clone() };
        assert_eq!(place_lvs(&other)[0].1, LvPlace::OnOtherPv("pv0".into()));
    }

    #[test]
    fn allocated_extents_cover_every_lv_hidden_ones_too() {
        let vg = volume_group(&parse_text(TEXT).unwrap()).unwrap();
        let pv = PhysicalVolume { id: "AbCdEf0123456789abcdefghijklmnop".into(), vg };
        let (entry, used) = allocated_extents(&pv).unwrap();
        assert_eq!((entry.pe_count, used.len()), (5119, 5119));
        let held: Vec<usize> = (0..used.len()).filter(|&i| used[i]).collect();
        let want: Vec<usize> = (0..2560).chain(2560..2660).chain(3000..3100).chain([4000]).collect();
        assert_eq!(held, want, "root, both segments of home, the hidden pool_tmeta; thin holds none");
        // A RAID or mirror segment may place data some other way: nothing is called unallocated.
        let raid = TEXT.replace(r#"type = "thin" thin_pool = "pool""#, r#"type = "raid1" raids = ["a_rmeta_0", "a_rimage_0"]"#);
        let pv = PhysicalVolume { id: pv.id.clone(), vg: volume_group(&parse_text(&raid).unwrap()).unwrap() };
        assert!(allocated_extents(&pv).unwrap_err().contains("type raid1"));
        // Extents past the PV's end, and a PV whose extent count is missing.
        let past = TEXT.replace(r#"stripes = ["pv0", 4000]"#, r#"stripes = ["pv0", 5119]"#);
        let pv = PhysicalVolume { id: pv.id.clone(), vg: volume_group(&parse_text(&past).unwrap()).unwrap() };
        assert!(allocated_extents(&pv).unwrap_err().contains("past the end"));
        let uncounted = TEXT.replace("pe_count = 5119", "");
        let pv = PhysicalVolume { id: pv.id.clone(), vg: volume_group(&parse_text(&uncounted).unwrap()).unwrap() };
        assert!(allocated_extents(&pv).is_err());
    }

    #[test]
    fn bad_text_is_an_error_not_a_panic() {
        for bad in ["vg {", "vg { a = }", "vg { a = [1, 2 }", "\"open", "a = b", "}", "x { y { z { } }", "-", "a = 99999999999999999999999"] {
            let _ = parse_text(bad).and_then(|t| volume_group(&t));
        }
        let deep = "a {".repeat(100) + &"}".repeat(100);
        assert!(parse_text(&deep).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_without_panic(s in "[a-z0-9_={}\\[\\],\" #\n-]{0,300}") {
            let _ = parse_text(&s).and_then(|t| volume_group(&t));
        }
    }
}
