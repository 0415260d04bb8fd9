//! TOML syntax errors, counted rather than collected.
//!
//! `toml`'s recoverable parse keeps every error it finds in a list: a 16 MiB
//! file of `=` lines has 24 million of them and took 5 GB and 10 s. So the
//! file is parsed with `toml`'s plain parse (which keeps only the first error)
//! and, only when that fails, the syntax is checked again here with the same
//! parser (`toml_parser`, the one under `toml`, with the same checks) and an
//! error sink that hands each error to the [`Sink`], which keeps the first
//! ones and counts the rest.

use toml_parser::decoder::Encoding;
use toml_parser::parser::{parse_document, EventReceiver, RecursionGuard, ValidateWhitespace};
use toml_parser::{ErrorSink, Expected, ParseError, Raw, Source, Span};

use crate::diagnostic::Sink;

/// Deepest nesting of arrays and tables, as `toml` allows.
const MAX_DEPTH: u32 = 80;

/// Reports every syntax error of `text` to `sink`; returns how many there were.
///
/// Keys and values are decoded as `toml` does (bad escapes, empty keys, numbers
/// out of range are found). Errors that `toml` finds only while building the
/// document (a duplicate key, a table defined twice, a bad date) are not
/// found here.
pub(crate) fn report_syntax_errors(text: &str, sink: &mut Sink<'_>) -> usize {
    let source = Source::new(text);
    let tokens = source.lex().into_vec();
    let mut decode = Decode { text };
    let mut whitespace = ValidateWhitespace::new(&mut decode, source);
    let mut receiver = RecursionGuard::new(&mut whitespace, MAX_DEPTH);
    let mut counter = Counter { sink, count: 0 };
    parse_document(&tokens, &mut receiver, &mut counter);
    counter.count
}

/// Decodes keys and values as `toml` does, for their errors (bad escapes,
/// empty keys, numbers out of range), and drops them.
struct Decode<'i> {
    text: &'i str,
}

impl<'i> Decode<'i> {
    fn raw(&self, span: Span, encoding: Option<Encoding>) -> Option<Raw<'i>> {
        self.text.get(span.start()..span.end()).map(|s| Raw::new_unchecked(s, encoding, span))
    }
}

impl EventReceiver for Decode<'_> {
    fn simple_key(&mut self, span: Span, encoding: Option<Encoding>, error: &mut dyn ErrorSink) {
        if let Some(raw) = self.raw(span, encoding) {
            raw.decode_key(&mut (), error);
        }
    }

    fn scalar(&mut self, span: Span, encoding: Option<Encoding>, error: &mut dyn ErrorSink) {
        if let Some(raw) = self.raw(span, encoding) {
            let _kind = raw.decode_scalar(&mut (), error);
        }
    }
}

struct Counter<'s, 'a> {
    sink: &'s mut Sink<'a>,
    count: usize,
}

impl ErrorSink for Counter<'_, '_> {
    fn report_error(&mut self, error: ParseError) {
        self.count += 1;
        let span = error.unexpected().map_or(0..0, |s| s.start()..s.end());
        self.sink.error_with(span, || syntax_message(&message(&error)));
    }
}

/// The message of a TOML error as shown: one line, prefixed.
pub(crate) fn syntax_message(message: &str) -> String {
    format!("TOML syntax error: {}", message.trim().replace('\n', "; "))
}

/// The text `toml` gives such an error (`toml::de::Error::message`).
fn message(error: &ParseError) -> String {
    let mut message = error.description().to_string();
    if let Some(expected) = error.expected() {
        message.push_str(", expected ");
        if expected.is_empty() {
            message.push_str("nothing");
        }
        for (i, e) in expected.iter().enumerate() {
            if i > 0 {
                message.push_str(", ");
            }
            match e {
                Expected::Literal(literal) => message.push_str(&literal_text(literal)),
                Expected::Description(description) => message.push_str(description),
                _ => message.push_str("etc"),
            }
        }
    }
    message
}

fn literal_text(literal: &str) -> String {
    match literal {
        "\n" => "newline".to_string(),
        "`" => "'`'".to_string(),
        s if s.chars().all(|c| c.is_ascii_control()) => format!("`{}`", s.escape_debug()),
        s => format!("`{s}`"),
    }
}
