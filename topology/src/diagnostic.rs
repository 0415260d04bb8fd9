//! Errors of a topology file: each one with `file:line:column` and what was
//! found versus what was expected.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

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

/// Every problem found in a topology file, in file order; never empty when
/// returned as an error. A rejected file changes nothing: the caller keeps
/// whatever topology it had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl Diagnostics {
    /// Number of problems.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no problems.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Iterates over the problems.
    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }
}

impl IntoIterator for Diagnostics {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// Collects diagnostics for one text, turning byte spans into line and column.
pub(crate) struct Sink<'a> {
    file: PathBuf,
    text: &'a str,
    /// Byte offset of the start of each line.
    line_starts: Vec<usize>,
    diags: Vec<Diagnostic>,
}

impl<'a> Sink<'a> {
    pub(crate) fn new(text: &'a str, file: &Path) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Sink { file: file.to_path_buf(), text, line_starts, diags: Vec::new() }
    }

    /// 1-based line and character column of byte offset `at` (clamped to the text).
    pub(crate) fn position(&self, at: usize) -> (usize, usize) {
        let mut at = at.min(self.text.len());
        while !self.text.is_char_boundary(at) {
            at -= 1;
        }
        let line = self.line_starts.partition_point(|&start| start <= at);
        let start = self.line_starts[line - 1];
        let column = self.text[start..at].chars().count() + 1;
        (line, column)
    }

    /// Records an error at the start of `span`.
    pub(crate) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.diags.push(Diagnostic { file: self.file.clone(), line, column, message: message.into() });
    }

    pub(crate) fn has_errors(&self) -> bool {
        !self.diags.is_empty()
    }

    /// The diagnostics in file order.
    pub(crate) fn finish(mut self) -> Diagnostics {
        // Stable: several errors at one spot keep the order they were found in.
        self.diags.sort_by_key(|d| (d.line, d.column));
        Diagnostics(self.diags)
    }
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
    fn display_is_file_line_column_message() {
        let d = Diagnostic { file: "a/t.toml".into(), line: 3, column: 7, message: "bad".into() };
        assert_eq!(d.to_string(), "a/t.toml:3:7: bad");
        let all = Diagnostics(vec![d.clone(), d]);
        assert_eq!(all.to_string(), "a/t.toml:3:7: bad\na/t.toml:3:7: bad");
    }
}
