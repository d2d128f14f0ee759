//! Honest log lines: the text-format field formatter of the three binaries,
//! and the same escaping for error messages sent back to callers.
//!
//! Log fields and gRPC messages carry caller input (a `uid`, a `key_id`, a
//! cluster name). Printed raw, a newline in one forges a whole log line and
//! a 4 MiB value makes a 4 MiB line. [`SafeFields`] formats every field and
//! the message of every event (and span) once, in one place, so that no
//! call site can forget: control characters, line and paragraph
//! separators, and bidirectional or invisible format characters are
//! written as `\n`, `\r`, `\t` or `\u{..}`, and a value longer than its
//! bound is cut with a `…[truncated N bytes]` marker. One event is
//! therefore always one line, of bounded length.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

/// Longest a field value prints, in characters after escaping: room for
/// our longest error explanations (an `error` or `reason` field), not for
/// megabytes of caller input.
pub const FIELD_LIMIT: usize = 1024;
/// Longest an event's message prints.
pub const MESSAGE_LIMIT: usize = 2048;

/// The text-format [`FormatFields`]: like tracing-subscriber's default
/// (`message` first and bare, then `name=value`; strings quoted) but every
/// value escaped and bounded.
#[derive(Debug, Clone, Copy, Default)]
pub struct SafeFields;

impl<'writer> FormatFields<'writer> for SafeFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = Visitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visitor<'_, '_> {
    fn write(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // Metadata of records bridged from the `log` crate, as the default
        // formatter skips them.
        if name.starts_with("log.") {
            return;
        }
        let first = std::mem::replace(&mut self.first, false);
        self.result = (|| {
            if !first {
                self.writer.write_char(' ')?;
            }
            let limit = if name == "message" {
                MESSAGE_LIMIT
            } else {
                write!(self.writer, "{}=", name.strip_prefix("r#").unwrap_or(name))?;
                FIELD_LIMIT
            };
            let mut out = Bounded::new(&mut *self.writer, limit);
            // Our own writer never fails before the limit; the marker
            // below reports what was cut.
            out.write_fmt(value)?;
            out.finish()
        })();
    }
}

impl Visit for Visitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, format_args!("{value}"));
        } else {
            self.write(field, format_args!("{value:?}"));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.write(field, format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, format_args!("{value:?}"));
    }
}

/// A [`fmt::Write`] that escapes what passes through and stops after
/// `limit` output characters, counting the input bytes it dropped.
struct Bounded<W> {
    inner: W,
    limit: usize,
    written: usize,
    dropped: usize,
}

impl<W: fmt::Write> Bounded<W> {
    fn new(inner: W, limit: usize) -> Self {
        Self {
            inner,
            limit,
            written: 0,
            dropped: 0,
        }
    }

    /// Writes the truncation marker, if anything was cut.
    fn finish(mut self) -> fmt::Result {
        if self.dropped > 0 {
            write!(self.inner, "…[truncated {} bytes]", self.dropped)?;
        }
        Ok(())
    }
}

impl<W: fmt::Write> fmt::Write for Bounded<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.dropped > 0 {
            self.dropped += s.len();
            return Ok(());
        }
        for (at, c) in s.char_indices() {
            let mut buf = [0u8; 12];
            let piece = escape_char(c, &mut buf);
            let width = piece.chars().count();
            if self.written + width > self.limit {
                self.dropped += s.len() - at;
                return Ok(());
            }
            self.inner.write_str(piece)?;
            self.written += width;
        }
        Ok(())
    }
}

/// Whether `c` may be written to a log line as it is: not a control
/// character, not a line or paragraph separator, not an invisible or
/// bidirectional format character (which can make a line read as another).
fn printable(c: char) -> bool {
    !(c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
        ))
}

/// `c` itself, or its escape (`\n`, `\u{1b}`), in `buf`.
fn escape_char(c: char, buf: &mut [u8; 12]) -> &str {
    if printable(c) {
        return c.encode_utf8(buf);
    }
    let mut out = Cursor {
        buf: &mut *buf,
        len: 0,
    };
    let _ = match c {
        '\n' => out.write_str("\\n"),
        '\r' => out.write_str("\\r"),
        '\t' => out.write_str("\\t"),
        c => write!(out, "\\u{{{:x}}}", u32::from(c)),
    };
    let len = out.len;
    std::str::from_utf8(&buf[..len]).unwrap_or("?")
}

