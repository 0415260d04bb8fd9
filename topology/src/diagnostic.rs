//! Errors of a topology file: each one with `file:line:column` and what was
//! found versus what was expected.
//!
//! A file may have any number of errors (a generated file with a million
//! unknown keys has a million), but only the first [`MAX_DIAGNOSTICS`] in file
//! order are kept; the others are counted. So the memory and the output of a
//! rejected file do not grow with its number of errors.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// How many diagnostics of one file are kept (the first ones in file order);
/// the rest are only counted (see [`Diagnostics::omitted`]).
pub const MAX_DIAGNOSTICS: usize = 100;

/// Longest message kept, in bytes; a longer one (say, quoting a huge value) is cut.
const MAX_MESSAGE_BYTES: usize = 1000;

/// One problem in a topology file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as given to [`crate::Topology::load`] or [`crate::Topology::parse`].
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters (not bytes).
    pub column: usize,
    /// What was found and what was expected.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)
    }
}

/// The problems found in a topology file: the first [`MAX_DIAGNOSTICS`] in
/// file order, and how many more there were. Never empty when returned as an
/// error. A rejected file changes nothing: the caller keeps whatever topology
/// it had.
///
/// `Display` prints one problem per line, then `... and N more errors` when
/// some were left out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics {
    kept: Vec<Diagnostic>,
    omitted: usize,
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.kept.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        if let Some(line) = self.omitted_line() {
            write!(f, "\n{line}")?;
        }
        Ok(())
    }
}

impl Diagnostics {
    /// Diagnostics made of `list` (in file order); only the first
    /// [`MAX_DIAGNOSTICS`] are kept, the rest counted.
    pub fn new(mut list: Vec<Diagnostic>) -> Diagnostics {
        let omitted = list.len().saturating_sub(MAX_DIAGNOSTICS);
        list.truncate(MAX_DIAGNOSTICS);
        Diagnostics { kept: list, omitted }
    }

    /// Number of problems found, including the ones not kept.
    pub fn len(&self) -> usize {
        self.kept.len() + self.omitted
    }

    /// Whether there are no problems.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.omitted == 0
    }

    /// Number of problems found but not kept (those after the first [`MAX_DIAGNOSTICS`]).
    pub fn omitted(&self) -> usize {
        self.omitted
    }

    /// `... and N more errors` when problems were left out, for the line after the kept ones.
    pub fn omitted_line(&self) -> Option<String> {
        match self.omitted {
            0 => None,
            1 => Some("... and 1 more error".to_string()),
            n => Some(format!("... and {n} more errors")),
        }
    }

    /// Iterates over the kept problems (at most [`MAX_DIAGNOSTICS`]), in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.kept.iter()
    }

    /// The kept problems and then the [`Diagnostics::omitted_line`], one string each:
    /// at most `MAX_DIAGNOSTICS + 1` lines, whatever the file.
    pub fn lines(&self) -> Vec<String> {
        self.kept.iter().map(|d| d.to_string()).chain(self.omitted_line()).collect()
    }
}

impl IntoIterator for Diagnostics {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;
    /// The kept problems, in file order.
    fn into_iter(self) -> Self::IntoIter {
        self.kept.into_iter()
    }
}

/// Bytes between two line-count checkpoints of a [`Sink`].
const CHECKPOINT_BYTES: usize = 4096;

/// An error as recorded: byte offset (on a character boundary), arrival order, message.
struct Pending {
    at: usize,
    seq: u64,
    message: String,
}

impl Pending {
    fn key(&self) -> (usize, u64) {
        (self.at, self.seq)
    }
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

/// Collects diagnostics for one text and turns byte offsets into line and
/// column. Keeps the [`MAX_DIAGNOSTICS`] first errors by position (whatever
/// order they are found in) and counts the others, so its memory does not grow
/// with the number of errors; positions are computed only for the kept ones.
pub(crate) struct Sink<'a> {
    file: PathBuf,
    text: &'a str,
    /// Number of '\n' before byte `i * CHECKPOINT_BYTES`: a small index (4 KiB
    /// per 16 MiB of text) that makes `line` cheap without a table of every line.
    checkpoints: Vec<usize>,
    /// The kept errors; the greatest (last in the file) on top, to be dropped first.
    kept: BinaryHeap<Pending>,
    omitted: usize,
    next_seq: u64,
}

