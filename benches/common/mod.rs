//! What both benchmarks build their trees from: small but valid `.niso`
//! archives, made in memory.

/// The arch of every benchmark archive.
pub const ARCH: &str = "x86_64";

/// A valid `.niso` of NAME VERSION (the layout of `src/archive/niso.rs`: a
/// gzip tar of `niso.toml`, `payload/`, `payload/bin/` and the entrypoint
/// `payload/bin/app`), whose entrypoint is `payload` bytes that do not
/// compress away and differ per release.
pub fn niso_archive(name: &str, version: &str, payload: usize) -> Vec<u8> {
    let manifest = format!(
        "[package]\nname = \"{name}\"\nversion = \"{version}\"\narch = \"{ARCH}\"\n\
         description = \"Benchmark package {name}\"\n\n[binary]\nentrypoint = \"bin/app\"\n"
    );
    let mut data = vec![0u8; payload];
    SplitMix(seed(name, version)).fill(&mut data);
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(
            Vec::with_capacity(payload + 2048),
            flate2::Compression::fast(),
        );
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    let entries: [(&str, &[u8], u32, tar::EntryType); 4] = [
        (
            "niso.toml",
            manifest.as_bytes(),
            0o644,
            tar::EntryType::Regular,
        ),
        ("payload/", b"", 0o755, tar::EntryType::Directory),
        ("payload/bin/", b"", 0o755, tar::EntryType::Directory),
        ("payload/bin/app", &data, 0o755, tar::EntryType::Regular),
    ];
    for (path, bytes, mode, kind) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(kind);
        h.set_mtime(0);
        tar.append_data(&mut h, path, bytes)
            .expect("writing to memory");
    }
    tar.into_inner()
        .and_then(|gz| gz.finish())
        .expect("writing to memory")
}

/// FNV-1a of NAME and VERSION.
fn seed(name: &str, version: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes().chain([0]).chain(version.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// SplitMix64: fast bytes that do not compress.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            let v = (z ^ (z >> 31)).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

// ---------------------------------------------------------------------------
// The machine, for the reports.

/// `uname -m`.
pub fn uname_m() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return std::env::consts::ARCH.into();
    }
    // SAFETY: uname NUL-terminates the field.
    unsafe { std::ffi::CStr::from_ptr(u.machine.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The CPU's model name from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The first `fields` load averages (1, 5 and 15 minutes).
pub fn loadavg(fields: usize) -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| {
            s.split_whitespace()
                .take(fields)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "?".into())
}

/// One `syncfs(2)` on the file system holding `dir`, so generated files are
/// on disk before anything is measured.
pub fn syncfs(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir)?;
    // SAFETY: syncfs only uses the descriptor, which `d` keeps open.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("syncfs {}: {e}", dir.display()),
        ));
    }
    Ok(())
}

/// Nearest-rank percentile of unsorted samples.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}
