//! Replays every input the fuzzers found a problem with (kept under
//! `fuzz/regressions/TARGET/`) and the seed inputs (`fuzz/seeds/TARGET/`)
//! through the same checks as the cargo-fuzz targets, so CI runs them
//! without cargo-fuzz or a nightly compiler. See `fuzz/README.md`.

#[path = "../fuzz/fuzz_targets/checks.rs"]
mod checks;

use std::path::Path;

/// Runs `check` on every file of `fuzz/regressions/TARGET` and
/// `fuzz/seeds/TARGET`; returns how many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for kind in ["regressions", "seeds"] {
        let dir = root.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<_> = entries.map(|e| e.expect("readable dir").path()).collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path).expect("readable input");
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{} fails its check", path.display());
            n += 1;
        }
    }
    n
}

/// Whether a seed must be accepted: the ones made from fixtures are named
/// after them (`my-app-1.0.0-x86_64.niso.raw`, `jason-1.4.4.tar.struct`);
/// the hostile ones (`hidden-after-end`, `….tar.hidden`) must be refused.
fn seed_is_valid(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    (name.contains(".niso.") || name.contains(".tar.")) && !name.ends_with(".hidden")
}

/// The archive seeds start where they should: the fixtures' accepted, the
/// hostile ones refused (a seed that no longer parses would leave the
/// fuzzer far from the code it is meant to explore).
fn check_archive_seeds(target: &str, check: fn(&[u8]) -> bool) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut valid = 0;
    for e in std::fs::read_dir(&dir).expect("seeds exist") {
        let path = e.expect("readable dir").path();
        let accepted = check(&std::fs::read(&path).expect("readable seed"));
        assert_eq!(accepted, seed_is_valid(&path), "{}", path.display());
        valid += usize::from(accepted);
    }
    assert!(valid >= 3, "{valid} valid seeds for {target}");
}

#[test]
fn niso_archive_inputs() {
    assert!(
        replay("niso_archive", |d| {
            checks::niso_archive(d);
        }) > 0
    );
    check_archive_seeds("niso_archive", checks::niso_archive);
}

#[test]
fn hex_tarball_inputs() {
    assert!(
        replay("hex_tarball", |d| {
            checks::hex_tarball(d);
        }) > 0
    );
    check_archive_seeds("hex_tarball", checks::hex_tarball);
}

#[test]
fn metadata_config_inputs() {
    assert!(replay("metadata_config", checks::metadata_config) > 0);
}

#[test]
fn manifest_inputs() {
    assert!(replay("manifest", checks::manifest) > 0);
}

#[test]
fn index_decode_inputs() {
    assert!(replay("index_decode", checks::index_decode) > 0);
}
