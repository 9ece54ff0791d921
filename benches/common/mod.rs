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
