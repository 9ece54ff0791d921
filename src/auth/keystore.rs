//! API keys in SQLite (`D/keys.sqlite`, outside the served tree).
//!
//! A key is `niso_k1_` followed by 32 random base62 characters (about 190
//! bits). Only its SHA-256 is stored; the plaintext exists in the create
//! response and nowhere else. Lookups go by hash, so the database never
//! compares secrets, and the final check compares hashes in constant time.
//!
//! NEVER CHANGE THE PREFIX OF EXISTING KEYS: clients and secret scanners
//! recognise keys by it.
//!
//! Two rules keep a registry manageable: the last live admin key cannot be
//! revoked ([`KeyStoreError::LastAdmin`]), and anyone who can write the data
//! directory can add a key without a server ([`KeyStore::create`] on
//! [`crate::datadir::DataDir::key_store`]), which is the way back in when
//! every admin key is lost.
//!
//! Publisher keys (Ed25519) are attached to API keys by an admin. Every one
//! ever registered stays in `publisher_keys`, with when it was retired
//! (replaced, or its API key revoked): archives signed with it stay in the
//! index, and a client needs the public key to check them.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::scope::{ScopeError, Scopes};

pub const KEY_PREFIX: &str = "niso_k1_";
const KEY_RANDOM_LEN: usize = 32;
const ID_RANDOM_LEN: usize = 12;
/// `last_used` is written at most this often per key: a write per request
/// would make every authenticated request pay for an fsync.
const LAST_USED_GRANULARITY: i64 = 60;
/// How long a write waits for another process holding the database (an
/// offline `create-key` beside a running server) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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
    #[error("{0} is the only admin key: create another admin key before revoking it, or nobody could manage keys any more")]
    LastAdmin(String),
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
    /// Id of the publisher key, as stored in indexes today
    /// ([`publisher_key_id`]).
    pub fn publisher_key_id(&self) -> Option<String> {
        self.publisher_key.as_ref().map(publisher_key_id)
    }
}

/// The id the index stores for a publisher key: its full fingerprint
/// ([`publisher_key_fingerprint`]), which binds the key (a 64-bit prefix,
/// as indexes written before held, does not).
pub fn publisher_key_id(public_key: &[u8; 32]) -> String {
    publisher_key_fingerprint(public_key)
}

/// The full fingerprint of a publisher key: `ed25519:` + the 64 hex digits
/// of the SHA-256 of the public key.
pub fn publisher_key_fingerprint(public_key: &[u8; 32]) -> String {
    format!("ed25519:{}", hex::encode(Sha256::digest(public_key)))
}

/// A publisher key registered for an API key, now or in the past.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherKeyRecord {
    /// The API key it checks uploads of.
    pub api_key_id: String,
    /// That API key's name.
    pub api_key_name: String,
    /// The Ed25519 public key.
    pub public_key: [u8; 32],
    pub registered_at: i64,
    /// When it stopped being the key's publisher key: replaced, or the API
    /// key revoked. Signatures made before then were checked by the server.
    pub retired_at: Option<i64>,
}

impl PublisherKeyRecord {
    /// As the signed tree lists it (`publisher-keys`).
    pub fn to_index(&self) -> crate::index::pb::PublisherKey {
        crate::index::pb::PublisherKey {
            id: self.fingerprint(),
            public_key: self.public_key.to_vec(),
            registered_at: self.registered_at,
            retired_at: self.retired_at,
        }
    }

    /// What the index stores as `publisher_key_id` ([`publisher_key_id`]).
    pub fn index_key_id(&self) -> String {
        publisher_key_id(&self.public_key)
    }

