//! The write path under crashes and failures, through the built binary
//! (issue 17, item 8):
//!
//! * **kill -9**: concurrent uploaders against `niso registry serve`, the
//!   server SIGKILLed after a random delay (seeded; the seed is printed),
//!   sometimes killed again during the start-up that follows, then restarted
//!   on the same data directory. Then the tree verifies, every upload that
//!   got a 2xx is there byte for byte, every upload that was cut off succeeds
//!   when sent again, and no temp or staged file is left.
//!   `NISO_CRASH_TRIALS` sets the number of trials (default 20; the longer
//!   run is `scripts/reliability`), `NISO_CRASH_SEED` replays a run.
//! * **clients that hang up** (after the whole body, or half way through it)
//!   beside honest ones.
//! * **a write that fails** (a directory of the tree replaced by a file for
//!   a moment): a 503 that says to try again, and the server mends the tree
//!   by itself on the next change.
//! * **an expired freshness record**: `verify` refuses it, `build` re-signs
//!   it.
//!
//! The HTTP client here is a raw socket, so a test can hang up exactly where
//! it wants and tell "no answer" from an answer.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use niso::index::{decode_index, pb, PublicKey};
use niso::limits::Limits;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::Digest;

/// Longest wait for a server to listen (it recovers the tree first) and for
/// any one answer. Generous: CI machines are small and loaded, and a wait
/// that runs out is reported, not retried.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// What the servers log: warnings, and what recovery finishes (counted).
const LOG_FILTER: &str = "warn,niso::publish=info,niso::server=info,niso::server::middleware=warn";

// ---------------------------------------------------------------------
// A server process

struct Serve {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
    /// From the spawn to "Listening at".
    took: Duration,
}

/// Starts `niso registry serve` on `dd`: the child, its address once it
/// listens, and its stderr as it comes.
fn spawn_serve(dd: &Path) -> (Child, mpsc::Receiver<String>, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_niso"))
        .args([
            "registry",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "acme",
        ])
        // Uploads come as fast as the server takes them.
        .args(["--rate-limit-key", "0", "--rate-limit-ip", "0"])
        .arg("--data-dir")
        .arg(dd)
        .env("NISO_ADMIN_KEY", ADMIN_KEY)
        .env("NISO_LOG", LOG_FILTER)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start niso registry serve");
    let stderr = child.stderr.take().expect("piped stderr");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(a) = line.strip_prefix("Listening at http://") {
                let _ = tx.send(a.trim().to_string());
            }
            lines.lock().unwrap().push(line);
        }
    });
    (child, rx, log)
}

impl Serve {
    fn start(dd: &Path) -> Result<Serve, String> {
        let started = Instant::now();
        let (mut child, rx, log) = spawn_serve(dd);
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => Ok(Serve {
                child,
                addr,
                log,
                took: started.elapsed(),
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "the server did not start ({e}):\n{}",
                    tail(&log, 40)
                ))
            }
        }
    }

    /// SIGKILL, and reap it (so its PID is gone: leftovers are judged by
    /// whether their writer's PID is alive).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Lines of its stderr that contain `what`.
    fn count(&self, what: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(what))
            .count()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(log: &Mutex<Vec<String>>, n: usize) -> String {
    let log = log.lock().unwrap();
    log[log.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------
// HTTP over a raw socket

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How a client leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// Reads the answer.
    Honest,
    /// Sends the whole request, waits this long, then closes without
    /// reading the answer (a wait lets the server get further with it).
    AfterBody(Duration),
    /// Sends half the body, then closes.
    MidBody,
}

/// One request on a new connection. `Err`: no complete answer (refused,
/// reset, closed early, timed out, or the client left).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    leave: Leave,
) -> Result<Resp, String> {
    let sock: SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("socket: {e}"))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let sent = match leave {
        Leave::MidBody => &body[..body.len() / 2],
        _ => body,
    };
    s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(sent))
        .map_err(|e| format!("send: {e}"))?;
    if leave != Leave::Honest {
        if let Leave::AfterBody(wait) = leave {
            std::thread::sleep(wait);
        }
        let _ = s.shutdown(Shutdown::Both);
        return Err("the client hung up".into());
    }
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    parse(&raw).map_err(|e| match read {
        Err(r) => format!("{e} ({r})"),
        Ok(_) => e,
    })
}

