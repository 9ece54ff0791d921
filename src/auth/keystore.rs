//! API keys in SQLite (`D/keys.sqlite`, outside the served tree).
//!
//! A key is `niso_k1_` followed by 32 random base62 characters (about 190
//! bits). Only its SHA-256 is stored; the plaintext exists in the create
//! response and nowhere else. Lookups go by hash, so the database never
//! compares secrets, and the final check compares hashes in constant time.
//!
//! NEVER CHANGE THE PREFIX OF EXISTING KEYS: clients and secret scanners
//! recognise keys by it.

use std::path::Path;
use std::sync::Mutex;

use rand::Rng;
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::scope::{ScopeError, Scopes};

pub const KEY_PREFIX: &str = "niso_k1_";
const KEY_RANDOM_LEN: usize = 32;
const ID_RANDOM_LEN: usize = 12;
/// `last_used` is written at most this often per key: a write per request
/// would make every authenticated request pay for an fsync.
const LAST_USED_GRANULARITY: i64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("key database {path}: {source}")]
    Db {
        path: String,
        source: rusqlite::Error,
    },
    #[error(transparent)]
    Scope(#[from] ScopeError),
    #[error("invalid key name {0:?}: use 1 to 64 printable characters")]
    Name(String),
    #[error("no key with id {0}")]
    NotFound(String),
    #[error("{0} is not a niso API key (expected niso_k1_ and 32 letters or digits)")]
    Malformed(String),
    #[error("invalid publisher key: {0}")]
    PublisherKey(String),
}

/// A plaintext API key. `Debug` never shows it.
#[derive(Clone)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(niso_k1_…)")
    }
}

impl ApiKey {
    pub fn parse(text: &str) -> Result<Self, KeyStoreError> {
        let ok = text.len() == KEY_PREFIX.len() + KEY_RANDOM_LEN
            && text.starts_with(KEY_PREFIX)
            && text[KEY_PREFIX.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric());
        if ok {
            Ok(Self(text.to_string()))
        } else {
            // Never echo what might be a secret: show only its start.
            let shown: String = text.chars().take(8).collect();
            Err(KeyStoreError::Malformed(format!("{shown}…")))
        }
    }

    fn generate() -> Self {
        Self(format!("{KEY_PREFIX}{}", random_base62(KEY_RANDOM_LEN)))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

fn random_base62(n: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rngs::OsRng;
    (0..n)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A stored key, without its secret.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub scopes: Scopes,
    pub created_at: i64,
    pub last_used: Option<i64>,
    /// Ed25519 public key of the publisher who uploads with this key.
    pub publisher_key: Option<[u8; 32]>,
}

impl KeyRecord {
    /// Id of the publisher key, as stored in indexes: `ed25519:` + the first
    /// 16 hex digits of its SHA-256.
    pub fn publisher_key_id(&self) -> Option<String> {
        self.publisher_key
            .map(|k| format!("ed25519:{}", &hex::encode(Sha256::digest(k))[..16]))
    }
}

/// A key just made: the only time its plaintext is available.
#[derive(Debug)]
pub struct NewKey {
    pub record: KeyRecord,
    pub key: ApiKey,
}

pub struct KeyStore {
    conn: Mutex<Connection>,
    path: String,
}

impl KeyStore {
    pub fn open(path: &Path) -> Result<Self, KeyStoreError> {
        let display = path.display().to_string();
        let db = |source| KeyStoreError::Db {
            path: display.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        restrict_permissions(path);
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS api_keys (
                 id TEXT PRIMARY KEY,
                 name TEXT NOT NULL,
                 hash BLOB NOT NULL UNIQUE,
                 scopes TEXT NOT NULL,
                 created_at INTEGER NOT NULL,
                 last_used INTEGER,
                 revoked_at INTEGER,
                 publisher_key BLOB
             );",
        )
        .map_err(db)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: display,
        })
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> KeyStoreError + '_ {
        |source| KeyStoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes a key. `key` lets a script choose the bootstrap admin key.
    pub fn create(
        &self,
        name: &str,
        scopes: &Scopes,
        now: i64,
        key: Option<ApiKey>,
    ) -> Result<NewKey, KeyStoreError> {
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(KeyStoreError::Name(name.to_string()));
        }
        let key = key.unwrap_or_else(ApiKey::generate);
        let id = format!("key_{}", random_base62(ID_RANDOM_LEN));
        let scope_text = scopes.to_strings().join(" ");
        self.conn()
            .execute(
                "INSERT INTO api_keys (id, name, hash, scopes, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, name, key.hash().as_slice(), scope_text, now],
            )
            .map_err(self.db())?;
        Ok(NewKey {
            record: KeyRecord {
                id,
                name: name.to_string(),
                scopes: scopes.clone(),
                created_at: now,
                last_used: None,
                publisher_key: None,
            },
            key,
        })
    }