    /// The full SHA-256 fingerprint ([`publisher_key_fingerprint`]).
    pub fn fingerprint(&self) -> String {
        publisher_key_fingerprint(&self.public_key)
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
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
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
             );
             CREATE TABLE IF NOT EXISTS publisher_keys (
                 api_key_id TEXT NOT NULL REFERENCES api_keys(id),
                 public_key BLOB NOT NULL,
                 registered_at INTEGER NOT NULL,
                 retired_at INTEGER
             );
             -- Databases made before publisher_keys existed: their current
             -- publisher keys, registered (as far as we know) with the key.
             INSERT INTO publisher_keys (api_key_id, public_key, registered_at, retired_at)
                 SELECT a.id, a.publisher_key, a.created_at, a.revoked_at FROM api_keys a
                 WHERE a.publisher_key IS NOT NULL AND NOT EXISTS (
                     SELECT 1 FROM publisher_keys p
                     WHERE p.api_key_id = a.id AND p.public_key = a.publisher_key);",
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
        self.lookup(key, Some(now))
    }

    /// The live key with this plaintext, without recording a use (a start-up
    /// check of `NISO_ADMIN_KEY`, say).
    pub fn find(&self, key: &ApiKey) -> Result<Option<KeyRecord>, KeyStoreError> {
        self.lookup(key, None)
    }

    fn lookup(
        &self,
        key: &ApiKey,
        used_at: Option<i64>,
    ) -> Result<Option<KeyRecord>, KeyStoreError> {
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
        let Some((id, name, stored, scopes, created_at, mut last_used, publisher_key)) = row else {
            return Ok(None);
        };
        if !bool::from(stored.as_slice().ct_eq(hash.as_slice())) {
            return Ok(None);
        }
        if let Some(now) = used_at {
            if last_used.is_none_or(|t| now - t >= LAST_USED_GRANULARITY) {
                conn.execute(
                    "UPDATE api_keys SET last_used = ?1 WHERE id = ?2",
                    params![now, id],
                )
                .map_err(self.db())?;
            }
            last_used = Some(now);
        }
        Ok(Some(KeyRecord {
            id,
            name,
            scopes: parse_scopes(&scopes)?,
            created_at,
            last_used,
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
            out.push(KeyRecord {
                id,
                name,
                scopes: parse_scopes(&scopes)?,
                created_at,
                last_used,
                publisher_key: publisher_key.and_then(|k| <[u8; 32]>::try_from(k).ok()),
            });
        }
        Ok(out)
    }

    /// Revokes a key; the next request with it is refused, and its publisher
    /// key is retired. The last live admin key is never revoked
    /// ([`KeyStoreError::LastAdmin`]): make another one first.
    pub fn revoke(&self, id: &str, now: i64) -> Result<(), KeyStoreError> {
        let mut conn = self.conn();
        // IMMEDIATE: the count of admins and the revocation are one step,
        // also against another process writing the same database.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.db())?;
        let scopes: Option<String> = tx
            .query_row(
                "SELECT scopes FROM api_keys WHERE id = ?1 AND revoked_at IS NULL",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())?;
        let Some(scopes) = scopes else {
            return Err(KeyStoreError::NotFound(id.to_string()));
        };
        if parse_scopes(&scopes)?.is_admin() && live_admins(&tx).map_err(self.db())? <= 1 {
            return Err(KeyStoreError::LastAdmin(id.to_string()));
        }
        tx.execute(
            "UPDATE api_keys SET revoked_at = ?1 WHERE id = ?2",
            params![now, id],
        )
        .map_err(self.db())?;
        tx.execute(
            "UPDATE publisher_keys SET retired_at = ?1 WHERE api_key_id = ?2 AND retired_at IS NULL",
            params![now, id],
        )
        .map_err(self.db())?;
        tx.commit().map_err(self.db())
    }

    /// Registers (or replaces) the Ed25519 publisher key of a live API key.
    /// A replaced key is retired, not forgotten. Registering the key it
    /// already has changes nothing.
    pub fn set_publisher_key(
        &self,
        id: &str,
        public: &[u8],
        now: i64,
    ) -> Result<(), KeyStoreError> {
        let bytes: [u8; 32] = public
            .try_into()
            .map_err(|_| KeyStoreError::PublisherKey("an Ed25519 public key is 32 bytes".into()))?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|e| KeyStoreError::PublisherKey(e.to_string()))?;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.db())?;
        let current: Option<Option<Vec<u8>>> = tx
            .query_row(
                "SELECT publisher_key FROM api_keys WHERE id = ?1 AND revoked_at IS NULL",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())?;
        let Some(current) = current else {
            return Err(KeyStoreError::NotFound(id.to_string()));
        };
        if current.as_deref() == Some(bytes.as_slice()) {
            return Ok(());
        }
        tx.execute(
            "UPDATE publisher_keys SET retired_at = ?1 WHERE api_key_id = ?2 AND retired_at IS NULL",
            params![now, id],
        )
        .map_err(self.db())?;
        tx.execute(
            "INSERT INTO publisher_keys (api_key_id, public_key, registered_at) VALUES (?1, ?2, ?3)",
            params![id, bytes.as_slice(), now],
        )
        .map_err(self.db())?;
        tx.execute(
            "UPDATE api_keys SET publisher_key = ?1 WHERE id = ?2",
            params![bytes.as_slice(), id],
        )
        .map_err(self.db())?;
        tx.commit().map_err(self.db())
    }

    /// Every publisher key ever registered, current and retired, oldest
    /// first: what the publisher writes into the signed tree so clients can
    /// check `X-Niso-Signature`s offline, old releases' included.
    pub fn publisher_keys(&self) -> Result<Vec<PublisherKeyRecord>, KeyStoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT p.api_key_id, a.name, p.public_key, p.registered_at, p.retired_at
                 FROM publisher_keys p JOIN api_keys a ON a.id = p.api_key_id
                 ORDER BY p.registered_at, p.rowid",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                ))
            })
            .map_err(self.db())?;
        let mut out = Vec::new();
        for row in rows {
            let (api_key_id, api_key_name, public_key, registered_at, retired_at) =
                row.map_err(self.db())?;
            // Only 32-byte keys are ever written (set_publisher_key checks).
            let public_key = <[u8; 32]>::try_from(public_key).map_err(|_| {
                KeyStoreError::PublisherKey(format!(
                    "the stored publisher key of {api_key_id} is not 32 bytes"
                ))
            })?;
            out.push(PublisherKeyRecord {
                api_key_id,
                api_key_name,
                public_key,
                registered_at,
                retired_at,
            });
        }
        Ok(out)
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