fn parse(raw: &[u8]) -> Result<Resp, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no answer ({} bytes)", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if let Some(n) = get("content-length") {
        let n: usize = n.parse().map_err(|_| format!("content-length {n:?}"))?;
        if rest.len() < n {
            return Err(format!("answer cut after {} of {n} bytes", rest.len()));
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Resp {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("answer cut in a chunk header")?;
        let line = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {line:?}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err("answer cut in a chunk".into());
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn get(addr: &str, path: &str) -> Result<Resp, String> {
    request(addr, "GET", path, b"", Leave::Honest)
}

// ---------------------------------------------------------------------
// Uploads

/// One archive a client sends.
#[derive(Clone)]
struct Planned {
    name: String,
    version: String,
    /// `any` for a Hex tarball.
    arch: String,
    bytes: Arc<Vec<u8>>,
}

impl Planned {
    fn url(&self) -> String {
        format!("/v1/packages/{}/{}/{}", self.name, self.version, self.arch)
    }

    fn sha256(&self) -> [u8; 32] {
        sha2::Sha256::digest(self.bytes.as_slice()).into()
    }

    fn key(&self) -> (String, String, String) {
        (self.name.clone(), self.version.clone(), self.arch.clone())
    }

    fn label(&self) -> String {
        format!(
            "{} {} ({}, sha256 {}…)",
            self.name,
            self.version,
            self.arch,
            &hex::encode(self.sha256())[..12]
        )
    }

    fn hex(name: &str, version: &str) -> Self {
        Planned {
            name: name.into(),
            version: version.into(),
            arch: "any".into(),
            bytes: Arc::new(hex_tarball(name, version)),
        }
    }

    /// A `.niso` archive made the way `niso package` makes one, in
    /// `scratch` (the caller's own directory).
    fn niso(
        scratch: &Path,
        name: &str,
        version: &str,
        arch: &str,
        payload: impl AsRef<[u8]>,
    ) -> Self {
        let pkg = scratch.join("pkg");
        let out = scratch.join("out");
        std::fs::create_dir_all(pkg.join("payload/bin")).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(pkg.join("payload/bin/app"), payload).unwrap();
        std::fs::write(
            pkg.join("niso.toml"),
            format!(
                "[package]\nname = \"{name}\"\nversion = \"{version}\"\narch = \"{arch}\"\n\
                 description = \"A crash test package\"\n[binary]\nentrypoint = \"bin/app\"\n"
            ),
        )
        .unwrap();
        let (path, _) =
            niso::archive::niso::create(&pkg, &out, &Limits::default()).expect("make a .niso");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        Planned {
            name: name.into(),
            version: version.into(),
            arch: arch.into(),
            bytes: Arc::new(bytes),
        }
    }
}

#[derive(Debug, Clone)]
enum Outcome {
    /// A 2xx.
    Published { already: bool },
    /// A 4xx.
    Refused { status: u16, error: String },
    /// No answer, a reset, a 5xx, or the client left.
    Cut(String),
}

fn upload(addr: &str, p: &Planned, leave: Leave) -> Outcome {
    match request(addr, "POST", &p.url(), &p.bytes, leave) {
        Ok(r) if (200..300).contains(&r.status) => Outcome::Published {
            already: r.header("x-niso-already-published") == Some("true"),
        },
        Ok(r) if r.status >= 500 => Outcome::Cut(format!("{} {}", r.status, r.text())),
        Ok(r) => Outcome::Refused {
            status: r.status,
            error: r.text(),
        },
        Err(e) => Outcome::Cut(e),
    }
}

struct Attempt {
    client: usize,
    plan: Planned,
    outcome: Outcome,
}

// ---------------------------------------------------------------------
// The tree

/// `niso registry verify` on the data directory: `Err` with its output.
fn verify(dd: &Path) -> Result<(), String> {
    let key = dd.join("public/public_key");
    let out = niso(&[
        "registry",
        "verify",
        p(dd),
        "--public-key",
        p(&key),
        "--name",
        "acme",
    ]);
    match out.status.code() {
        Some(0) => Ok(()),
        code => Err(format!("verify exited {code:?}:\n{}", text(&out))),
    }
}

/// Temp files in the tree and anything in the staging area.
fn leftovers(dd: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in walkdir::WalkDir::new(dd.join("public"))
        .into_iter()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            found.push(entry.path().display().to_string());
        }
    }
    if let Ok(rd) = std::fs::read_dir(dd.join("staging")) {
        for e in rd.flatten() {
            found.push(e.path().display().to_string());
        }
    }
    found
}

/// (version, arch) → SHA-256 of every artifact `niso/packages/NAME` lists
/// (the package's truth; signature checked).
fn published(dd: &Path, name: &str) -> BTreeMap<(String, String), Vec<u8>> {
    let path = dd.join("public/niso/packages").join(name);
    let Ok(bytes) = std::fs::read(&path) else {
        return BTreeMap::new();
    };
    let key = PublicKey::from_file(&dd.join("public/public_key")).unwrap();
    let pkg: pb::Package = decode_index(&bytes, &key, "acme", u64::MAX)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    pkg.releases
        .iter()
        .flat_map(|r| {
            r.artifacts
                .iter()
                .map(move |a| ((r.version.clone(), a.arch.clone()), a.sha256.clone()))
        })
        .collect()
}