    /// The live (not revoked) key with this plaintext, recording its use.
    pub fn authenticate(&self, key: &ApiKey, now: i64) -> Result<Option<KeyRecord>, KeyStoreError> {
        let hash = key.hash();
        let conn = self.conn();
        // Every request runs this: the statement is compiled once and kept.
        let row = conn
            .prepare_cached(
                "SELECT id, name, hash, scopes, created_at, last_used, publisher_key
                 FROM api_keys WHERE hash = ?1 AND revoked_at IS NULL",
            )
            .map_err(self.db())?
            .query_row(params![hash.as_slice()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<Vec<u8>>>(6)?,
                ))
            })
            .optional()
            .map_err(self.db())?;
        let Some((id, name, stored, scopes, created_at, last_used, publisher_key)) = row else {
            return Ok(None);
        };
        if !bool::from(stored.as_slice().ct_eq(hash.as_slice())) {
            return Ok(None);
        }
        if last_used.is_none_or(|t| now - t >= LAST_USED_GRANULARITY) {
            conn.execute(
                "UPDATE api_keys SET last_used = ?1 WHERE id = ?2",
                params![now, id],
            )
            .map_err(self.db())?;
        }
        let scopes: Vec<&str> = scopes.split_whitespace().collect();
        Ok(Some(KeyRecord {
            id,
            name,
            scopes: Scopes::parse_stored(&scopes),
            created_at,
            last_used: Some(now),
            publisher_key: publisher_key.and_then(|k| <[u8; 32]>::try_from(k).ok()),
        }))
    }

    /// Every live key, oldest first.
    pub fn list(&self) -> Result<Vec<KeyRecord>, KeyStoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, name, scopes, created_at, last_used, publisher_key FROM api_keys
                 WHERE revoked_at IS NULL ORDER BY created_at, rowid",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<Vec<u8>>>(5)?,
                ))
            })
            .map_err(self.db())?;
        let mut out = Vec::new();
        for row in rows {
            let (id, name, scopes, created_at, last_used, publisher_key) =
                row.map_err(self.db())?;
            let scopes: Vec<&str> = scopes.split_whitespace().collect();
            out.push(KeyRecord {
                id,
                name,
                scopes: Scopes::parse_stored(&scopes),
                created_at,
                last_used,
                publisher_key: publisher_key.and_then(|k| <[u8; 32]>::try_from(k).ok()),
            });
        }
        Ok(out)
    }

    /// Revokes a key; the next request with it is refused.
    pub fn revoke(&self, id: &str, now: i64) -> Result<(), KeyStoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE api_keys SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL",
                params![now, id],
            )
            .map_err(self.db())?;
        if n == 0 {
            return Err(KeyStoreError::NotFound(id.to_string()));
        }
        Ok(())
    }

    /// Registers (or replaces) the Ed25519 publisher key of an API key.
    pub fn set_publisher_key(&self, id: &str, public: &[u8]) -> Result<(), KeyStoreError> {
        let bytes: [u8; 32] = public
            .try_into()
            .map_err(|_| KeyStoreError::PublisherKey("an Ed25519 public key is 32 bytes".into()))?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|e| KeyStoreError::PublisherKey(e.to_string()))?;
        let n = self
            .conn()
            .execute(
                "UPDATE api_keys SET publisher_key = ?1 WHERE id = ?2 AND revoked_at IS NULL",
                params![bytes.as_slice(), id],
            )
            .map_err(self.db())?;
        if n == 0 {
            return Err(KeyStoreError::NotFound(id.to_string()));
        }
        Ok(())
    }

    /// Whether any key exists (a fresh store needs a bootstrap admin key).
    pub fn is_empty(&self) -> Result<bool, KeyStoreError> {
        let n: i64 = self
            .conn()
            .query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))
            .map_err(self.db())?;
        Ok(n == 0)
    }
}

