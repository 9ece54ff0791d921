//! Pull benchmark: `niso pull` of a big archive beside `curl` of the same
//! URL, from the same server, into the same file system.
//!
//! ```text
//! cargo bench --bench pull                       # 100 MiB, 7 rounds, serve and nginx
//! cargo bench --bench pull -- --mib 100 --rounds 7 --dir /mnt/jfs
//! cargo bench --bench pull -- --help
//! ```
//!
//! It uses the `niso` binary cargo built for this bench (the bench profile:
//! release), then, in a temp directory it deletes at the end:
//!
//! 1. makes a `.niso` archive of M MiB of bytes that do not compress (so
//!    the archive is M MiB too), publishes it into a new data directory
//!    with `niso registry publish`, and deletes the source archive;
//! 2. serves the tree with `niso registry serve --read-only` and with nginx
//!    (`sendfile on`), both on 127.0.0.1;
//! 3. for each host, after one unmeasured run of each (warm page cache,
//!    and a check that the pulled file is the published one), alternates R
//!    rounds of `curl -sSf -o FILE URL` and `niso pull NAME:VERSION`
//!    (freshness record, bin, signed index, download, SHA-256 and size
//!    against the index, the archive's contents checked, stored with fsync
//!    and rename), which goes first alternating by round. Each run is
//!    timed from spawn to exit, with its user and system CPU (`getrusage`
//!    of the children). Outputs are deleted after each run and the file
//!    system synced before the next, so no run pays for another's writes.
//!
//! It prints a Markdown report and writes it to `target/bench-pull.md`:
//! per host and client the median and fastest wall time, the median user
//! and system CPU, and pull's medians over curl's, of wall time and (in
//! parentheses) of CPU time, which a loaded machine disturbs less.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use common::{cpu_model, loadavg, niso_archive, percentile, syncfs, uname_m, ARCH};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const USAGE: &str = "\
usage: cargo bench --bench pull -- [options]

  --mib M          size of the archive, MiB (default 100)
  --rounds R       measured runs of each client per host (default 7)
  --dir PATH       where to create the temporary tree (default: the temp dir)
  --no-nginx       measure against `niso registry serve` only
  --out PATH       report file (default: target/bench-pull.md)
";

struct Config {
    mib: usize,
    rounds: usize,
    dir: PathBuf,
    nginx: bool,
    out: PathBuf,
    args: Vec<String>,
}

fn parse_args() -> Result<Config> {
    let mut cfg = Config {
        mib: 100,
        rounds: 7,
        dir: std::env::temp_dir(),
        nginx: true,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-pull.md"),
        args: Vec::new(),
    };
    // `cargo bench` passes `--bench` to every bench binary.
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(a) = args.next() {
        cfg.args.push(a.clone());
        let mut value = || -> Result<String> {
            let v = args.next().ok_or(format!("{a} needs a value"))?;
            cfg.args.push(v.clone());
            Ok(v)
        };
        match a.as_str() {
            "--mib" => cfg.mib = value()?.parse()?,
            "--rounds" => cfg.rounds = value()?.parse()?,
            "--dir" => cfg.dir = PathBuf::from(value()?),
            "--out" => cfg.out = PathBuf::from(value()?),
            "--no-nginx" => cfg.nginx = false,
            "--help" | "-h" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other:?}\n{USAGE}").into()),
        }
    }
    if cfg.mib == 0 || cfg.rounds == 0 {
        return Err("--mib and --rounds must be at least 1".into());
    }
    Ok(cfg)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench pull: {e}");
        std::process::exit(2);
    }
}

const NAME: &str = "bench-pull";
const VERSION: &str = "1.0.0";

/// A child process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn niso() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_niso"));
    c.env_remove("NISO_LOG").env_remove("RUST_LOG");
    c
}