/// The problems with one archive that must be published: its index entry
/// and its downloads.
fn check_published(
    addr: &str,
    p: &Planned,
    index: &BTreeMap<(String, String), Vec<u8>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    match index.get(&(p.version.clone(), p.arch.clone())) {
        Some(sha) if sha.as_slice() == p.sha256() => {}
        Some(sha) => problems.push(format!(
            "{}: niso/packages/{} lists sha256 {}",
            p.label(),
            p.name,
            hex::encode(sha)
        )),
        None => problems.push(format!("{}: not in niso/packages/{}", p.label(), p.name)),
    }
    let mut paths = vec![p.url()];
    if p.arch == "any" {
        paths.push(format!("/tarballs/{}-{}.tar", p.name, p.version));
    }
    for path in paths {
        match get(addr, &path) {
            Ok(r) if r.status == 200 && r.body == *p.bytes => {}
            Ok(r) => problems.push(format!(
                "{}: GET {path} gave {} ({} bytes, not the bytes uploaded)",
                p.label(),
                r.status,
                r.body.len()
            )),
            Err(e) => problems.push(format!("{}: GET {path}: {e}", p.label())),
        }
    }
    problems
}

// ---------------------------------------------------------------------
// kill -9

/// What each client of a crash trial uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Its own package, `.niso` archives.
    OwnNiso,
    /// Its own package, Hex tarballs.
    OwnHex,
    /// A package two clients upload with the same bytes, version by version.
    SameBytes,
    /// A package two clients upload with different bytes: one wins each
    /// version, the other is refused (409), crash or not.
    OtherBytes,
}

const ROLES: [Role; 8] = [
    Role::OwnNiso,
    Role::OwnNiso,
    Role::OwnHex,
    Role::OwnHex,
    Role::SameBytes,
    Role::SameBytes,
    Role::OtherBytes,
    Role::OtherBytes,
];

fn plan(role: Role, trial: usize, client: usize, i: usize, scratch: &Path) -> Planned {
    let version = format!("1.0.{i}");
    match role {
        Role::OwnNiso => Planned::niso(
            scratch,
            &format!("t{trial}n{client}"),
            &version,
            "x86_64",
            format!("client {client} version {version}"),
        ),
        Role::OwnHex => Planned::hex(&format!("t{trial}h{client}"), &version),
        Role::SameBytes => Planned::hex(&format!("t{trial}same"), &version),
        Role::OtherBytes => Planned::niso(
            scratch,
            &format!("t{trial}other"),
            &version,
            "x86_64",
            format!("client {client} version {version}"),
        ),
    }
}

#[derive(Default)]
struct Tally {
    attempts: usize,
    ok: usize,
    cut: usize,
    /// Cut off, yet found published after the restart: the kill landed
    /// after its archive was written (its index was written too, or
    /// recovery adopted the archive).
    cut_found: usize,
    refused: usize,
    /// Archives recovery published (their change was cut off).
    adopted: usize,
    startup_kills: usize,
    startup_kills_before_listening: usize,
}

