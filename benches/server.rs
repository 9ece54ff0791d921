//! Server benchmark: the write API and the static tree of
//! `niso registry serve`, driven over loopback HTTP.
//!
//! ```text
//! cargo bench --bench server                         # everything, N = 1,000 and 10,000
//! cargo bench --bench server -- --packages 1000 --big-mib 0 --no-static
//! cargo bench --bench server -- --help
//! ```
//!
//! It first builds the binary with `cargo build --release --locked --bin niso`
//! (the `cargo` that runs this program), then:
//!
//! 1. for each N, makes a data directory with [`DataDir::init`], writes
//!    N × V small `.niso` archives into `public/archives/`, runs
//!    `niso registry build --data-dir` (setup, not a result), starts
//!    `niso registry serve` on 127.0.0.1 (rate limits off) and times K
//!    sequential uploads of a new release of existing packages, each as the
//!    client's round trip (loopback, so close to the server's time), next to
//!    the time the server logs for the request;
//! 2. on the smallest N, uploads with 1 and with C concurrent clients (group
//!    commit), then checks every tree with `niso registry verify`;
//! 3. on the smallest N, the peak RSS of a fresh server while it receives a
//!    1 GiB archive streamed from disk (`VmHWM` of `/proc/PID/status`);
//! 4. on the largest N, `wrk` against `serve --read-only` and against nginx
//!    serving the same tree, alternately, for a small index, `names` and an
//!    archive.
//!
//! It prints a Markdown report and writes it to `target/bench-server.md`.
//! Every figure in it is measured by this run; nothing is assumed. All
//! traffic stays on 127.0.0.1, and every loop is bounded in count and time.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use common::{cpu_model, loadavg, niso_archive, percentile, syncfs, uname_m, ARCH};
use niso::datadir::DataDir;
use niso::ident::RepoName;
use niso::limits::Limits;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const USAGE: &str = "\
usage: cargo bench --bench server -- [options]

  --packages N[,N...]   repository sizes (repeatable; default 1000,10000)
  --versions V          releases per package in the generated trees (default 2)
  --uploads K           sequential uploads timed per size (default 50)
  --archive-kib S       payload of each uploaded archive, KiB (default 10)
  --clients C[,C...]    concurrent clients of the throughput runs (default 1,32)
  --total T             uploads per throughput run (default 3200)
  --max-seconds S       time bound of each throughput run (default 120)
  --big-mib M           size of the big upload, MiB (default 1024; 0 skips it)
  --wrk-seconds S       duration of each wrk run (default 10)
  --wrk-threads T       wrk -t (default 2)
  --wrk-connections C   wrk -c (default 32)
  --no-static           skip the wrk comparison with nginx
  --dir PATH            where to create the temporary trees (default: the temp dir)
  --niso PATH           run this niso binary instead of building one
  --out PATH            report file (default: target/bench-server.md)
  --keep                keep the generated trees
  --server-log FILTER   the server's log filter for the upload runs (default
                        info; e.g. niso=debug adds each batch's commit timings)
  --server-log-file P   also append every line the servers log to P
";

struct Config {
    packages: Vec<usize>,
    versions: usize,
    uploads: usize,
    archive_kib: usize,
    clients: Vec<usize>,
    total: usize,
    max_seconds: u64,
    big_mib: u64,
    wrk_seconds: u64,
    wrk_threads: usize,
    wrk_connections: usize,
    statics: bool,
    dir: PathBuf,
    niso: Option<PathBuf>,
    out: PathBuf,
    keep: bool,
    server_log: String,
    server_log_file: Option<PathBuf>,
    /// The arguments as given, for the report.
    args: Vec<String>,
}

fn parse_list(text: &str, into: &mut Vec<usize>) -> Result<()> {
    for part in text.split(',') {
        into.push(part.trim().replace('_', "").parse()?);
    }
    Ok(())
}

fn parse_args() -> Result<Config> {
    let mut cfg = Config {
        packages: Vec::new(),
        versions: 2,
        uploads: 50,
        archive_kib: 10,
        clients: Vec::new(),
        total: 3200,
        max_seconds: 120,
        big_mib: 1024,
        wrk_seconds: 10,
        wrk_threads: 2,
        wrk_connections: 32,
        statics: true,
        dir: std::env::temp_dir(),
        niso: None,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-server.md"),
        keep: false,
        server_log: "info".into(),
        server_log_file: None,
        args: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        // cargo passes --bench to every bench target.
        if arg == "--bench" {
            continue;
        }
        cfg.args.push(arg.clone());
        let mut value = |name: &str| -> Result<String> {
            let v = it
                .next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))?;
            cfg.args.push(v.clone());
            Ok(v)
        };
        match arg.as_str() {
            "--packages" => parse_list(&value("--packages")?, &mut cfg.packages)?,
            "--versions" => cfg.versions = value("--versions")?.parse()?,
            "--uploads" => cfg.uploads = value("--uploads")?.parse()?,
            "--archive-kib" => cfg.archive_kib = value("--archive-kib")?.parse()?,
            "--clients" => parse_list(&value("--clients")?, &mut cfg.clients)?,
            "--total" => cfg.total = value("--total")?.parse()?,
            "--max-seconds" => cfg.max_seconds = value("--max-seconds")?.parse()?,
            "--big-mib" => cfg.big_mib = value("--big-mib")?.parse()?,
            "--wrk-seconds" => cfg.wrk_seconds = value("--wrk-seconds")?.parse()?,
            "--wrk-threads" => cfg.wrk_threads = value("--wrk-threads")?.parse()?,
            "--wrk-connections" => cfg.wrk_connections = value("--wrk-connections")?.parse()?,
            "--no-static" => cfg.statics = false,
            "--dir" => cfg.dir = value("--dir")?.into(),
            "--niso" => cfg.niso = Some(value("--niso")?.into()),
            "--out" => cfg.out = value("--out")?.into(),
            "--keep" => cfg.keep = true,
            "--server-log" => cfg.server_log = value("--server-log")?,
            "--server-log-file" => cfg.server_log_file = Some(value("--server-log-file")?.into()),
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    if cfg.packages.is_empty() {
        cfg.packages = vec![1_000, 10_000];
    }
    cfg.packages.sort_unstable();
    cfg.packages.dedup();
    if cfg.clients.is_empty() {
        cfg.clients = vec![1, 32];
    }
    if cfg.packages.contains(&0) || cfg.versions == 0 || cfg.uploads == 0 {
        return Err("--packages, --versions and --uploads must be at least 1".into());
    }
    if cfg.clients.contains(&0) || cfg.total == 0 || cfg.max_seconds == 0 {
        return Err("--clients, --total and --max-seconds must be at least 1".into());
    }
    if cfg.clients.iter().any(|&c| c > 512) {
        return Err("--clients is at most 512".into());
    }
    if cfg.archive_kib == 0 || cfg.wrk_seconds == 0 {
        return Err("--archive-kib and --wrk-seconds must be at least 1".into());
    }
    if cfg.wrk_threads == 0 || cfg.wrk_connections < cfg.wrk_threads {
        return Err("--wrk-connections must be at least --wrk-threads, which is at least 1".into());
    }
    Ok(cfg)
}

