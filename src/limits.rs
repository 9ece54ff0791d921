//! Size and count limits for untrusted input, in one place.
//!
//! Archives and indexes come from uploaders and mirrors we do not trust. Each
//! bound below exists to stop one kind of resource exhaustion (a gzip bomb, a
//! tar with millions of entries, an endless index); callers pass a `Limits`
//! instead of hard-coding numbers. [`LimitArgs`] are the command-line flags
//! that change them (`serve`, `publish`, `build`, `verify`).
//!
//! Error messages repeat what the uploader wrote (a name, a path, a parser's
//! complaint about a line) through [`Quoted`] and [`Clipped`], which cut it to
//! [`MAX_ECHO`] bytes: an error must never be the way to make the server hold
//! or send a copy of a huge input.

use std::fmt;

/// hex_core's `tarball_max_size`: the largest Hex tarball its clients (mix,
/// rebar3) unpack.
pub const HEX_TARBALL_MAX_SIZE: u64 = 16 << 20;

/// hex_core's `tarball_max_uncompressed_size`: the most a tarball's
/// `contents.tar.gz` may decompress to (the whole inner tar, headers
/// included) before its clients refuse it.
pub const HEX_TARBALL_MAX_UNCOMPRESSED_SIZE: u64 = 128 << 20;

/// Bounds applied when reading archives and indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest archive accepted, in bytes, as stored (compressed). Default 1 GiB.
    pub max_archive: u64,
    /// Largest total size of an archive's entries once decompressed. Default 4 GiB.
    pub max_unpacked: u64,
    /// Most entries (files and directories) in one archive. Default 100,000.
    pub max_entries: u64,
    /// Largest single metadata file inside an archive (`niso.toml`,
    /// `metadata.config`, `README.md`). Default 1 MiB.
    pub max_metadata: u64,
    /// Largest index file, compressed or not. Default 256 MiB: `versions` for
    /// 100,000 packages is about 10 MiB.
    pub max_index: u64,
    /// Largest Hex tarball, in bytes; the smaller of this and `max_archive`
    /// applies. Default 16 MiB, hex_core's own limit: a larger tarball is one
    /// no Hex client would unpack.
    pub max_hex_tarball: u64,
    /// Most a Hex tarball's `contents.tar.gz` may decompress to, counted as
    /// hex_core counts it (the whole inner tar stream); the smaller of this
    /// and `max_unpacked` applies. Default 128 MiB, hex_core's own limit.
    pub max_hex_unpacked: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_archive: 1 << 30,
            max_unpacked: 4 << 30,
            max_entries: 100_000,
            max_metadata: 1 << 20,
            max_index: 256 << 20,
            max_hex_tarball: HEX_TARBALL_MAX_SIZE,
            max_hex_unpacked: HEX_TARBALL_MAX_UNCOMPRESSED_SIZE,
        }
    }
}

impl Limits {
    /// The limits a Hex tarball is read with: Hex's own where they are the
    /// smaller. `.niso` archives keep the larger general ones.
    pub fn for_hex(&self) -> Self {
        Self {
            max_archive: self.max_archive.min(self.max_hex_tarball),
            max_unpacked: self.max_unpacked.min(self.max_hex_unpacked),
            ..*self
        }
    }
}

/// The flags that change [`Limits`], shared by the commands that read
/// archives (`registry serve`, `publish`, `build`, `verify`).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Largest Hex tarball accepted, in bytes (hex_core's tarball_max_size;
    /// mix and rebar3 refuse larger ones).
    #[arg(long, value_name = "BYTES", default_value_t = HEX_TARBALL_MAX_SIZE)]
    pub max_hex_tarball: u64,
    /// Most a Hex tarball's contents.tar.gz may unpack to, in bytes
    /// (hex_core's tarball_max_uncompressed_size).
    #[arg(long, value_name = "BYTES", default_value_t = HEX_TARBALL_MAX_UNCOMPRESSED_SIZE)]
    pub max_hex_unpacked: u64,
}

impl LimitArgs {
    /// `base` with these flags applied.
    pub fn apply(&self, base: Limits) -> Limits {
        Limits {
            max_hex_tarball: self.max_hex_tarball,
            max_hex_unpacked: self.max_hex_unpacked,
            ..base
        }
    }
}

/// Most bytes of user-supplied text one error message repeats.
pub const MAX_ECHO: usize = 256;

/// `text` cut to at most `max` bytes at a character boundary.
fn head(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The last at most `max` bytes of `text`, from a character boundary.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Shows a name or path from untrusted input in a message: quoted and
/// escaped as `{:?}` shows it, cut to [`MAX_ECHO`] bytes of the original
/// with its full length noted.
pub struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() <= MAX_ECHO {
            return write!(f, "{:?}", self.0);
        }
        write!(
            f,
            "{:?}… ({} bytes in all)",
            head(self.0, MAX_ECHO),
            self.0.len()
        )
    }
}

/// Shows free text built from untrusted input (a parser's message that
/// quotes the offending line) in a message: control characters other than
/// line breaks escaped, so nothing reaches a terminal as an escape code, and
/// a long text cut in the middle, keeping its start and its end (where
/// parsers put what they expected).
pub struct Clipped<'a>(pub &'a str);

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        if text.len() <= MAX_ECHO {
            return write_escaped(f, text);
        }
        let end = tail(text, MAX_ECHO / 4);
        write_escaped(f, head(text, MAX_ECHO - end.len()))?;
        write!(f, " […{} bytes…] ", text.len() - MAX_ECHO)?;
        write_escaped(f, end)
    }
}

fn write_escaped(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    for c in text.chars() {
        if c.is_control() && c != '\n' {
            write!(f, "{}", c.escape_default())?;
        } else {
            fmt::Write::write_char(f, c)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_limits_are_the_smaller() {
        let l = Limits::default().for_hex();
        assert_eq!((l.max_archive, l.max_unpacked), (16 << 20, 128 << 20));
        let small = Limits {
            max_archive: 10,
            max_unpacked: 20,
            ..Limits::default()
        };
        assert_eq!(
            (small.for_hex().max_archive, small.for_hex().max_unpacked),
            (10, 20)
        );
    }

    #[test]
    fn quoted_text_is_escaped_and_cut() {
        assert_eq!(Quoted("a\"b").to_string(), r#""a\"b""#);
        let long = "é".repeat(1000);
        let shown = Quoted(&long).to_string();
        assert!(shown.len() < MAX_ECHO + 40, "{shown}");
        assert!(shown.ends_with("… (2000 bytes in all)"), "{shown}");
        // NULs are escaped, and still cut.
        let nuls = "\0".repeat(1 << 20);
        assert!(Quoted(&nuls).to_string().len() < 3 * MAX_ECHO);
    }

    #[test]
    fn clipped_text_keeps_start_and_end_and_escapes_controls() {
        assert_eq!(
            Clipped("line 1\nbell\u{7}").to_string(),
            "line 1\nbell\\u{7}"
        );
        let text = format!("start{}end", "x".repeat(100_000));
        let shown = Clipped(&text).to_string();
        assert!(
            shown.starts_with("start") && shown.ends_with("end"),
            "{shown}"
        );
        assert!(shown.len() < MAX_ECHO + 40, "{}", shown.len());
        assert!(Clipped(&"\u{1b}".repeat(100_000)).to_string().len() < 10 * MAX_ECHO);
    }
}