/// A tiny `fmt::Write` into a fixed buffer (an escape is at most
/// `\u{10ffff}`: 10 bytes).
struct Cursor<'a> {
    buf: &'a mut [u8; 12],
    len: usize,
}

impl fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let slot = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// `text` escaped and bounded to `limit` characters, with the marker: for
/// messages that echo caller input back (gRPC status messages).
pub fn bounded(text: &str, limit: usize) -> String {
    let mut out = String::new();
    let mut b = Bounded::new(&mut out, limit);
    // Writing into a String cannot fail.
    let _ = b.write_str(text);
    let _ = b.finish();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_invisible_characters_are_escaped() {
        assert_eq!(
            bounded("plain text, ünïcode ✓", 100),
            "plain text, ünïcode ✓"
        );
        assert_eq!(
            bounded("a\nINFO audit: forged\r\x1b[2K\t\0\x7f", 100),
            "a\\nINFO audit: forged\\r\\u{1b}[2K\\t\\u{0}\\u{7f}"
        );
        assert_eq!(
            bounded("\u{2028}\u{202e}\u{200b}\u{feff}\u{85}", 100),
            "\\u{2028}\\u{202e}\\u{200b}\\u{feff}\\u{85}"
        );
    }

    #[test]
    fn long_values_are_cut_with_a_marker() {
        let big = "x".repeat(4 << 20);
        let out = bounded(&big, 256);
        assert_eq!(
            out,
            format!("{}…[truncated {} bytes]", "x".repeat(256), (4 << 20) - 256)
        );
        // Escapes count as what they print, and are never cut in half.
        let out = bounded(&"\n".repeat(100), 9);
        assert_eq!(out, "\\n\\n\\n\\n…[truncated 96 bytes]");
        // Multi-byte characters are never split.
        assert_eq!(bounded("ééé", 2), "éé…[truncated 2 bytes]");
        assert_eq!(bounded("", 0), "");
    }

    /// The formatter through a real subscriber: one line per event, escaped
    /// and bounded, whatever the fields hold.
    #[test]
    fn events_are_one_bounded_line() {
        use std::sync::{Arc, Mutex};

        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let for_writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(SafeFields)
            .with_ansi(false)
            .with_writer(move || for_writer.clone())
            .finish();
        let forged = "u\n2026-01-01T00:00:00Z  INFO audit: op=rotation actor=operator\x1b[1A";
        let huge = "k".repeat(4 << 20);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", peer = %forged);
            let _entered = span.enter();
            tracing::info!(target: "audit", op = "decrypt", uid = %forged, key_id = %huge, quoted = forged, "message with {}", forged);
            tracing::warn!(error = ?huge, "second");
        });
        let text = String::from_utf8(sink.0.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text:.2000}");
        for line in &lines {
            assert!(
                line.len() < 3 * FIELD_LIMIT + MESSAGE_LIMIT,
                "line of {} bytes",
                line.len()
            );
            assert!(!line.contains('\x1b'), "{line}");
        }
        let first = lines[0];
        assert!(first.contains("message with u\\n2026"), "{first}");
        assert!(
            first.contains(
                "uid=u\\n2026-01-01T00:00:00Z  INFO audit: op=rotation actor=operator\\u{1b}[1A"
            ),
            "{first}"
        );
        assert!(first.contains("quoted=\"u\\n2026"), "{first}");
        assert!(first.contains("peer=u\\n2026"), "{first}");
        assert!(
            first.contains(&format!(
                "key_id={}…[truncated {} bytes]",
                "k".repeat(FIELD_LIMIT),
                (4 << 20) - FIELD_LIMIT
            )),
            "{first:.600}"
        );
        assert!(lines[1].contains("…[truncated"), "{}", lines[1]);
    }
}