/// One trial: upload, kill, restart, check, retry, check. Returns what
/// happened and every problem found.
fn crash_trial(
    trial: usize,
    rng: &mut StdRng,
    dd: &Path,
    scratch: &Path,
    tally: &mut Tally,
) -> Result<String, Vec<String>> {
    let delay = Duration::from_millis(rng.gen_range(50..=800));
    let kill_startup = rng.gen_bool(0.3);
    // A fraction of twice the time the first start took: the kill lands
    // in the start-up (recovery included) most of the time, on a fast
    // machine or a slow one.
    let startup_fraction: f64 = rng.gen_range(0.0..1.0);
    let mut server = Serve::start(dd).map_err(|e| vec![e])?;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = ROLES
        .iter()
        .enumerate()
        .map(|(client, &role)| {
            let addr = server.addr.clone();
            let stop = stop.clone();
            let scratch = scratch.join(format!("client{client}"));
            std::thread::spawn(move || {
                let mut done = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let p = plan(role, trial, client, i, &scratch);
                    let outcome = upload(&addr, &p, Leave::Honest);
                    done.push(Attempt {
                        client,
                        plan: p,
                        outcome,
                    });
                    i += 1;
                }
                done
            })
        })
        .collect();
    std::thread::sleep(delay);
    stop.store(true, Ordering::SeqCst);
    server.kill();
    let attempts: Vec<Attempt> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client thread"))
        .collect();

    // Sometimes the next start is killed too, recovery and all.
    let startup_delay = server.took.mul_f64(2.0 * startup_fraction);
    let mut startup_kill = String::new();
    if kill_startup {
        let (mut child, listening, _log) = spawn_serve(dd);
        std::thread::sleep(startup_delay);
        let _ = child.kill();
        let _ = child.wait();
        tally.startup_kills += 1;
        let before = listening.try_recv().is_err();
        if before {
            tally.startup_kills_before_listening += 1;
        }
        startup_kill = format!(
            " and again {} ms into the restart ({} it listened)",
            startup_delay.as_millis(),
            if before { "before" } else { "after" }
        );
    }
    let server = Serve::start(dd).map_err(|e| vec![e])?;
    let adopted = server.count("published an archive no index named");
    tally.adopted += adopted;

    let mut problems = Vec::new();
    if let Err(e) = verify(dd) {
        problems.push(format!("after the restart: {e}"));
    }
    let left = leftovers(dd);
    if !left.is_empty() {
        problems.push(format!("after the restart, left behind: {left:?}"));
    }
    let names: BTreeSet<String> = attempts.iter().map(|a| a.plan.name.clone()).collect();
    let mut index: HashMap<String, BTreeMap<(String, String), Vec<u8>>> = names
        .iter()
        .map(|n| (n.clone(), published(dd, n)))
        .collect();
    let (mut ok, mut cut, mut cut_found, mut refused) = (0, 0, 0, 0);
    for a in &attempts {
        let idx = &index[&a.plan.name];
        let there = idx.get(&(a.plan.version.clone(), a.plan.arch.clone()));
        match &a.outcome {
            Outcome::Published { .. } => {
                ok += 1;
                problems.extend(check_published(&server.addr, &a.plan, idx));
            }
            Outcome::Refused { status, error } => {
                refused += 1;
                // Only the loser of two different uploads of one version.
                let lost = ROLES[a.client] == Role::OtherBytes
                    && *status == 409
                    && there.is_some_and(|sha| sha.as_slice() != a.plan.sha256());
                if !lost {
                    problems.push(format!(
                        "client {}: {} refused with {status}: {error}",
                        a.client,
                        a.plan.label()
                    ));
                }
            }
            Outcome::Cut(_) => {
                cut += 1;
                if there.is_some_and(|sha| sha.as_slice() == a.plan.sha256()) {
                    cut_found += 1;
                }
            }
        }
    }

    // Everything cut off is sent again: a 2xx, unless the same version
    // holds other bytes (then a 409).
    let mut retried = BTreeSet::new();
    for a in &attempts {
        let Outcome::Cut(why) = &a.outcome else {
            continue;
        };
        if !retried.insert((a.plan.key(), a.plan.sha256())) {
            continue;
        }
        let idx = index.get_mut(&a.plan.name).expect("every name read");
        let k = (a.plan.version.clone(), a.plan.arch.clone());
        let other = idx
            .get(&k)
            .is_some_and(|sha| sha.as_slice() != a.plan.sha256());
        let there = idx
            .get(&k)
            .is_some_and(|sha| sha.as_slice() == a.plan.sha256());
        match upload(&server.addr, &a.plan, Leave::Honest) {
            // A retry answers as the first upload did: already published
            // when it was.
            Outcome::Published { already } if !other => {
                if already != there {
                    problems.push(format!(
                        "retry of {}: X-Niso-Already-Published is {already}, but the index {} it",
                        a.plan.label(),
                        if there { "listed" } else { "did not list" }
                    ));
                }
                idx.insert(k, a.plan.sha256().to_vec());
            }
            Outcome::Refused { status: 409, error } if other => {
                if !error.contains("already published with other bytes") {
                    problems.push(format!("retry of {}: 409 says {error}", a.plan.label()));
                }
            }
            got => problems.push(format!(
                "retry of {} (first cut off: {why}) gave {got:?}{}",
                a.plan.label(),
                if other {
                    ", but other bytes are published"
                } else {
                    ""
                }
            )),
        }
    }
    if let Err(e) = verify(dd) {
        problems.push(format!("after the retries: {e}"));
    }
    let left = leftovers(dd);
    if !left.is_empty() {
        problems.push(format!("after the retries, left behind: {left:?}"));
    }
    tally.attempts += attempts.len();
    tally.ok += ok;
    tally.cut += cut;
    tally.cut_found += cut_found;
    tally.refused += refused;
    let summary = format!(
        "trial {trial}: killed after {} ms{}: {} uploads, {ok} acknowledged, {refused} refused (409, other bytes), \
         {cut} cut off ({cut_found} found published), recovery adopted {adopted}",
        delay.as_millis(),
        startup_kill,
        attempts.len()
    );
    if problems.is_empty() {
        Ok(summary)
    } else {
        let mut shown = vec![summary];
        shown.extend(problems.into_iter().take(30));
        shown.push(format!("server log:\n{}", tail(&server.log, 40)));
        Err(shown)
    }
}

fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// Trials per data directory: later trials crash a tree that has history,
/// and no tree grows so large that verifying it dominates.
const TRIALS_PER_TREE: usize = 5;