impl<'a> Sink<'a> {
    pub(crate) fn new(text: &'a str, file: &Path) -> Self {
        let mut checkpoints = Vec::with_capacity(text.len() / CHECKPOINT_BYTES + 1);
        let mut lines = 0;
        for chunk in text.as_bytes().chunks(CHECKPOINT_BYTES) {
            checkpoints.push(lines);
            lines += count_newlines(chunk);
        }
        Sink { file: file.to_path_buf(), text, checkpoints, kept: BinaryHeap::new(), omitted: 0, next_seq: 0 }
    }

    /// `at` clamped to the text and moved back to a character boundary.
    fn boundary(&self, at: usize) -> usize {
        let mut at = at.min(self.text.len());
        while !self.text.is_char_boundary(at) {
            at -= 1;
        }
        at
    }

    /// 1-based line of byte offset `at` (clamped to the text).
    pub(crate) fn line(&self, at: usize) -> usize {
        let at = self.boundary(at);
        let chunk = at / CHECKPOINT_BYTES;
        let before = self.checkpoints.get(chunk).copied().unwrap_or(0);
        let from = chunk * CHECKPOINT_BYTES;
        before + count_newlines(&self.text.as_bytes()[from.min(at)..at]) + 1
    }

    /// 1-based line and character column of byte offset `at` (clamped to the text).
    #[cfg(test)]
    pub(crate) fn position(&self, at: usize) -> (usize, usize) {
        let at = self.boundary(at);
        let start = self.text[..at].rfind('\n').map_or(0, |i| i + 1);
        (self.line(at), self.text[start..at].chars().count() + 1)
    }

    /// Records an error at the start of `span`.
    pub(crate) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.error_with(span, || message.into());
    }

    /// Like [`Sink::error`], making the message only if the error is kept (for
    /// errors that may come by the million).
    pub(crate) fn error_with(&mut self, span: Range<usize>, message: impl FnOnce() -> String) {
        let at = self.boundary(span.start);
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.kept.len() >= MAX_DIAGNOSTICS {
            self.omitted += 1;
            // Keep the first errors in the file, not the first found.
            match self.kept.peek() {
                Some(last) if (at, seq) < last.key() => {
                    self.kept.pop();
                }
                _ => return,
            }
        }
        let mut message = message();
        if message.len() > MAX_MESSAGE_BYTES {
            let mut cut = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" [... message cut]");
        }
        self.kept.push(Pending { at, seq, message });
    }

    pub(crate) fn has_errors(&self) -> bool {
        !self.kept.is_empty()
    }

    /// The kept diagnostics in file order (several errors at one spot keep the
    /// order they were found in) and the count of the others.
    pub(crate) fn finish(self) -> Diagnostics {
        let pending = self.kept.into_sorted_vec();
        // One pass over the text up to the last error, however many errors sit on one long line.
        let (mut line, mut column, mut pos) = (1, 1, 0);
        let mut kept = Vec::with_capacity(pending.len());
        for p in pending {
            let seg = &self.text[pos..p.at];
            match seg.rfind('\n') {
                Some(i) => {
                    line += count_newlines(seg.as_bytes());
                    column = seg[i + 1..].chars().count() + 1;
                }
                None => column += seg.chars().count(),
            }
            pos = p.at;
            kept.push(Diagnostic { file: self.file.clone(), line, column, message: p.message });
        }
        Diagnostics { kept, omitted: self.omitted }
    }
}

