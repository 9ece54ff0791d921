//! The JSON documents of the `v1/` read API (seed 000), written as static
//! files by the publisher and read back by clients and `verify`.
//!
//! Field order is the struct order, so the bytes are deterministic. Optional
//! fields are omitted when absent rather than written as `null`.

use serde::{Deserialize, Serialize};

/// `GET /v1/packages`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageList {
    pub packages: Vec<PackageSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageSummary {
    pub name: String,
    /// Every version, oldest first.
    pub versions: Vec<String>,
    /// Highest version that is not a pre-release (or the highest of all when
    /// every version is a pre-release).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `GET /v1/packages/{name}/versions`: one entry per (version, arch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionList {
    pub name: String,
    pub versions: Vec<VersionEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionEntry {
    pub version: String,
    pub arch: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the archive.
    pub sha256: String,
    /// RFC 3339, UTC, whole seconds.
    pub uploaded_at: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
}

/// `GET /v1/packages/{name}/{version}/manifest`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub package: ManifestPackage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binary: Option<ManifestBinary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolation: Option<ManifestIsolation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestPackage {
    pub name: String,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestBinary {
    pub entrypoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestIsolation {
    pub preset: String,
}

/// `GET /v1/packages/{name}/tags`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagList {
    pub tags: Vec<TagEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagEntry {
    pub tag: String,
    pub version: String,
}

/// Serializes a document the way every `v1/` file is written: compact JSON
/// and a final newline.
pub fn to_bytes<T: Serialize>(doc: &T) -> Vec<u8> {
    // These types serialize infallibly: no maps with non-string keys.
    let mut out = serde_json::to_vec(doc).expect("v1 documents always serialize");
    out.push(b'\n');
    out
}

/// Formats Unix seconds as RFC 3339 UTC (`2026-04-10T12:00:00Z`).
pub fn rfc3339(unix: i64) -> String {
    let t =
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    t.format(&f)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_match_the_seed_shapes() {
        let list = PackageList {
            packages: vec![PackageSummary {
                name: "my-app".into(),
                versions: vec!["1.0.0".into(), "1.1.0".into()],
                latest: Some("1.1.0".into()),
                description: Some("My application".into()),
            }],
        };
        assert_eq!(
            String::from_utf8(to_bytes(&list)).unwrap(),
            "{\"packages\":[{\"name\":\"my-app\",\"versions\":[\"1.0.0\",\"1.1.0\"],\"latest\":\"1.1.0\",\"description\":\"My application\"}]}\n"
        );
        let manifest = Manifest {
            package: ManifestPackage {
                name: "my-app".into(),
                version: "1.1.0".into(),
                description: None,
            },
            binary: Some(ManifestBinary {
                entrypoint: "my-app".into(),
            }),
            isolation: Some(ManifestIsolation {
                preset: "server".into(),
            }),
        };
        assert_eq!(
            String::from_utf8(to_bytes(&manifest)).unwrap(),
            "{\"package\":{\"name\":\"my-app\",\"version\":\"1.1.0\"},\"binary\":{\"entrypoint\":\"my-app\"},\"isolation\":{\"preset\":\"server\"}}\n"
        );
    }

    #[test]
    fn rfc3339_is_utc_whole_seconds() {
        assert_eq!(rfc3339(1_775_822_400), "2026-04-10T12:00:00Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
