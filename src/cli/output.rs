//! What every client command shares: the global flags (`--registry`,
//! `--json`), the config, and how results are written (aligned tables for
//! people, JSON Lines for programs).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;

use crate::client::config::{self, Config, Registry};

/// The global flags, handed to every command.
#[derive(Debug, Clone, Default)]
pub struct Ctx {
    /// `--registry` / `NISO_REGISTRY`: a configured name or URL.
    pub registry: Option<String>,
    /// `--json`: JSON Lines on stdout instead of text.
    pub json: bool,
}

impl Ctx {
    pub fn config(&self) -> anyhow::Result<(Config, PathBuf)> {
        let path = config::config_path()?;
        let config = Config::load(&path)?;
        Ok((config, path))
    }

    /// The registry this command talks to.
    pub fn registry(&self) -> anyhow::Result<Registry> {
        let (config, path) = self.config()?;
        Ok(config.select(self.registry.as_deref(), &path)?)
    }

    /// Writes one JSON Lines message (`type` first).
    pub fn emit(&self, kind: &str, fields: serde_json::Value) {
        let mut obj = serde_json::Map::new();
        obj.insert("type".into(), kind.into());
        if let serde_json::Value::Object(m) = fields {
            obj.extend(m);
        }
        line(&serde_json::Value::Object(obj).to_string());
    }
}

/// Writes a line to stdout. A closed pipe (`niso registry list | head -1`)
/// ends the program quietly with status 0, as the conventions say.
pub fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// Left-aligned columns, two spaces apart, the last one unpadded; no
/// header line when `headers` is empty.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let columns = rows
        .iter()
        .map(Vec::len)
        .chain([headers.len()])
        .max()
        .unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for row in rows
        .iter()
        .map(|r| r.iter().map(String::as_str).collect::<Vec<_>>())
        .chain([headers.to_vec()])
    {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let render = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = Vec::new();
    if !headers.is_empty() {
        out.push(render(headers.to_vec()));
    }
    out.extend(
        rows.iter()
            .map(|r| render(r.iter().map(String::as_str).collect())),
    );
    out.join("\n")
}

/// Prints a table.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let t = table(headers, rows);
    if !t.is_empty() {
        line(&t);
    }
}

/// `8.2 MB`, `512 B`: decimal units, one decimal, as the manual shows.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 999.95 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Asks a yes/no question on the terminal; without one, the answer is the
/// error `no_terminal`, so scripts must say `--yes` explicitly.
pub fn confirm(question: &str, no_terminal: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{no_terminal}");
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .context("cannot read the answer")?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "Yes" | "YES"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_the_manual_shows() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1_000), "1.0 kB");
        assert_eq!(human_size(8_200_000), "8.2 MB");
        assert_eq!(human_size(8_249_999), "8.2 MB");
        assert_eq!(human_size(999_999), "1.0 MB");
        assert_eq!(human_size(1_500_000_000), "1.5 GB");
    }

    #[test]
    fn tables_align_like_the_manual() {
        let t = table(
            &["TAG", "VERSION"],
            &[
                vec!["stable".into(), "1.0.0".into()],
                vec!["beta".into(), "1.1.0-rc1".into()],
            ],
        );
        assert_eq!(t, "TAG     VERSION\nstable  1.0.0\nbeta    1.1.0-rc1");
        let t = table(&[], &[vec!["postgres".into(), "16.0.0".into(), "x".into()]]);
        assert_eq!(t, "postgres  16.0.0  x");
    }
}