#[test]
fn kill_9_during_uploads_loses_nothing_acknowledged_and_blocks_no_retry() {
    let trials = env_number("NISO_CRASH_TRIALS").unwrap_or(20) as usize;
    let seed = env_number("NISO_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    eprintln!("kill -9 harness: {trials} trials, seed {seed} (replay with NISO_CRASH_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut failures: Vec<String> = Vec::new();
    let mut tree = 0;
    let mut in_tree = 0;
    for trial in 0..trials {
        if in_tree == TRIALS_PER_TREE {
            // The old tree is done with: free the disk.
            let _ = std::fs::remove_dir_all(tmp.path().join(format!("tree{tree}")));
            tree += 1;
            in_tree = 0;
        }
        in_tree += 1;
        let dd = tmp.path().join(format!("tree{tree}"));
        let scratch = tmp.path().join("scratch");
        match crash_trial(trial, &mut rng, &dd, &scratch, &mut tally) {
            Ok(summary) => eprintln!("{summary}"),
            Err(report) => {
                eprintln!("FAILED {}", report.join("\n  "));
                failures.push(report.join("\n  "));
                // A broken tree would fail the trials after it too.
                in_tree = TRIALS_PER_TREE;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "kill -9 harness: {trials} trials in {secs:.1} s, seed {seed}: {} uploads, {} acknowledged, \
         {} refused (409), {} cut off ({} found published), {} archives adopted by recovery, \
         {} start-ups killed ({} before they listened); {} failed trials",
        tally.attempts,
        tally.ok,
        tally.refused,
        tally.cut,
        tally.cut_found,
        tally.adopted,
        tally.startup_kills,
        tally.startup_kills_before_listening,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: {} of {trials} trials failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // The harness must have hit something: kills while uploads were in
    // flight.
    assert!(
        tally.cut >= trials,
        "seed {seed}: only {} uploads were cut off in {trials} trials: the kills missed",
        tally.cut
    );
}

// ---------------------------------------------------------------------
// Clients that hang up

/// Polls `cond` every 20 ms until it holds or `limit` passes.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn clients_that_hang_up_take_nothing_from_honest_ones_and_leave_nothing_behind() {
    const HONEST: usize = 6;
    const HANGING: usize = 6;
    const UPLOADS: usize = 10;
    let tmp = tempfile::tempdir().unwrap();
    let dd = tmp.path().join("data");
    let server = Serve::start(&dd).unwrap();
    // Honest client u uploads package `honest{u}`, `.niso` archives for
    // even u, Hex tarballs for odd u. Hanging client h sends the very same
    // archives as honest client h when h is even (the two race), its own
    // package's otherwise; it leaves after the whole body, or half way
    // through, in turn.
    let archive = |scratch: &Path, name: &str, u: usize, i: usize| {
        let version = format!("1.0.{i}");
        if u % 2 == 0 {
            Planned::niso(
                scratch,
                name,
                &version,
                "x86_64",
                format!("{name} {version}"),
            )
        } else {
            Planned::hex(name, &version)
        }
    };
    let threads: Vec<_> = (0..HONEST + HANGING)
        .map(|c| {
            let addr = server.addr.clone();
            let scratch = tmp.path().join(format!("scratch{c}"));
            std::thread::spawn(move || {
                let (u, hanging) = if c < HONEST {
                    (c, false)
                } else {
                    (c - HONEST, true)
                };
                let name = if !hanging || u % 2 == 0 {
                    format!("honest{u}")
                } else {
                    format!("hangup{u}")
                };
                (0..UPLOADS)
                    .map(|i| {
                        let plan = archive(&scratch, &name, u, i);
                        let leave = match (hanging, i % 2) {
                            (false, _) => Leave::Honest,
                            // At once, or after a while: before the
                            // server queues the upload, or after.
                            (true, 0) => Leave::AfterBody(Duration::from_millis(
                                [0, 10, 40, 150, 1000][(i / 2) % 5],
                            )),
                            (true, _) => Leave::MidBody,
                        };
                        let outcome = upload(&addr, &plan, leave);
                        (
                            leave,
                            Attempt {
                                client: c,
                                plan,
                                outcome,
                            },
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let attempts: Vec<(Leave, Attempt)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();

    let mut problems = Vec::new();
    // An upload whose client left is published all the same once it was
    // queued: wait until every staged file is gone.
    if !wait_until(Duration::from_secs(60), || leftovers(&dd).is_empty()) {
        problems.push(format!("left behind: {:?}", leftovers(&dd)));
    }
    if let Err(e) = verify(&dd) {
        problems.push(e);
    }
    // (left after the body, the package is the hanging client's own,
    // published) → count
    let mut seen: BTreeMap<(bool, bool, bool), usize> = BTreeMap::new();
    for (leave, a) in &attempts {
        let index = published(&dd, &a.plan.name);
        match (leave, &a.outcome) {
            (Leave::Honest, Outcome::Published { .. }) => {
                problems.extend(check_published(&server.addr, &a.plan, &index));
            }
            (Leave::Honest, other) => problems.push(format!(
                "honest client {}: {} gave {other:?}",
                a.client,
                a.plan.label()
            )),
            (_, _) => {
                let there = index.get(&(a.plan.version.clone(), a.plan.arch.clone()));
                let was_there = there.is_some();
                let download = get(&server.addr, &a.plan.url());
                match (there, &download) {
                    (Some(sha), Ok(r))
                        if sha.as_slice() == a.plan.sha256()
                            && r.status == 200
                            && r.body == *a.plan.bytes =>
                    {
                        *seen
                            .entry((
                                leave != &Leave::MidBody,
                                a.plan.name.starts_with("hangup"),
                                true,
                            ))
                            .or_default() += 1;
                        // Half an archive is never published (unless an
                        // honest client sent the whole of it).
                        if *leave == Leave::MidBody && a.plan.name.starts_with("hangup") {
                            problems
                                .push(format!("{}: published from half its body", a.plan.label()));
                        }
                    }
                    (None, Ok(r)) if r.status == 404 => {
                        *seen
                            .entry((
                                leave != &Leave::MidBody,
                                a.plan.name.starts_with("hangup"),
                                false,
                            ))
                            .or_default() += 1;
                    }
                    _ => problems.push(format!(
                        "{} (client left {leave:?}): index says {:?}, GET gives {:?}",
                        a.plan.label(),
                        there.map(hex::encode),
                        download.map(|r| r.status)
                    )),
                }
                match upload(&server.addr, &a.plan, Leave::Honest) {
                    Outcome::Published { already } if already == was_there => {}
                    got => problems.push(format!(
                        "retry of {} (published before: {was_there}): {got:?}",
                        a.plan.label()
                    )),
                }
            }
        }
    }
    let left = leftovers(&dd);
    if !left.is_empty() {
        problems.push(format!("after the retries, left behind: {left:?}"));
    }
    if let Err(e) = verify(&dd) {
        problems.push(format!("after the retries: {e}"));
    }
    eprintln!("{} uploads; of those whose client left:", attempts.len());
    for ((after_body, own, there), n) in &seen {
        eprintln!(
            "  {n} left {}, {} package: {}",
            if *after_body {
                "after the body"
            } else {
                "mid-body"
            },
            if *own { "own" } else { "an honest client's" },
            if *there { "published" } else { "absent" }
        );
    }
    // A client that leaves a second after its body has its upload queued by
    // then: the queue keeps it. (One that leaves at once may be dropped
    // with its staged file before it is queued: either is right, and which
    // happens depends on timing.)
    assert!(
        seen.contains_key(&(true, true, true)),
        "no upload whose client left after the body was published: {seen:?}"
    );
    assert!(
        problems.is_empty(),
        "{}\nserver log:\n{}",
        problems.join("\n"),
        tail(&server.log, 40)
    );
}

// ---------------------------------------------------------------------
// A write that fails

/// Puts a file where the tree needs a directory, as a full or broken disk
/// would fail a write (root ignores permissions, so a read-only directory
/// would not stop the server when tests run as root). The returned guard
/// puts the tree back.
struct Obstacle {
    path: PathBuf,
    moved: Option<PathBuf>,
}

impl Obstacle {
    /// `rel` is a path under the tree; a directory there is moved aside
    /// (to `aside`, outside the tree) for the time being.
    fn place(dd: &Path, rel: &str) -> Obstacle {
        let path = dd.join("public").join(rel);
        let moved = path.is_dir().then(|| {
            let aside = dd.join(format!("aside-{}", rel.replace('/', "-")));
            std::fs::rename(&path, &aside).unwrap();
            aside
        });
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"not a directory").unwrap();
        Obstacle { path, moved }
    }

    fn remove(mut self) {
        self.restore();
    }

    fn restore(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(aside) = self.moved.take() {
            std::fs::rename(aside, &self.path).unwrap();
        }
    }
}

impl Drop for Obstacle {
    fn drop(&mut self) {
        self.restore();
    }
}

/// The upload must be refused with a 503 that says to try again.
fn assert_503(addr: &str, p: &Planned, when: &str) {
    assert_503_on(addr, &p.url(), &p.bytes, &format!("{when}: {}", p.label()));
}

/// The POST must be refused with a 503 that says to try again.
fn assert_503_on(addr: &str, path: &str, body: &[u8], when: &str) {
    let r = request(addr, "POST", path, body, Leave::Honest)
        .unwrap_or_else(|e| panic!("{when}: no answer: {e}"));
    assert_eq!(r.status, 503, "{when}: {}", r.text());
    let body: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{when}: not JSON ({e}): {}", r.text()));
    assert_eq!(body["status"], 503, "{when}: {body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(message.contains("try again"), "{when}: {message}");
    assert!(
        !message.contains("/public/"),
        "{when}: the message names a server path: {message}"
    );
    assert_eq!(r.header("retry-after"), Some("1"), "{when}");
    // The server answers reads meanwhile.
    let health = get(addr, "/health").unwrap_or_else(|e| panic!("{when}: /health: {e}"));
    assert_eq!(health.status, 200, "{when}: /health: {}", health.text());
}

fn assert_2xx(addr: &str, p: &Planned, when: &str) {
    match upload(addr, p, Leave::Honest) {
        Outcome::Published { .. } => {}
        got => panic!("{when}: {}: {got:?}", p.label()),
    }
}

#[test]
fn a_write_that_fails_is_a_503_to_retry_and_the_server_mends_the_tree_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = tmp.path().join("data");
    let scratch = tmp.path().join("scratch");
    let server = Serve::start(&dd).unwrap();
    let addr = server.addr.clone();
    let base = Planned::niso(&scratch, "base", "1.0.0", "x86_64", "base");
    assert_2xx(&addr, &base, "before any failure");

    // 1. The archive cannot be written (the first Hex tarball: no
    //    `tarballs/` yet).
    let a = Planned::hex("fail_archive", "1.0.0");
    let obstacle = Obstacle::place(&dd, "tarballs");
    assert_503(&addr, &a, "archive write");
    obstacle.remove();
    assert_2xx(&addr, &a, "archive write, retried");
    verify(&dd).unwrap_or_else(|e| panic!("after the archive write: {e}"));

    // 2. The package's index is written, one of its derived files is not:
    //    a change half done. Until the tree can be written again, every
    //    change is a 503 (the server tries to mend the tree first).
    let b = Planned::niso(&scratch, "fail_derived", "1.0.0", "x86_64", "b");
    let c = Planned::hex("fail_next", "1.0.0");
    let obstacle = Obstacle::place(&dd, "v1/packages/fail_derived");
    assert_503(&addr, &b, "derived file write");
    assert_503(&addr, &c, "the change after a failed one");
    assert_503_on(
        &addr,
        "/v1/packages/base/tags",
        br#"{"tag": "stable", "version": "1.0.0"}"#,
        "a tag after a failed change",
    );
    obstacle.remove();
    // The next change mends the tree, then goes through; so do retries.
    assert_2xx(&addr, &c, "the change after a failed one, retried");
    assert_2xx(&addr, &b, "derived file write, retried");
    verify(&dd).unwrap_or_else(|e| panic!("after the derived file write: {e}"));

    // 3. The shared files: a freshness bin cannot be written, after the
    //    package's files and `versions` were.
    let d = Planned::hex("fail_bins", "1.0.0");
    let obstacle = Obstacle::place(&dd, "freshness-bins");
    assert_503(&addr, &d, "freshness bin write");
    obstacle.remove();
    assert_2xx(&addr, &d, "freshness bin write, retried");

    verify(&dd).unwrap_or_else(|e| panic!("at the end: {e}"));
    let index = |name: &str| published(&dd, name);
    for p in [&base, &a, &b, &c, &d] {
        let problems = check_published(&addr, p, &index(&p.name));
        assert!(problems.is_empty(), "{problems:#?}");
    }
    assert_eq!(leftovers(&dd), Vec::<String>::new());
    // The failures were logged for the operator.
    assert!(
        server.count("writing to the tree failed") >= 2,
        "{}",
        tail(&server.log, 40)
    );
}

// ---------------------------------------------------------------------
// An expired freshness record

/// 40 days ago: a record signed then (valid 30 days) expired 10 days ago.
fn forty_days_ago() -> i64 {
    niso::publish::unix_now() - 40 * 24 * 3600
}

fn freshness(dd: &Path) -> pb::Freshness {
    let key = PublicKey::from_file(&dd.join("public/public_key")).unwrap();
    let bytes = std::fs::read(dd.join("public/freshness")).unwrap();
    decode_index(&bytes, &key, "acme", u64::MAX).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_refuses_an_expired_freshness_record_and_build_re_signs_it() {
    use niso::ident::RepoName;
    use niso::index::{RepoKey, Signer};
    use niso::publish::{Layout, Options, Publisher};
    use niso::store::LocalStore;

    let tmp = tempfile::tempdir().unwrap();
    let dd = init(tmp.path(), "acme");
    let archives: Vec<PathBuf> = vec![niso_fixtures()[0].clone(), hex_fixtures()[0].clone()];
    let mut args = vec!["registry", "publish", "--data-dir", p(&dd)];
    args.extend(archives.iter().map(|a| p(a)));
    niso_ok(&args);
    verify(&dd).unwrap();

    // The operator stopped re-signing 40 days ago: the record in the tree
    // is the last one signed then.
    let signer: Arc<dyn Signer> =
        Arc::new(RepoKey::from_file(&dd.join("keys/repository.pem")).unwrap());
    Publisher::open(
        Arc::new(LocalStore::new(dd.join("public"))),
        signer,
        RepoName::new("acme").unwrap(),
        Layout::root(),
        Options::default(),
    )
    .await
    .unwrap()
    .with_clock(forty_days_ago)
    .refresh()
    .await
    .unwrap();
    let stale = freshness(&dd);
    let now = niso::publish::unix_now();
    assert!(stale.expires_at < now, "{stale:?}");

    let key = dd.join("public/public_key");
    let verify_args = [
        "registry",
        "verify",
        p(&dd),
        "--public-key",
        p(&key),
        "--name",
        "acme",
    ];
    let out = niso(&verify_args);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    let expiry = niso::index::json::rfc3339(stale.expires_at);
    assert!(
        said.contains(&format!("freshness: expired at {expiry}")),
        "the refusal must name the expiry ({expiry}):\n{said}"
    );
    assert!(said.contains("niso registry build"), "{said}");
    // The record is the only thing wrong.
    assert!(said.contains(", 1 problems"), "{said}");

    // `build` re-signs it: a later generation, valid for 30 days again.
    let built = niso_ok(&["registry", "build", "--data-dir", p(&dd)]);
    let fresh = freshness(&dd);
    assert!(fresh.generation > stale.generation, "{built}");
    assert!(
        fresh.expires_at >= now + 29 * 24 * 3600,
        "expires {} ({built})",
        niso::index::json::rfc3339(fresh.expires_at)
    );
    verify(&dd).unwrap_or_else(|e| panic!("after build: {e}"));
    // And the tree still serves what was published.
    let listed: Vec<String> = published(&dd, "my-app")
        .keys()
        .map(|(v, _)| v.clone())
        .collect();
    assert_eq!(listed, vec!["1.0.0"]);
}

// ---------------------------------------------------------------------
// A full disk (root only: scripts/reliability)

/// A tmpfs of a given size mounted on a directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        Self::run(&[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            p(dir),
        ]);
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    fn resize(&self, size: &str) {
        Self::run(&["-o", &format!("remount,size={size}"), "tmpfs", p(&self.dir)]);
    }

    fn run(args: &[&str]) {
        let out = Command::new("mount")
            .args(args)
            .output()
            .expect("run mount(8)");
        assert!(
            out.status.success(),
            "mount {args:?} failed (this test needs root): {}",
            text(&out)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
#[ignore = "mounts a tmpfs, which needs root: scripts/reliability runs it"]
fn a_full_disk_is_a_503_to_retry_and_nothing_acknowledged_is_lost() {
    const CLIENTS: usize = 4;
    let tmp = tempfile::tempdir().unwrap();
    let dd = tmp.path().join("data");
    // The tree on a file system of 256 pages; staging/ stays on the real
    // disk, so every archive is copied into the tree, not linked.
    let disk = Tmpfs::mount(&dd.join("public"), "1m");
    niso_ok(&["registry", "init", "--data-dir", p(&dd), "--name", "acme"]);
    let server = Serve::start(&dd).unwrap();
    // Each client uploads new versions until it has seen five 503s in a
    // row: the disk is full.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let addr = server.addr.clone();
            let scratch = tmp.path().join(format!("scratch{c}"));
            std::thread::spawn(move || {
                let mut done = Vec::new();
                let mut refused_in_a_row = 0;
                for i in 0..400 {
                    let name = format!("full{c}");
                    let version = format!("1.0.{i}");
                    let plan = if c % 2 == 0 {
                        // 48 KiB that do not compress: the archive is
                        // the biggest write of its change, so a full
                        // disk often fails it first.
                        let mut payload = vec![0u8; 48 * 1024];
                        StdRng::seed_from_u64((c * 1000 + i) as u64).fill(&mut payload[..]);
                        Planned::niso(&scratch, &name, &version, "x86_64", payload)
                    } else {
                        Planned::hex(&name, &version)
                    };
                    let outcome = upload(&addr, &plan, Leave::Honest);
                    refused_in_a_row = match &outcome {
                        Outcome::Published { .. } => 0,
                        _ => refused_in_a_row + 1,
                    };
                    done.push(Attempt {
                        client: c,
                        plan,
                        outcome,
                    });
                    if refused_in_a_row == 5 {
                        break;
                    }
                }
                done
            })
        })
        .collect();
    let attempts: Vec<Attempt> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let mut problems = Vec::new();
    let full = attempts
        .iter()
        .filter(|a| !matches!(a.outcome, Outcome::Published { .. }))
        .count();
    for a in &attempts {
        match &a.outcome {
            Outcome::Published { .. } => {}
            Outcome::Cut(why) if why.starts_with("503 ") && why.contains("try again") => {}
            other => problems.push(format!(
                "client {}: {}: {other:?} (only a 2xx or a 503 is right)",
                a.client,
                a.plan.label()
            )),
        }
    }
    assert!(
        full >= CLIENTS * 5,
        "the disk never filled: {} uploads, {full} refused\n{}",
        attempts.len(),
        problems.join("\n")
    );

    // Room again: the next change mends the tree, every refused upload
    // goes through when sent again, and nothing acknowledged was lost.
    disk.resize("64m");
    for a in &attempts {
        if !matches!(a.outcome, Outcome::Published { .. }) {
            if let got @ (Outcome::Refused { .. } | Outcome::Cut(_)) =
                upload(&server.addr, &a.plan, Leave::Honest)
            {
                problems.push(format!("retry of {}: {got:?}", a.plan.label()));
            }
        }
    }
    for a in &attempts {
        let index = published(&dd, &a.plan.name);
        problems.extend(check_published(&server.addr, &a.plan, &index));
    }
    if let Err(e) = verify(&dd) {
        problems.push(e);
    }
    let left = leftovers(&dd);
    if !left.is_empty() {
        problems.push(format!("left behind: {left:?}"));
    }
    eprintln!(
        "full disk: {} uploads, {} acknowledged, {full} refused while the disk was full, \
         all of them published when sent again; {} problems",
        attempts.len(),
        attempts.len() - full,
        problems.len()
    );
    assert!(
        problems.is_empty(),
        "{}\nserver log:\n{}",
        problems.join("\n"),
        tail(&server.log, 40)
    );
    drop(server);
}