fn count_newlines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_characters() {
        let sink = Sink::new("ab\né = 1\n\nx", Path::new("t.toml"));
        assert_eq!(sink.position(0), (1, 1));
        assert_eq!(sink.position(2), (1, 3));
        assert_eq!(sink.position(3), (2, 1));
        // "é" is two bytes; the space after it is column 2.
        assert_eq!(sink.position(5), (2, 2));
        assert_eq!(sink.position(4), (2, 1));
        assert_eq!(sink.position(10), (3, 1));
        assert_eq!(sink.position(11), (4, 1));
        assert_eq!(sink.position(999), (4, 2));
    }

    #[test]
    fn finish_computes_the_same_positions() {
        let text = "ab\né = 1\n\nx";
        let mut sink = Sink::new(text, Path::new("t.toml"));
        let offsets = [999, 4, 0, 11, 2, 5, 3, 10];
        for at in offsets {
            sink.error(at..at, format!("at {at}"));
        }
        let check = Sink::new(text, Path::new("t.toml"));
        let mut expected: Vec<(usize, usize)> = offsets.iter().map(|&at| check.position(at)).collect();
        expected.sort();
        let found: Vec<(usize, usize)> = sink.finish().iter().map(|d| (d.line, d.column)).collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn lines_across_checkpoints() {
        let text = "x\n".repeat(10_000) + "é\nlast";
        let sink = Sink::new(&text, Path::new("t.toml"));
        for line in [1, 2, 2048, 2049, 4097, 10_000] {
            let at = (line - 1) * 2;
            assert_eq!(sink.position(at), (line, 1));
            assert_eq!(sink.position(at + 1), (line, 2));
        }
        assert_eq!(sink.position(text.len()), (10_002, 5));
    }

    #[test]
    fn keeps_the_first_errors_in_the_file_and_counts_the_rest() {
        let text = "k = 1\n".repeat(1000);
        let mut sink = Sink::new(&text, Path::new("t.toml"));
        // Found back to front, and one spot twice: still the first lines, in order.
        for line in (0..1000).rev() {
            sink.error(line * 6..line * 6 + 1, format!("line {}", line + 1));
        }
        sink.error(6..7, "line 2 again");
        let all = sink.finish();
        assert_eq!(all.len(), 1001);
        assert_eq!(all.omitted(), 1001 - MAX_DIAGNOSTICS);
        let lines: Vec<usize> = all.iter().map(|d| d.line).collect();
        let mut expected: Vec<usize> = (1..=MAX_DIAGNOSTICS - 1).collect();
        expected.insert(2, 2);
        assert_eq!(lines, expected);
        assert_eq!(all.iter().nth(1).map(|d| d.message.as_str()), Some("line 2"));
        assert_eq!(all.iter().nth(2).map(|d| d.message.as_str()), Some("line 2 again"));
        let shown = all.to_string();
        assert_eq!(shown.lines().count(), MAX_DIAGNOSTICS + 1);
        assert_eq!(shown.lines().last(), Some("... and 901 more errors"));
        assert_eq!(all.lines().len(), MAX_DIAGNOSTICS + 1);
    }

    #[test]
    fn long_messages_are_cut() {
        let mut sink = Sink::new("x", Path::new("t.toml"));
        sink.error(0..0, "é".repeat(5000));
        let all = sink.finish();
        let message = &all.iter().next().unwrap().message;
        assert!(message.len() < MAX_MESSAGE_BYTES + 40, "{}", message.len());
        assert!(message.ends_with(" [... message cut]"));
    }

    #[test]
    fn display_is_file_line_column_message() {
        let d = Diagnostic { file: "a/t.toml".into(), line: 3, column: 7, message: "bad".into() };
        assert_eq!(d.to_string(), "a/t.toml:3:7: bad");
        let all = Diagnostics::new(vec![d.clone(), d]);
        assert_eq!(all.to_string(), "a/t.toml:3:7: bad\na/t.toml:3:7: bad");
        assert_eq!(all.omitted_line(), None);
    }
}