/// Scopes as stored; one that today's rules refuse (`**`, stored before
/// they did) is kept disabled: listed, revocable, allowing nothing.
fn parse_scopes(text: &str) -> Result<Scopes, KeyStoreError> {
    let scopes: Vec<&str> = text.split_whitespace().collect();
    Ok(Scopes::parse_stored(&scopes))
}

/// Live keys with the admin scope.
fn live_admins(conn: &Connection) -> Result<usize, rusqlite::Error> {
    let mut stmt = conn.prepare("SELECT scopes FROM api_keys WHERE revoked_at IS NULL")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut n = 0;
    for scopes in rows {
        // A row that does not parse is not an admin anyone can use.
        if parse_scopes(&scopes?).is_ok_and(|s| s.is_admin()) {
            n += 1;
        }
    }
    Ok(n)
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
        assert!(s.set_publisher_key(&new.record.id, &[1; 31], 2).is_err());
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        s.set_publisher_key(&new.record.id, sk.verifying_key().as_bytes(), 2)
            .unwrap();
        let rec = s.authenticate(&new.key, 2).unwrap().unwrap();
        assert_eq!(rec.publisher_key, Some(*sk.verifying_key().as_bytes()));
        assert!(rec.publisher_key_id().unwrap().starts_with("ed25519:"));
        assert!(matches!(
            s.set_publisher_key("key_nope", sk.verifying_key().as_bytes(), 3),
            Err(KeyStoreError::NotFound(_))
        ));
    }

    #[test]
    fn every_publisher_key_ever_registered_is_listed_with_its_retirement() {
        let (_dir, s) = store();
        let _admin = s
            .create("admin", &Scopes::parse(&["admin"]).unwrap(), 1, None)
            .unwrap();
        let ci = s
            .create("ci", &Scopes::parse(&["push"]).unwrap(), 1, None)
            .unwrap();
        let first = *ed25519_dalek::SigningKey::from_bytes(&[1; 32])
            .verifying_key()
            .as_bytes();
        let second = *ed25519_dalek::SigningKey::from_bytes(&[2; 32])
            .verifying_key()
            .as_bytes();
        assert!(s.publisher_keys().unwrap().is_empty());
        s.set_publisher_key(&ci.record.id, &first, 10).unwrap();
        // The same key again is no change.
        s.set_publisher_key(&ci.record.id, &first, 11).unwrap();
        s.set_publisher_key(&ci.record.id, &second, 20).unwrap();
        let listed = s.publisher_keys().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].public_key, first);
        assert_eq!(listed[0].api_key_id, ci.record.id);
        assert_eq!(listed[0].api_key_name, "ci");
        assert_eq!(
            (listed[0].registered_at, listed[0].retired_at),
            (10, Some(20))
        );
        assert_eq!(listed[1].public_key, second);
        assert_eq!((listed[1].registered_at, listed[1].retired_at), (20, None));
        // What the index stores: the full fingerprint, which binds the key.
        let id = listed[1].index_key_id();
        assert_eq!(id.len(), "ed25519:".len() + 64);
        assert_eq!(listed[1].fingerprint(), id);
        assert_eq!(
            s.authenticate(&ci.key, 21)
                .unwrap()
                .unwrap()
                .publisher_key_id(),
            Some(id)
        );
        // Revoking the API key retires its publisher key but keeps it listed.
        s.revoke(&ci.record.id, 30).unwrap();
        let listed = s.publisher_keys().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[1].retired_at, Some(30));
        assert!(matches!(
            s.set_publisher_key(&ci.record.id, &first, 31),
            Err(KeyStoreError::NotFound(_))
        ));
    }

    #[test]
    fn the_last_admin_key_cannot_be_revoked() {
        let (dir, s) = store();
        let admin = ["admin"];
        let a = s
            .create("a", &Scopes::parse(&admin).unwrap(), 1, None)
            .unwrap();
        let pusher = s
            .create("p", &Scopes::parse(&["push"]).unwrap(), 1, None)
            .unwrap();
        let e = s.revoke(&a.record.id, 2).unwrap_err();
        assert!(matches!(e, KeyStoreError::LastAdmin(_)), "{e}");
        assert!(e.to_string().contains("only admin key"), "{e}");
        assert!(s.authenticate(&a.key, 3).unwrap().is_some(), "still live");
        // Non-admin keys go as before.
        s.revoke(&pusher.record.id, 4).unwrap();
        // The way back needs only the data directory: a second store on the
        // same file (another process) adds an admin, then the first can go.
        let offline = KeyStore::open(&dir.path().join("keys.sqlite")).unwrap();
        let b = offline
            .create("b", &Scopes::parse(&admin).unwrap(), 5, None)
            .unwrap();
        assert!(s.authenticate(&b.key, 6).unwrap().is_some());
        s.revoke(&a.record.id, 7).unwrap();
        assert!(matches!(
            s.revoke(&b.record.id, 8),
            Err(KeyStoreError::LastAdmin(_))
        ));
    }

    #[test]
    fn find_does_not_record_a_use() {
        let (_dir, s) = store();
        let new = s
            .create("k", &Scopes::parse(&["push"]).unwrap(), 1, None)
            .unwrap();
        assert_eq!(s.find(&new.key).unwrap().unwrap().id, new.record.id);
        assert_eq!(s.list().unwrap()[0].last_used, None);
    }

    #[test]
    fn publisher_keys_of_an_older_database_are_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.sqlite");
        let public = *ed25519_dalek::SigningKey::from_bytes(&[3; 32])
            .verifying_key()
            .as_bytes();
        {
            // The schema before publisher_keys existed.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL,
                 hash BLOB NOT NULL UNIQUE, scopes TEXT NOT NULL, created_at INTEGER NOT NULL,
                 last_used INTEGER, revoked_at INTEGER, publisher_key BLOB);",
            )
            .unwrap();
            conn.execute(
                "INSERT INTO api_keys VALUES ('key_a', 'ci', x'00', 'push:*', 5, NULL, NULL, ?1)",
                params![public.as_slice()],
            )
            .unwrap();
        }
        for _ in 0..2 {
            let s = KeyStore::open(&path).unwrap();
            let listed = s.publisher_keys().unwrap();
            assert_eq!(listed.len(), 1, "carried over once");
            assert_eq!(listed[0].public_key, public);
            assert_eq!((listed[0].registered_at, listed[0].retired_at), (5, None));
        }
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