// ---------------------------------------------------------------------------
// Child processes: always ours, always bounded in time.

/// Runs `cmd` to completion with captured output, killing it after `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let read_all = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = read_all(child.stdout.take().map(|r| Box::new(r) as _));
    let err = read_all(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} did not finish within {} s", limit.as_secs()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// `cargo build --release --locked --bin niso`, returning the binary's path
/// as cargo reports it.
fn build_niso() -> Result<PathBuf> {
    eprintln!("building: cargo build --release --locked --bin niso");
    let out = run_bounded(
        Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--locked",
                "--bin",
                "niso",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR")),
        Duration::from_secs(1800),
    )?;
    if !out.status.success() {
        return Err(format!(
            "cargo build --release failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "niso" {
            if let Some(exe) = msg["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    Err("cargo build did not report the niso executable".into())
}

const ADMIN_KEY: &str = "niso_k1_BenchAdminKey0000000000000000000";

/// A `niso registry serve` child on 127.0.0.1, port chosen by the OS.
struct Server {
    child: Child,
    addr: String,
    /// Milliseconds the server logged for each successful upload (`POST …
    /// status=201 ms=…`), when it logs at info level.
    logged_ms: Arc<Mutex<Vec<f64>>>,
    /// Its last stderr lines, for error messages.
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Server {
    fn start(
        niso: &Path,
        data_dir: &Path,
        extra: &[&str],
        log: &str,
        log_file: Option<&Path>,
    ) -> Result<Self> {
        let mut log_file = match log_file {
            Some(p) => Some(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| format!("cannot open {}: {e}", p.display()))?,
            ),
            None => None,
        };
        let mut child = Command::new(niso)
            .args(["registry", "serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(["--rate-limit-key", "0", "--rate-limit-ip", "0"])
            .args(extra)
            .env("NISO_ADMIN_KEY", ADMIN_KEY)
            .env("NISO_LOG", log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", niso.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let logged_ms = Arc::new(Mutex::new(Vec::new()));
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel::<String>();
        {
            let logged_ms = logged_ms.clone();
            let tail = tail.clone();
            // Drains stderr for the server's whole life, so it never blocks.
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&line);
                    if let Some(f) = log_file.as_mut() {
                        let _ = writeln!(f, "{line}");
                    }
                    if let Some(a) = line.strip_prefix("Listening at http://") {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(a.trim().to_string());
                        }
                    }
                    if let Some(ms) = upload_ms(&line) {
                        lock(&logged_ms).push(ms);
                    }
                    let mut t = lock(&tail);
                    if t.len() >= 40 {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        }
        let mut server = Server {
            child,
            addr: String::new(),
            logged_ms,
            tail,
        };
        match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(addr) => server.addr = addr,
            Err(_) => {
                return Err(format!(
                    "niso registry serve did not start listening:\n{}",
                    server.tail_text()
                )
                .into())
            }
        }
        Ok(server)
    }

    /// The server of the upload runs: default settings, logging as
    /// `--server-log` asks.
    fn for_uploads(cfg: &Config, niso: &Path, data_dir: &Path) -> Result<Self> {
        Self::start(
            niso,
            data_dir,
            &[],
            &cfg.server_log,
            cfg.server_log_file.as_deref(),
        )
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn tail_text(&self) -> String {
        lock(&self.tail)
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn take_logged(&self) -> Vec<f64> {
        std::mem::take(&mut *lock(&self.logged_ms))
    }

    /// SIGTERM, then up to 30 s for a graceful exit, then SIGKILL.
    fn stop(mut self) -> Result<()> {
        stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(30))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        kill_if_running(&mut self.child);
    }
}

/// Kills and reaps `child` unless it has exited (a bench that stops early
/// must not leave servers behind).
fn kill_if_running(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn stop_child(child: &mut Child, signal: libc::c_int, grace: Duration) -> Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    // SAFETY: kill(2) on the pid of our own unreaped child.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait()?;
    Err(format!("pid {} ignored signal {signal}; killed", child.id()).into())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes terminal colour sequences (`ESC [ … m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `ms=` of a request log line of a successful upload.
fn upload_ms(line: &str) -> Option<f64> {
    if !line.contains("method=POST") || !line.contains("status=201") {
        return None;
    }
    let (_, after) = line.split_once(" ms=")?;
    after.split_whitespace().next()?.parse().ok()
}

/// `VmHWM` and `VmRSS` of a process, KiB.
fn vm_status(pid: u32) -> Result<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status").into())
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

fn vm_rss(pid: u32) -> Option<u64> {
    vm_status(pid).ok().map(|(_, rss)| rss)
}

/// User + system CPU time a process has used so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after `)`.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// CPU time (user + system) of this process, the clients' side.
fn own_cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

// ---------------------------------------------------------------------------
// Archives.

fn package_name(i: usize) -> String {
    format!("pkg-{i:05}")
}

/// Archives of packages 1..=n, versions 1.0.0..1.(v-1).0, written straight
/// into `dir` on every core. Returns the bytes written.
fn write_tree_archives(dir: &Path, n: usize, v: usize) -> Result<u64> {
    let workers = std::thread::available_parallelism().map_or(2, |t| t.get());
    let next = AtomicUsize::new(1);
    let results: Vec<std::io::Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> std::io::Result<u64> {
                    let mut written = 0;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i > n {
                            return Ok(written);
                        }
                        let name = package_name(i);
                        for k in 0..v {
                            let ver = format!("1.{k}.0");
                            let bytes = niso_archive(&name, &ver, 512);
                            written += bytes.len() as u64;
                            fs::write(dir.join(format!("{name}-{ver}-{ARCH}.niso")), bytes)?;
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("archive writer panicked"))
            .collect()
    });
    let mut total = 0;
    for r in results {
        total += r?;
    }
    Ok(total)
}

fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs is plain data; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!("statvfs: {}", std::io::Error::last_os_error()).into());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

// ---------------------------------------------------------------------------
// HTTP.

fn http_client(timeout: Option<Duration>) -> Result<reqwest::blocking::Client> {
    Ok(reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .pool_max_idle_per_host(4)
        .build()?)
}

/// A keep-alive HTTP/1.1 connection that only makes uploads: the request is
/// written in one go and the response read by its `Content-Length`. The
/// upload runs measure the server, and the clients share its two CPUs; a
/// reqwest blocking client per thread (its own runtime thread, channels
/// between them) took 15 % of the machine at 620 uploads/s.
struct UploadConn {
    addr: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl UploadConn {
    fn new(server: &Server) -> Self {
        Self {
            addr: server.addr.clone(),
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// POSTs `body` to `path`; returns the status and the response body.
    fn post(&mut self, path: &str, body: &[u8], timeout: Duration) -> Result<(u16, Vec<u8>)> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {ADMIN_KEY}\r\n\
             content-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        // A kept connection the server has closed meanwhile gets one more
        // try on a new one; a new connection that fails is an error (a
        // second try could publish the upload twice).
        if let Some(stream) = self.stream.take() {
            if let Ok(answer) = self.exchange_keeping(stream, head.as_bytes(), body) {
                return Ok(answer);
            }
        }
        let stream = TcpStream::connect(&self.addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        self.exchange_keeping(stream, head.as_bytes(), body)
    }

    /// One exchange; the connection is kept for the next if the server
    /// keeps it open.
    fn exchange_keeping(
        &mut self,
        stream: TcpStream,
        head: &[u8],
        body: &[u8],
    ) -> Result<(u16, Vec<u8>)> {
        let (status, answer, keep) = self.exchange(&stream, head, body)?;
        if keep {
            self.stream = Some(stream);
        }
        Ok((status, answer))
    }

    fn exchange(
        &mut self,
        mut stream: &TcpStream,
        head: &[u8],
        body: &[u8],
    ) -> Result<(u16, Vec<u8>, bool)> {
        stream.write_all(head)?;
        stream.write_all(body)?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > 64 * 1024 {
                return Err("response head over 64 KiB".into());
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err("connection closed before the response".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&self.buf[..end])?.to_ascii_lowercase();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or("no status in the response")?;
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or("no content-length in the response")?;
        let keep = !head.lines().any(|l| l.starts_with("connection: close"));
        let mut resp = self.buf[end..].to_vec();
        while resp.len() < len {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err("connection closed inside the response body".into());
            }
            resp.extend_from_slice(&chunk[..n]);
        }
        resp.truncate(len);
        Ok((status, resp, keep))
    }
}

/// Uploads `body` as NAME VERSION; returns the round trip (request sent to
/// whole response read).
fn upload(
    conn: &mut UploadConn,
    name: &str,
    version: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<Duration> {
    let path = format!("/v1/packages/{name}/{version}/{ARCH}");
    let t = Instant::now();
    let (status, text) = conn.post(&path, body, timeout)?;
    let elapsed = t.elapsed();
    if status != 201 {
        return Err(format!(
            "POST {path}: {status}: {}",
            String::from_utf8_lossy(&text).trim()
        )
        .into());
    }
    Ok(elapsed)
}

/// Uploads `body` as NAME VERSION with reqwest (the big upload streams its
/// body from a file); returns the round trip.
fn upload_streamed(
    client: &reqwest::blocking::Client,
    server: &Server,
    name: &str,
    version: &str,
    body: impl Into<reqwest::blocking::Body>,
) -> Result<Duration> {
    let url = server.url(&format!("/v1/packages/{name}/{version}/{ARCH}"));
    let t = Instant::now();
    let resp = client
        .post(&url)
        .bearer_auth(ADMIN_KEY)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()?;
    let status = resp.status();
    let text = resp.text()?;
    let elapsed = t.elapsed();
    if status != reqwest::StatusCode::CREATED {
        return Err(format!("POST {url}: {status}: {}", text.trim()).into());
    }
    Ok(elapsed)
}

// ---------------------------------------------------------------------------
// The measurements.

struct Tree {
    n: usize,
    root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    archives: usize,
    archive_bytes: u64,
    prepare: Duration,
    build: Duration,
}

fn prepare_tree(cfg: &Config, niso: &Path, n: usize) -> Result<Tree> {
    let tmp = tempfile::Builder::new()
        .prefix("niso-bench-server-")
        .tempdir_in(&cfg.dir)?;
    let root = tmp.path().join("registry");
    eprintln!(
        "== N = {n} × {} releases in {}",
        cfg.versions,
        root.display()
    );
    let t = Instant::now();
    let dd = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(DataDir::init(&root, &RepoName::new("bench")?, None, None))?;
    let archives_dir = dd.public_dir().join("archives");
    fs::create_dir_all(&archives_dir)?;
    let archive_bytes = write_tree_archives(&archives_dir, n, cfg.versions)?;
    syncfs(&archives_dir)?;
    let prepare = t.elapsed();
    let t = Instant::now();
    let out = run_bounded(
        Command::new(niso)
            .args(["registry", "build", "--data-dir"])
            .arg(&root),
        Duration::from_secs(1800),
    )?;
    let build = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("niso registry build failed:\n{stderr}").into());
    }
    let expect = format!("{n} packages, {} releases", n * cfg.versions);
    if !stderr.contains(&expect) {
        return Err(format!("niso registry build said {stderr:?}, expected {expect}").into());
    }
    eprintln!(
        "   {} archives generated in {:.1} s; registry build {:.1} s: {}",
        n * cfg.versions,
        prepare.as_secs_f64(),
        build.as_secs_f64(),
        stderr.trim()
    );
    let keep = cfg.keep;
    Ok(Tree {
        n,
        root,
        _tmp: if keep {
            eprintln!("   keeping {}", tmp.keep().display());
            None
        } else {
            Some(tmp)
        },
        archives: n * cfg.versions,
        archive_bytes,
        prepare,
        build,
    })
}

struct Sequential {
    n: usize,
    client_ms: Vec<f64>,
    server_ms: Vec<f64>,
    archive_bytes: usize,
    cpu_ms_per_upload: f64,
}

/// K uploads, one after the other, of release 1.V.0 of packages spread over
/// the whole name range.
fn sequential(cfg: &Config, server: &Server, tree: &Tree) -> Result<Sequential> {
    let mut conn = UploadConn::new(server);
    let version = format!("1.{}.0", cfg.versions);
    let bodies: Vec<(String, Vec<u8>)> = (0..cfg.uploads)
        .map(|k| {
            let name = package_name(1 + k * tree.n / cfg.uploads);
            let body = niso_archive(&name, &version, cfg.archive_kib * 1024);
            (name, body)
        })
        .collect();
    let archive_bytes = bodies[0].1.len();
    server.take_logged();
    let cpu0 = cpu_time(server.pid())?;
    let deadline = Instant::now() + Duration::from_secs(cfg.max_seconds);
    let mut client_ms = Vec::with_capacity(bodies.len());
    for (name, body) in bodies {
        if Instant::now() > deadline {
            return Err(format!("sequential uploads took more than {} s", cfg.max_seconds).into());
        }
        let rtt = upload(&mut conn, &name, &version, &body, Duration::from_secs(60))?;
        client_ms.push(rtt.as_secs_f64() * 1e3);
    }
    let cpu = cpu_time(server.pid())? - cpu0;
    // The log line is written after the response; give the reader a moment.
    let wait = Instant::now() + Duration::from_secs(5);
    let mut server_ms = Vec::new();
    while Instant::now() < wait {
        server_ms.extend(server.take_logged());
        if server_ms.len() >= client_ms.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "   {} sequential uploads of {} B: p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms (server log p50 {})",
        client_ms.len(),
        archive_bytes,
        percentile(&client_ms, 50.0),
        percentile(&client_ms, 90.0),
        percentile(&client_ms, 100.0),
        fmt_opt_ms(&server_ms, 50.0),
    );
    Ok(Sequential {
        n: tree.n,
        cpu_ms_per_upload: cpu.as_secs_f64() * 1e3 / client_ms.len() as f64,
        client_ms,
        server_ms,
        archive_bytes,
    })
}

struct Throughput {
    clients: usize,
    attempted: usize,
    ok: usize,
    failed: usize,
    first_error: Option<String>,
    wall: Duration,
    latency_ms: Vec<f64>,
    cpu_ms_per_upload: f64,
    client_cpu_ms_per_upload: f64,
    timed_out: bool,
}

/// `total` uploads of distinct releases by `clients` threads, each with its
/// own HTTP client; stops early at `max_seconds`.
fn throughput(
    cfg: &Config,
    server: &Server,
    tree: &Tree,
    clients: usize,
    run: usize,
) -> Result<Throughput> {
    let total = cfg.total;
    let n = tree.n;
    // Run r publishes major version 2 + r; upload j goes to package
    // 1 + j mod N as 2+r.(j div N).0, so every upload is a new release.
    let jobs: Vec<(String, String, Vec<u8>)> = (0..total)
        .map(|j| {
            let name = package_name(1 + j % n);
            let version = format!("{}.{}.0", 2 + run, j / n);
            let body = niso_archive(&name, &version, cfg.archive_kib * 1024);
            (name, version, body)
        })
        .collect();
    let jobs = Mutex::new(jobs.into_iter().map(Some).collect::<Vec<_>>());
    let next = AtomicUsize::new(0);
    let barrier = Barrier::new(clients + 1);
    let limit = Duration::from_secs(cfg.max_seconds);
    let timed_out = AtomicBool::new(false);
    let failures = Mutex::new((0usize, None::<String>));
    let cpu0 = cpu_time(server.pid())?;
    let own0 = own_cpu_time();
    let (latencies, wall) = std::thread::scope(|s| -> Result<(Vec<f64>, Duration)> {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| -> Vec<f64> {
                    let mut conn = UploadConn::new(server);
                    barrier.wait();
                    let start = Instant::now();
                    let mut lat = Vec::new();
                    loop {
                        if start.elapsed() > limit {
                            timed_out.store(true, Ordering::Relaxed);
                            break;
                        }
                        let j = next.fetch_add(1, Ordering::Relaxed);
                        if j >= total {
                            break;
                        }
                        let Some((name, version, body)) = lock(&jobs)[j].take() else {
                            break;
                        };
                        match upload(&mut conn, &name, &version, &body, Duration::from_secs(120)) {
                            Ok(d) => lat.push(d.as_secs_f64() * 1e3),
                            Err(e) => {
                                let mut f = lock(&failures);
                                f.0 += 1;
                                f.1.get_or_insert_with(|| e.to_string());
                            }
                        }
                    }
                    lat
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().map_err(|_| "client thread panicked")?);
        }
        Ok((all, start.elapsed()))
    })?;
    let cpu = cpu_time(server.pid())? - cpu0;
    let own = own_cpu_time().saturating_sub(own0);
    let (failed, first_error) = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    let attempted = next.load(Ordering::Relaxed).min(total);
    let ok = latencies.len();
    let r = Throughput {
        clients,
        attempted,
        ok,
        failed,
        first_error,
        wall,
        cpu_ms_per_upload: cpu.as_secs_f64() * 1e3 / ok.max(1) as f64,
        client_cpu_ms_per_upload: own.as_secs_f64() * 1e3 / ok.max(1) as f64,
        latency_ms: latencies,
        timed_out: timed_out.load(Ordering::Relaxed),
    };
    eprintln!(
        "   {} client(s): {} uploads ok, {} failed in {:.2} s = {:.1} uploads/s; p50 {:.1} ms, p99 {:.1} ms{}",
        clients,
        r.ok,
        r.failed,
        r.wall.as_secs_f64(),
        r.ok as f64 / r.wall.as_secs_f64(),
        percentile_or_nan(&r.latency_ms, 50.0),
        percentile_or_nan(&r.latency_ms, 99.0),
        if r.timed_out {
            " (stopped at the time bound)"
        } else {
            ""
        }
    );
    if let Some(e) = &r.first_error {
        eprintln!("   first failure: {e}");
    }
    Ok(r)
}

enum BigUpload {
    Skipped(String),
    Done {
        bytes: u64,
        hwm_before_kib: u64,
        rss_before_kib: u64,
        hwm_after_kib: u64,
        rss_after_kib: u64,
        sampled_max_rss_kib: u64,
        upload: Duration,
        generate: Duration,
        cleaned: bool,
    },
}

/// The big archive, made by `niso package`'s own code path
/// ([`niso::archive::niso::create`]) with a raised archive limit; `niso
/// package` itself refuses an archive over its default 1 GiB limit, which
/// a 1 GiB incompressible payload exceeds by its gzip and tar framing.
fn make_big_archive(dir: &Path, mib: u64) -> Result<PathBuf> {
    let pkg = dir.join("pkg");
    fs::create_dir_all(pkg.join("payload/bin"))?;
    fs::write(
        pkg.join("niso.toml"),
        format!(
            "[package]\nname = \"big-upload\"\nversion = \"1.0.0\"\narch = \"{ARCH}\"\n\
             description = \"Big upload\"\n\n[binary]\nentrypoint = \"bin/app\"\n"
        ),
    )?;
    let payload = pkg.join("payload/bin/app");
    {
        let f = fs::File::create(&payload)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let mut rng = common::SplitMix(0x05ee_db16_0b0e);
        let mut buf = vec![0u8; 4 << 20];
        let mut left = mib << 20;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..k]);
            w.write_all(&buf[..k])?;
            left -= k as u64;
        }
        w.flush()?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&payload, fs::Permissions::from_mode(0o755))?;
    }
    let out = dir.join("out");
    fs::create_dir_all(&out)?;
    let limits = Limits {
        max_archive: 1 << 40,
        ..Limits::default()
    };
    let made = niso::archive::niso::create(&pkg, &out, &limits);
    fs::remove_dir_all(&pkg)?;
    let (path, _) = made?;
    Ok(path)
}

fn big_upload(cfg: &Config, niso: &Path, tree: &Tree) -> Result<BigUpload> {
    let free = free_bytes(&cfg.dir)?;
    let need = (cfg.big_mib << 20) * 3 + (2 << 30);
    if free < (5u64 << 30).max(need) {
        let reason = format!(
            "skipped: {:.1} GiB free under {}, the big upload needs at least {:.1} GiB",
            free as f64 / (1u64 << 30) as f64,
            cfg.dir.display(),
            (5u64 << 30).max(need) as f64 / (1u64 << 30) as f64
        );
        eprintln!("   big upload {reason}");
        return Ok(BigUpload::Skipped(reason));
    }
    let work = tree.root.parent().unwrap_or(&cfg.dir).join("big");
    eprintln!(
        "   making a {} MiB archive of random bytes in {}",
        cfg.big_mib,
        work.display()
    );
    let t = Instant::now();
    let archive = make_big_archive(&work, cfg.big_mib);
    let result = archive.and_then(|archive| {
        let generate = t.elapsed();
        let bytes = fs::metadata(&archive)?.len();
        syncfs(&work)?;
        let r = measure_big(cfg, niso, tree, &archive, bytes, generate);
        let _ = fs::remove_file(&archive);
        r
    });
    let _ = fs::remove_dir_all(&work);
    result
}

fn measure_big(
    cfg: &Config,
    niso: &Path,
    tree: &Tree,
    archive: &Path,
    bytes: u64,
    generate: Duration,
) -> Result<BigUpload> {
    let max_upload = ((cfg.big_mib << 20) * 2).max(2 << 30).to_string();
    let server = Server::start(
        niso,
        &tree.root,
        &["--max-upload", &max_upload],
        "warn",
        cfg.server_log_file.as_deref(),
    )?;
    let pid = server.pid();
    // Let the runtime settle, then read the baseline.
    std::thread::sleep(Duration::from_millis(500));
    let (hwm_before_kib, rss_before_kib) = vm_status(pid)?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut max = 0;
            let end = Instant::now() + Duration::from_secs(3600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                max = max.max(vm_rss(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(10));
            }
            max
        })
    };
    let client = http_client(Some(Duration::from_secs(1800)))?;
    eprintln!("   uploading {bytes} bytes");
    let uploaded = upload_streamed(
        &client,
        &server,
        "big-upload",
        "1.0.0",
        fs::File::open(archive)?,
    );
    stop.store(true, Ordering::Relaxed);
    let sampled_max_rss_kib = sampler.join().unwrap_or(0);
    let (hwm_after_kib, rss_after_kib) = vm_status(pid)?;
    let upload_time = uploaded.map_err(|e| format!("{e}\n{}", server.tail_text()))?;
    // Take the 1 GiB back out of the tree through the API.
    let resp = client
        .delete(server.url(&format!("/v1/packages/big-upload/1.0.0/{ARCH}")))
        .bearer_auth(ADMIN_KEY)
        .send()?;
    let deleted = resp.status().is_success();
    let _ = resp.text();
    server.stop()?;
    let public = tree.root.join("public");
    let leftovers = [
        public.join(format!("archives/big-upload-1.0.0-{ARCH}.niso")),
        public.join(format!("v1/packages/big-upload/1.0.0/{ARCH}")),
    ];
    let mut cleaned = deleted;
    for p in &leftovers {
        if p.exists() {
            cleaned = false;
            fs::remove_file(p)?;
        }
    }
    // Anything big left in staging is a leak of the server's.
    for e in fs::read_dir(tree.root.join("staging"))? {
        let e = e?;
        if e.metadata()?.len() > 1 << 20 {
            cleaned = false;
            eprintln!(
                "   warning: {} left in staging; removing it",
                e.path().display()
            );
            fs::remove_file(e.path())?;
        }
    }
    eprintln!(
        "   big upload: {:.1} s; VmHWM {} -> {} KiB (sampled max VmRSS {} KiB)",
        upload_time.as_secs_f64(),
        hwm_before_kib,
        hwm_after_kib,
        sampled_max_rss_kib
    );
    Ok(BigUpload::Done {
        bytes,
        hwm_before_kib,
        rss_before_kib,
        hwm_after_kib,
        rss_after_kib,
        sampled_max_rss_kib,
        upload: upload_time,
        generate,
        cleaned,
    })
}

// ---------------------------------------------------------------------------
// Static serving against nginx.

struct Wrk {
    rps: f64,
    requests: u64,
    non_2xx: u64,
    socket_errors: String,
    latency_avg: String,
}

struct StaticRow {
    path: String,
    bytes: usize,
    niso: Wrk,
    nginx: Wrk,
}

struct StaticResult {
    n: usize,
    nginx_version: String,
    wrk_version: String,
    rows: Vec<StaticRow>,
}

fn tool_version(cmd: &str, args: &[&str]) -> Result<String> {
    let out = run_bounded(Command::new(cmd).args(args), Duration::from_secs(10)).map_err(|e| {
        format!("{cmd} is needed for the static comparison (apt-get install -y wrk nginx), or pass --no-static: {e}")
    })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let first = text.lines().next().unwrap_or("").trim();
    // "nginx version: nginx/1.22.1", "wrk debian/4.1.0-3 [epoll] Copyright …"
    let short = first.strip_prefix("nginx version: ").unwrap_or(first);
    Ok(short
        .split(" Copyright")
        .next()
        .unwrap_or(short)
        .to_string())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    fn start(tree: &Path, work: &Path) -> Result<Self> {
        fs::create_dir_all(work)?;
        let port = free_port()?;
        let w = work.display();
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            // Workers would run as nobody, who cannot enter the 0700 temp dir.
            "user root root;\n"
        } else {
            ""
        };
        let conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes 2;\n{user}\
             pid {w}/nginx.pid;\nerror_log {w}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  etag on;\n\
             \x20 keepalive_requests 1000000;\n  default_type application/octet-stream;\n\
             \x20 client_body_temp_path {w}/client_body;\n  proxy_temp_path {w}/proxy;\n\
             \x20 fastcgi_temp_path {w}/fastcgi;\n  uwsgi_temp_path {w}/uwsgi;\n  scgi_temp_path {w}/scgi;\n\
             \x20 server {{\n    listen 127.0.0.1:{port};\n    root {tree};\n\
             \x20   location / {{ try_files $uri =404; }}\n  }}\n}}\n",
            tree = tree.display()
        );
        let conf_path = work.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let log = fs::File::create(work.join("stderr.log"))?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(work)
            .arg("-e")
            .arg(work.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start nginx: {e}"))?;
        let mut nginx = Nginx { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = nginx.child.try_wait()? {
                let log = fs::read_to_string(work.join("error.log")).unwrap_or_default();
                return Err(format!("nginx exited ({status}):\n{log}").into());
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(nginx);
            }
            if Instant::now() > deadline {
                return Err("nginx did not start listening within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn stop(mut self) -> Result<()> {
        stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(20))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        kill_if_running(&mut self.child);
    }
}

fn run_wrk(cfg: &Config, url: &str, seconds: u64) -> Result<Wrk> {
    let out = run_bounded(
        Command::new("wrk")
            .arg(format!("-t{}", cfg.wrk_threads))
            .arg(format!("-c{}", cfg.wrk_connections))
            .arg(format!("-d{seconds}s"))
            .arg(url),
        Duration::from_secs(seconds + 60),
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "wrk {url} failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let after = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::trim))
    };
    let rps: f64 = after("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let non_2xx = after("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let socket_errors = after("Socket errors:").unwrap_or("none").to_string();
    let latency_avg = after("Latency")
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("?")
        .to_string();
    Ok(Wrk {
        rps,
        requests,
        non_2xx,
        socket_errors,
        latency_avg,
    })
}

/// GET that must answer 200; returns the body.
fn get_200(client: &reqwest::blocking::Client, url: &str) -> Result<Vec<u8>> {
    let resp = client.get(url).send()?;
    let status = resp.status();
    let body = resp.bytes()?.to_vec();
    if status != reqwest::StatusCode::OK {
        return Err(format!("GET {url}: {status}").into());
    }
    Ok(body)
}

fn static_compare(cfg: &Config, niso: &Path, tree: &Tree) -> Result<StaticResult> {
    let wrk_version = tool_version("wrk", &["-v"])?;
    let nginx_version = tool_version("nginx", &["-v"])?;
    let public = tree.root.join("public");
    let work = tree.root.parent().unwrap_or(&cfg.dir).join("nginx");
    // The temp dir is 0700; nginx workers need to reach the tree.
    #[cfg(unix)]
    if let Some(parent) = tree.root.parent() {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(parent, fs::Permissions::from_mode(0o755))?;
    }
    let server = Server::start(
        niso,
        &tree.root,
        &["--read-only"],
        "warn",
        cfg.server_log_file.as_deref(),
    )?;
    let nginx = Nginx::start(&public, &work)?;
    let client = http_client(Some(Duration::from_secs(30)))?;
    let paths = [
        format!("/packages/{}", package_name(1)),
        "/names".to_string(),
        format!(
            "/v1/packages/{}/1.{}.0/{ARCH}",
            package_name(1),
            cfg.versions
        ),
    ];
    let mut rows = Vec::new();
    let result = (|| -> Result<()> {
        for path in &paths {
            let a = get_200(&client, &server.url(path))?;
            let b = get_200(&client, &nginx.url(path))?;
            if a != b {
                return Err(format!("{path}: niso and nginx serve different bytes").into());
            }
        }
        // Warm both up once, unreported.
        run_wrk(cfg, &server.url(&paths[0]), 2)?;
        run_wrk(cfg, &nginx.url(&paths[0]), 2)?;
        for (i, path) in paths.iter().enumerate() {
            let bytes = fs::metadata(public.join(path.trim_start_matches('/')))?.len() as usize;
            // Alternate which server goes first.
            let (niso_run, nginx_run) = if i % 2 == 0 {
                let a = run_wrk(cfg, &server.url(path), cfg.wrk_seconds)?;
                (a, run_wrk(cfg, &nginx.url(path), cfg.wrk_seconds)?)
            } else {
                let b = run_wrk(cfg, &nginx.url(path), cfg.wrk_seconds)?;
                (run_wrk(cfg, &server.url(path), cfg.wrk_seconds)?, b)
            };
            eprintln!(
                "   {path} ({bytes} B): niso {:.0} req/s, nginx {:.0} req/s, ratio {:.3}",
                niso_run.rps,
                nginx_run.rps,
                niso_run.rps / nginx_run.rps
            );
            rows.push(StaticRow {
                path: path.clone(),
                bytes,
                niso: niso_run,
                nginx: nginx_run,
            });
        }
        Ok(())
    })();
    let stopped = server.stop().and(nginx.stop());
    result?;
    stopped?;
    Ok(StaticResult {
        n: tree.n,
        nginx_version,
        wrk_version,
        rows,
    })
}

// ---------------------------------------------------------------------------
// Reporting.

fn percentile_or_nan(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        f64::NAN
    } else {
        percentile(samples, p)
    }
}

fn fmt_opt_ms(samples: &[f64], p: f64) -> String {
    if samples.is_empty() {
        "n/a".into()
    } else {
        format!("{:.2} ms", percentile(samples, p))
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

struct Results {
    niso: PathBuf,
    source: String,
    /// (phase, 1-minute load average when it started).
    load: Vec<(String, String)>,
    trees: Vec<(usize, usize, u64, Duration, Duration)>,
    sequential: Vec<Sequential>,
    throughput: Vec<(usize, Throughput)>,
    verified: Vec<(usize, bool, String)>,
    big: Option<(usize, BigUpload)>,
    statics: Option<StaticResult>,
}

/// The commit and the uncommitted changes to the server's sources that the
/// measured binary was built from.
fn source_state() -> String {
    let git = |args: &[&str]| -> Option<String> {
        let out = run_bounded(
            Command::new("git")
                .arg("-C")
                .arg(env!("CARGO_MANIFEST_DIR"))
                .args(args),
            Duration::from_secs(20),
        )
        .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown (no git)".into();
    };
    let dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
    ])
    .unwrap_or_default();
    let files: Vec<&str> = dirty.lines().filter_map(|l| l.get(3..)).collect();
    if files.is_empty() {
        format!("commit {head}, no uncommitted changes to src/")
    } else {
        format!(
            "commit {head} plus uncommitted changes to {}",
            files.join(", ")
        )
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn report(cfg: &Config, r: &Results) -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = String::new();
    let _ = writeln!(md, "# niso registry serve benchmark\n");
    let _ = writeln!(
        md,
        "Machine: {nproc} CPUs (`nproc`), `uname -m` {}, CPU {}; trees under {}; binary {}.\n",
        uname_m(),
        cpu_model(),
        cfg.dir.display(),
        r.niso.display()
    );
    let mut command = String::from("cargo bench --bench server");
    if !cfg.args.is_empty() {
        command.push_str(" -- ");
        command.push_str(&cfg.args.join(" "));
    }
    let _ = writeln!(md, "Command: `{command}`\n");
    let _ = writeln!(md, "Server built from {}.\n", r.source);
    let loads: Vec<String> = r.load.iter().map(|(p, l)| format!("{p} {l}")).collect();
    let _ = writeln!(
        md,
        "1-minute load average when each phase started (≈ the benchmark's own load; more means something else was running): {}.\n",
        loads.join(", ")
    );

    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(md, "| measurement | result | target | verdict |");
    let _ = writeln!(md, "|---|---|---|---|");
    for s in &r.sequential {
        let p50 = percentile(&s.client_ms, 50.0);
        let _ = writeln!(
            md,
            "| one upload into {} packages (client round trip, {} sequential) | p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms | p50 ≤ 15 ms | {} |",
            s.n,
            s.client_ms.len(),
            p50,
            percentile(&s.client_ms, 90.0),
            percentile(&s.client_ms, 100.0),
            verdict(p50 <= 15.0)
        );
    }
    if r.sequential.len() >= 2 {
        let first = &r.sequential[0];
        let last = &r.sequential[r.sequential.len() - 1];
        let a = percentile(&first.client_ms, 50.0);
        let b = percentile(&last.client_ms, 50.0);
        let _ = writeln!(
            md,
            "| p50 growth {} → {} packages | {:.2} ms → {:.2} ms (×{:.2}) | nearly flat (taken as ≤ ×1.25) | {} |",
            first.n,
            last.n,
            a,
            b,
            b / a,
            verdict(b / a <= 1.25)
        );
    }
    let mut single = None;
    let mut most = None;
    for (n, t) in &r.throughput {
        let rate = t.ok as f64 / t.wall.as_secs_f64();
        if t.clients == 1 {
            single = Some(rate);
        }
        if most.is_none_or(|(c, _)| t.clients > c) {
            most = Some((t.clients, rate));
        }
        let _ = writeln!(
            md,
            "| uploads/s, {} client(s), ~{} KiB archives, {} packages | {:.1}/s ({} ok, {} failed in {:.2} s); p50 {:.1} ms, p99 {:.1} ms | {} | {} |",
            t.clients,
            cfg.archive_kib,
            n,
            rate,
            t.ok,
            t.failed,
            t.wall.as_secs_f64(),
            percentile_or_nan(&t.latency_ms, 50.0),
            percentile_or_nan(&t.latency_ms, 99.0),
            if t.clients >= 32 { "≥ 1,000/s" } else { "—" },
            if t.clients >= 32 {
                verdict(rate >= 1000.0 && t.failed == 0)
            } else {
                "—"
            }
        );
    }
    if let (Some(one), Some((c, many))) = (single, most) {
        if c > 1 {
            let _ = writeln!(
                md,
                "| group-commit gain, {c} clients vs 1 | ×{:.2} uploads/s | — | — |",
                many / one
            );
        }
    }
    match &r.big {
        Some((
            _,
            BigUpload::Done {
                bytes,
                hwm_before_kib,
                hwm_after_kib,
                upload,
                ..
            },
        )) => {
            let _ = writeln!(
                md,
                "| server peak RSS (VmHWM) during a {:.2} GiB upload | {:.1} MiB before → {:.1} MiB after; upload {:.1} s ({:.0} MiB/s) | ≤ 64 MiB | {} |",
                *bytes as f64 / (1u64 << 30) as f64,
                mib(*hwm_before_kib),
                mib(*hwm_after_kib),
                upload.as_secs_f64(),
                *bytes as f64 / (1 << 20) as f64 / upload.as_secs_f64(),
                verdict(mib(*hwm_after_kib) <= 64.0)
            );
        }
        Some((_, BigUpload::Skipped(reason))) => {
            let _ = writeln!(
                md,
                "| server peak RSS during a big upload | {reason} | ≤ 64 MiB | — |"
            );
        }
        None => {}
    }
    if let Some(s) = &r.statics {
        for row in &s.rows {
            let ratio = row.niso.rps / row.nginx.rps;
            let _ = writeln!(
                md,
                "| static `GET {}` ({} B), {} packages | niso {:.0} req/s, nginx {:.0} req/s: ×{:.3} | ≥ 0.8 × nginx | {} |",
                row.path,
                row.bytes,
                s.n,
                row.niso.rps,
                row.nginx.rps,
                ratio,
                verdict(ratio >= 0.8)
            );
        }
    }

    let _ = writeln!(md, "\n## Details\n");
    let _ = writeln!(
        md,
        "Trees: `DataDir::init`, N × {} generated `.niso` archives (512 B payload) in `public/archives/`, then `niso registry build --data-dir` (setup, not a result).\n",
        cfg.versions
    );
    let _ = writeln!(
        md,
        "| N packages | archives | MiB | generate s | `registry build` s | tree verifies after the run |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---|");
    for (n, archives, bytes, gen, build) in &r.trees {
        let verified = r.verified.iter().find(|(m, _, _)| m == n).map_or(
            "not checked".to_string(),
            |(_, ok, msg)| {
                if *ok {
                    "yes (`niso registry verify`)".into()
                } else {
                    format!("**no**: {msg}")
                }
            },
        );
        let _ = writeln!(
            md,
            "| {n} | {archives} | {:.1} | {:.1} | {:.1} | {verified} |",
            *bytes as f64 / (1 << 20) as f64,
            gen.as_secs_f64(),
            build.as_secs_f64()
        );
    }
    let _ = writeln!(
        md,
        "\nSequential uploads: `niso registry serve --rate-limit-key 0 --rate-limit-ip 0` (log level info, its default), one keep-alive connection (the throughput runs' minimal HTTP/1.1 client), each upload a new release of an existing package spread over the name range. Client = request sent to response read; server = the `ms` the server logs for the request (handler and middleware, body included). Server CPU = its user+system time over the run / uploads.\n"
    );
    let _ = writeln!(
        md,
        "| N | uploads | archive B | client min / p50 / p90 / max ms | server-logged p50 / p90 / max ms | first upload ms | server CPU ms per upload |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|");
    for s in &r.sequential {
        let logged = if s.server_ms.is_empty() {
            "n/a".to_string()
        } else {
            format!(
                "{:.2} / {:.2} / {:.2}",
                percentile(&s.server_ms, 50.0),
                percentile(&s.server_ms, 90.0),
                percentile(&s.server_ms, 100.0)
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2} / {:.2} / {:.2} / {:.2} | {logged} | {:.2} | {:.2} |",
            s.n,
            s.client_ms.len(),
            s.archive_bytes,
            percentile(&s.client_ms, 0.0),
            percentile(&s.client_ms, 50.0),
            percentile(&s.client_ms, 90.0),
            percentile(&s.client_ms, 100.0),
            s.client_ms[0],
            s.cpu_ms_per_upload
        );
    }
    if !r.throughput.is_empty() {
        let _ = writeln!(
            md,
            "\nThroughput: C threads, each with its own keep-alive connection (a minimal HTTP/1.1 client: the request written in one go, the response read by its length), take the next of {} prepared uploads (distinct package/version pairs, {} KiB random payload) until none is left or {} s pass. uploads/s = successful uploads / wall time from the start barrier to the last thread's end.\n",
            cfg.total, cfg.archive_kib, cfg.max_seconds
        );
        let _ = writeln!(
            md,
            "| N | clients | attempted | ok | failed | wall s | uploads/s | latency p50 / p90 / p99 / max ms | server CPU ms per upload | clients' CPU ms per upload | note |"
        );
        let _ = writeln!(
            md,
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for (n, t) in &r.throughput {
            let mut note = String::new();
            if t.timed_out {
                note.push_str("stopped at the time bound");
            }
            if let Some(e) = &t.first_error {
                if !note.is_empty() {
                    note.push_str("; ");
                }
                let _ = write!(note, "first failure: {}", e.replace('|', "/"));
            }
            let _ = writeln!(
                md,
                "| {n} | {} | {} | {} | {} | {:.2} | {:.1} | {:.1} / {:.1} / {:.1} / {:.1} | {:.2} | {:.2} | {} |",
                t.clients,
                t.attempted,
                t.ok,
                t.failed,
                t.wall.as_secs_f64(),
                t.ok as f64 / t.wall.as_secs_f64(),
                percentile_or_nan(&t.latency_ms, 50.0),
                percentile_or_nan(&t.latency_ms, 90.0),
                percentile_or_nan(&t.latency_ms, 99.0),
                percentile_or_nan(&t.latency_ms, 100.0),
                t.cpu_ms_per_upload,
                t.client_cpu_ms_per_upload,
                if note.is_empty() { "—".into() } else { note }
            );
        }
    }
    match &r.big {
        Some((
            n,
            BigUpload::Done {
                bytes,
                hwm_before_kib,
                rss_before_kib,
                hwm_after_kib,
                rss_after_kib,
                sampled_max_rss_kib,
                upload,
                generate,
                cleaned,
            },
        )) => {
            let _ = writeln!(
                md,
                "\nBig upload: a fresh `serve --max-upload {}` on the {n}-package tree (log level warn); a `.niso` of {} MiB of random bytes made with `niso::archive::niso::create` (the code of `niso package`, archive limit raised) in {:.1} s, streamed from the file with `reqwest::blocking::Body::from(File)`; `VmHWM`/`VmRSS` from `/proc/PID/status`, VmRSS also sampled every 10 ms during the upload. Upload time includes the server's check of the whole archive and its publish. The archive was then deleted through the API{}.\n",
                ((cfg.big_mib << 20) * 2).max(2 << 30),
                cfg.big_mib,
                generate.as_secs_f64(),
                if *cleaned { " and no copy was left" } else { "; **copies were left behind and removed by the benchmark**" }
            );
            let _ = writeln!(
                md,
                "| body bytes | VmHWM before MiB | VmRSS before MiB | VmHWM after MiB | VmRSS after MiB | max sampled VmRSS MiB | upload s | MiB/s |"
            );
            let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|");
            let _ = writeln!(
                md,
                "| {bytes} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} |",
                mib(*hwm_before_kib),
                mib(*rss_before_kib),
                mib(*hwm_after_kib),
                mib(*rss_after_kib),
                mib(*sampled_max_rss_kib),
                upload.as_secs_f64(),
                *bytes as f64 / (1 << 20) as f64 / upload.as_secs_f64()
            );
        }
        Some((_, BigUpload::Skipped(reason))) => {
            let _ = writeln!(md, "\nBig upload {reason}.");
        }
        None => {}
    }
    if let Some(s) = &r.statics {
        let _ = writeln!(
            md,
            "\nStatic serving on the {}-package tree: `niso registry serve --read-only --rate-limit-key 0 --rate-limit-ip 0` (log level warn) and {} (`daemon off`, 2 workers, `access_log off`, `sendfile on`, `etag on`, `keepalive_requests 1000000`, `root` = the same `public/`), same bytes checked with one GET each (200 from both). Each cell is one `wrk -t{} -c{} -d{}s` run ({}); the servers take turns, first one then the other, alternating per URL. wrk runs on the same {} CPUs.\n",
            s.n,
            s.nginx_version,
            cfg.wrk_threads,
            cfg.wrk_connections,
            cfg.wrk_seconds,
            s.wrk_version,
            nproc
        );
        let _ = writeln!(
            md,
            "| path | bytes | niso req/s | nginx req/s | niso / nginx | niso requests, non-2xx, socket errors, avg latency | nginx requests, non-2xx, socket errors, avg latency |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---|---|");
        for row in &s.rows {
            let cell = |w: &Wrk| {
                format!(
                    "{}, {}, {}, {}",
                    w.requests, w.non_2xx, w.socket_errors, w.latency_avg
                )
            };
            let _ = writeln!(
                md,
                "| `{}` | {} | {:.0} | {:.0} | {:.3} | {} | {} |",
                row.path,
                row.bytes,
                row.niso.rps,
                row.nginx.rps,
                row.niso.rps / row.nginx.rps,
                cell(&row.niso),
                cell(&row.nginx)
            );
        }
    }
    md
}

// ---------------------------------------------------------------------------

fn main() {
    if let Err(e) = run() {
        eprintln!("bench server: {e}");
        std::process::exit(1);
    }
}

fn verify_tree(niso: &Path, root: &Path) -> Result<(bool, String)> {
    let out = run_bounded(
        Command::new(niso)
            .args(["registry", "verify"])
            .arg(root)
            .arg("--public-key")
            .arg(root.join("public/public_key"))
            .args(["--name", "bench"]),
        Duration::from_secs(600),
    )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: String = text.lines().take(5).collect::<Vec<_>>().join(" / ");
    Ok((out.status.success(), summary.replace('|', "/")))
}

fn run() -> Result<()> {
    let cfg = parse_args()?;
    if cfg.statics {
        // Fail before minutes of work rather than after.
        tool_version("wrk", &["-v"])?;
        tool_version("nginx", &["-v"])?;
    }
    let niso = match &cfg.niso {
        Some(p) => p.clone(),
        None => build_niso()?,
    };
    if !niso.is_file() {
        return Err(format!("{} does not exist", niso.display()).into());
    }
    eprintln!("niso binary: {}", niso.display());
    let mut results = Results {
        niso: niso.clone(),
        source: source_state(),
        load: Vec::new(),
        trees: Vec::new(),
        sequential: Vec::new(),
        throughput: Vec::new(),
        verified: Vec::new(),
        big: None,
        statics: None,
    };
    // 1. Every size's trees and sequential uploads first, so the heavy runs
    //    below (thousands of uploads, 1 GiB through the page cache) cannot
    //    disturb them.
    let mut trees = Vec::new();
    for &n in &cfg.packages {
        let tree = prepare_tree(&cfg, &niso, n)?;
        results.trees.push((
            n,
            tree.archives,
            tree.archive_bytes,
            tree.prepare,
            tree.build,
        ));
        results
            .load
            .push((format!("sequential uploads, N = {n}"), loadavg(1)));
        let server = Server::for_uploads(&cfg, &niso, &tree.root)?;
        let seq = sequential(&cfg, &server, &tree);
        let seq = seq.map_err(|e| format!("{e}\n{}", server.tail_text()))?;
        results.sequential.push(seq);
        server.stop()?;
        trees.push(tree);
    }
    // 2. Throughput on the smallest tree, then check it.
    let small = &trees[0];
    if !cfg.clients.is_empty() {
        eprintln!("== throughput on {} packages", small.n);
        results.load.push(("throughput".into(), loadavg(1)));
        let server = Server::for_uploads(&cfg, &niso, &small.root)?;
        for (run, &c) in cfg.clients.iter().enumerate() {
            let t = throughput(&cfg, &server, small, c, run)?;
            results.throughput.push((small.n, t));
        }
        server.stop()?;
    }
    for tree in &trees {
        let (ok, msg) = verify_tree(&niso, &tree.root)?;
        eprintln!("   {} packages: tree verifies: {ok} {msg}", tree.n);
        results.verified.push((tree.n, ok, msg));
    }
    // 3. Memory during a big upload, on the smallest tree.
    if cfg.big_mib > 0 {
        eprintln!("== big upload on {} packages", small.n);
        results.load.push(("big upload".into(), loadavg(1)));
        results.big = Some((small.n, big_upload(&cfg, &niso, small)?));
    }
    // 4. Static serving of the largest tree.
    if cfg.statics {
        let large = &trees[trees.len() - 1];
        eprintln!("== static serving of {} packages", large.n);
        results.load.push(("static serving".into(), loadavg(1)));
        results.statics = Some(static_compare(&cfg, &niso, large)?);
    }
    drop(trees);
    results.load.push(("end".into(), loadavg(1)));
    let md = report(&cfg, &results);
    print!("{md}");
    if let Some(parent) = cfg.out.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&cfg.out, &md)?;
    eprintln!("wrote {}", cfg.out.display());
    Ok(())
}