fn ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_serve(data: &Path) -> Result<(Guard, String)> {
    let mut child = niso()
        .args([
            "registry",
            "serve",
            "--read-only",
            "--listen",
            "127.0.0.1:0",
        ])
        .args([
            "--rate-limit-ip",
            "0",
            "--rate-limit-key",
            "0",
            "--data-dir",
        ])
        .arg(data)
        .env("NISO_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let guard = Guard(child);
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let addr = loop {
        match lines.next() {
            Some(Ok(line)) => match line.strip_prefix("Listening at http://") {
                Some(a) => break a.trim().to_string(),
                None => seen.push(line),
            },
            _ => return Err(format!("serve exited:\n{}", seen.join("\n")).into()),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok((guard, format!("http://{addr}")))
}

fn start_nginx(tree: &Path, work: &Path) -> Result<(Guard, String)> {
    std::fs::create_dir_all(work)?;
    let port = free_port()?;
    let w = work.display();
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root root;\n"
    } else {
        ""
    };
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\n{user}\
         pid {w}/nginx.pid;\nerror_log {w}/error.log warn;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  etag on;\n  default_type application/octet-stream;\n\
         \x20 client_body_temp_path {w}/client_body;\n  proxy_temp_path {w}/proxy;\n\
         \x20 fastcgi_temp_path {w}/fastcgi;\n  uwsgi_temp_path {w}/uwsgi;\n  scgi_temp_path {w}/scgi;\n\
         \x20 server {{\n    listen 127.0.0.1:{port};\n    root {tree};\n\
         \x20   location / {{ try_files $uri =404; }}\n  }}\n}}\n",
        tree = tree.display()
    );
    let conf_path = work.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let child = Command::new("nginx")
        .arg("-p")
        .arg(work)
        .arg("-e")
        .arg(work.join("error.log"))
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run nginx ({e}); pass --no-nginx to skip it"))?;
    let mut guard = Guard(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = guard.0.try_wait()? {
            let log = std::fs::read_to_string(work.join("error.log")).unwrap_or_default();
            return Err(format!("nginx exited ({status}):\n{log}").into());
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((guard, format!("http://127.0.0.1:{port}")));
        }
        if Instant::now() > deadline {
            return Err("nginx did not start".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wall time and the CPU the child used.
#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: f64,
    user: f64,
    sys: f64,
}

fn children_cpu() -> (f64, f64) {
    // SAFETY: getrusage fills the plain struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(u.ru_utime), secs(u.ru_stime))
}

/// Runs `cmd` to completion (at most 10 minutes), timed.
fn timed(cmd: &mut Command) -> Result<Sample> {
    let (u0, s0) = children_cpu();
    let started = Instant::now();
    let out = cmd.stdin(Stdio::null()).output()?;
    let status = out.status;
    let wall = started.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!(
            "{cmd:?} failed ({status}):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    if wall > 600.0 {
        return Err(format!("{cmd:?} took {wall:.0} s").into());
    }
    let (u1, s1) = children_cpu();
    Ok(Sample {
        wall,
        user: u1 - u0,
        sys: s1 - s0,
    })
}

/// Nearest-rank median (the middle run of an odd count).
fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The client: its own config, data and state directories.
struct Client {
    root: PathBuf,
}

impl Client {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = niso();
        c.args(args)
            .env("HOME", self.root.join("home"))
            .env("XDG_CONFIG_HOME", self.root.join("config"))
            .env("XDG_DATA_HOME", self.root.join("data"))
            .env("XDG_STATE_HOME", self.root.join("state"))
            .env_remove("NISO_REGISTRY")
            .env_remove("NISO_KEY");
        c
    }

    fn store(&self) -> PathBuf {
        self.root.join("data/niso/packages")
    }
}

fn run() -> Result<()> {
    let cfg = parse_args()?;
    let tmp = tempfile::Builder::new()
        .prefix("niso-bench-pull-")
        .tempdir_in(&cfg.dir)?;
    let root = tmp.path();
    let data = root.join("data");
    let mib = 1usize << 20;

    eprintln!("making a {} MiB archive", cfg.mib);
    let archive = root.join(format!("{NAME}-{VERSION}-{ARCH}.niso"));
    std::fs::write(&archive, niso_archive(NAME, VERSION, cfg.mib * mib))?;
    let size = std::fs::metadata(&archive)?.len();
    ok(niso()
        .args(["registry", "init", "--name", "bench", "--data-dir"])
        .arg(&data))?;
    ok(niso()
        .args(["registry", "publish", "--data-dir"])
        .arg(&data)
        .arg(&archive))?;
    let published = sha256_file(&archive)?;
    std::fs::remove_file(&archive)?;
    let tree = data.join("public");
    let rel = format!("archives/{NAME}-{VERSION}-{ARCH}.niso");

    let mut hosts = vec![("niso registry serve --read-only", start_serve(&data)?)];
    if cfg.nginx {
        hosts.push(("nginx", start_nginx(&tree, &root.join("nginx"))?));
    }
    let client = Client {
        root: root.join("client"),
    };
    let curl_out = root.join("curl.out");
    let pulled = client
        .store()
        .join("HOST")
        .join(NAME)
        .join(VERSION)
        .join(format!("{NAME}-{VERSION}-{ARCH}.niso"));

    let mut report = String::new();
    writeln!(
        report,
        "`cargo bench --bench pull -- {}` — {} ({} CPUs, {}), archive {:.1} MiB ({size} bytes), {} rounds, temp dir {}",
        cfg.args.join(" "),
        cpu_model(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        uname_m(),
        size as f64 / mib as f64,
        cfg.rounds,
        cfg.dir.display(),
    )?;
    writeln!(report)?;
    writeln!(
        report,
        "| host | client | wall s, median (min) | MiB/s (median) | user s | sys s | pull / curl, wall (CPU) | load before / after |"
    )?;
    writeln!(report, "|---|---|---:|---:|---:|---:|---:|---|")?;

    for (i, (host, (_guard, url))) in hosts.iter().enumerate() {
        let reg = format!("h{i}");
        ok(client
            .command(&["registry", "add", &reg, url, "--public-key"])
            .arg(tree.join("public_key")))?;
        let pulled = PathBuf::from(pulled.to_string_lossy().replace("HOST", &reg));
        let archive_url = format!("{url}/{rel}");
        let curl = || {
            let mut c = Command::new("curl");
            c.args(["-sS", "-f", "-o"]).arg(&curl_out).arg(&archive_url);
            c
        };
        let want = format!("{NAME}:{VERSION}");
        let pull = || {
            let mut c = client.command(&["pull", &want, "--arch", ARCH, "--registry", &reg]);
            c.env("NISO_LOG", "warn");
            c
        };
        // Unmeasured: warms the page cache, checks both get the bytes.
        timed(&mut curl())?;
        timed(&mut pull())?;
        for (what, file) in [("curl", &curl_out), ("pull", &pulled)] {
            let got = sha256_file(file)?;
            if got != published {
                return Err(format!("{what} wrote {got}, not the published {published}").into());
            }
            std::fs::remove_file(file)?;
        }
        let load_before = loadavg(1);
        let mut curls = Vec::new();
        let mut pulls = Vec::new();
        for round in 0..cfg.rounds {
            let order: [bool; 2] = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for is_curl in order {
                syncfs(root)?;
                let s = if is_curl {
                    timed(&mut curl())?
                } else {
                    timed(&mut pull())?
                };
                let file = if is_curl { &curl_out } else { &pulled };
                if std::fs::metadata(file)?.len() != size {
                    return Err(format!("{} is not {size} bytes", file.display()).into());
                }
                std::fs::remove_file(file)?;
                eprintln!(
                    "{host}: {} {:.3} s (user {:.3}, sys {:.3})",
                    if is_curl { "curl" } else { "pull" },
                    s.wall,
                    s.user,
                    s.sys
                );
                if is_curl {
                    curls.push(s);
                } else {
                    pulls.push(s);
                }
            }
        }
        let load_after = loadavg(1);
        let walls = |v: &[Sample]| v.iter().map(|s| s.wall).collect::<Vec<_>>();
        let (cw, pw) = (walls(&curls), walls(&pulls));
        let cpu = |v: &[Sample]| median(&v.iter().map(|s| s.user + s.sys).collect::<Vec<_>>());
        let ratio = median(&pw) / median(&cw);
        let cpu_ratio = cpu(&pulls) / cpu(&curls);
        for (client_name, samples, w) in [("curl", &curls, &cw), ("niso pull", &pulls, &pw)] {
            writeln!(
                report,
                "| {host} | {client_name} | {:.3} ({:.3}) | {:.0} | {:.3} | {:.3} | {} | {load_before} / {load_after} |",
                median(w),
                min(w),
                size as f64 / mib as f64 / median(w),
                median(&samples.iter().map(|s| s.user).collect::<Vec<_>>()),
                median(&samples.iter().map(|s| s.sys).collect::<Vec<_>>()),
                if client_name == "curl" {
                    String::new()
                } else {
                    format!("{ratio:.2}× ({cpu_ratio:.2}×)")
                },
            )?;
        }
    }
    print!("{report}");
    if let Some(dir) = cfg.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&cfg.out, &report)?;
    eprintln!("report written to {}", cfg.out.display());
    Ok(())
}