fn restrict_permissions(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Hashes only, but still nobody else's business.
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, KeyStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = KeyStore::open(&dir.path().join("keys.sqlite")).unwrap();
        (dir, s)
    }

    #[test]
    fn keys_are_shown_once_stored_hashed_and_revocable() {
        let (dir, s) = store();
        assert!(s.is_empty().unwrap());
        let scopes = Scopes::parse(&["push:my-*"]).unwrap();
        let new = s.create("ci-deploy", &scopes, 100, None).unwrap();
        assert!(new.key.expose().starts_with("niso_k1_"));
        assert_eq!(new.key.expose().len(), 40);
        assert!(!format!("{:?}", new.key).contains(&new.key.expose()[8..]));
        let found = s.authenticate(&new.key, 200).unwrap().unwrap();
        assert_eq!(found.id, new.record.id);
        assert_eq!(found.scopes, scopes);
        // The plaintext is nowhere in the database file.
        let raw = std::fs::read(dir.path().join("keys.sqlite")).unwrap();
        let wal = std::fs::read(dir.path().join("keys.sqlite-wal")).unwrap_or_default();
        let needle = new.key.expose().as_bytes();
        assert!(!raw.windows(needle.len()).any(|w| w == needle));
        assert!(!wal.windows(needle.len()).any(|w| w == needle));
        let listed = s.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].last_used, Some(200));
        s.revoke(&new.record.id, 300).unwrap();
        assert!(s.authenticate(&new.key, 301).unwrap().is_none());
        assert!(s.list().unwrap().is_empty());
        assert!(matches!(
            s.revoke(&new.record.id, 302),
            Err(KeyStoreError::NotFound(_))
        ));
    }

    #[test]
    fn unknown_and_malformed_keys() {
        let (_dir, s) = store();
        let other = ApiKey::parse(&format!("niso_k1_{}", "a".repeat(32))).unwrap();
        assert!(s.authenticate(&other, 1).unwrap().is_none());
        for bad in [
            "",
            "niso_k1_short",
            "niso_k2_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            &format!("niso_k1_{}!", "a".repeat(31)),
        ] {
            let e = ApiKey::parse(bad).unwrap_err().to_string();
            assert!(
                !e.contains("aaaaaaaaaaaa"),
                "the message must not echo the secret: {e}"
            );
        }
    }

    #[test]
    fn publisher_keys_are_checked() {
        let (_dir, s) = store();
        let new = s
            .create("k", &Scopes::parse(&["push"]).unwrap(), 1, None)
            .unwrap();
        assert!(s.set_publisher_key(&new.record.id, &[1; 31]).is_err());
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        s.set_publisher_key(&new.record.id, sk.verifying_key().as_bytes())
            .unwrap();
        let rec = s.authenticate(&new.key, 2).unwrap().unwrap();
        assert_eq!(rec.publisher_key, Some(*sk.verifying_key().as_bytes()));
        assert!(rec.publisher_key_id().unwrap().starts_with("ed25519:"));
    }

    #[test]
    fn last_used_is_written_at_most_once_a_minute() {
        let (_dir, s) = store();
        let new = s
            .create("k", &Scopes::parse(&["push"]).unwrap(), 1, None)
            .unwrap();
        s.authenticate(&new.key, 100).unwrap();
        s.authenticate(&new.key, 130).unwrap();
        assert_eq!(s.list().unwrap()[0].last_used, Some(100));
        s.authenticate(&new.key, 161).unwrap();
        assert_eq!(s.list().unwrap()[0].last_used, Some(161));
    }
}
