//! Mirror benchmark: `niso registry mirror` of an N × V-release repository
//! over loopback, beside `rsync -a` of the same tree, in the same run.
//!
//! ```text
//! cargo bench --bench mirror                          # 1,000 × 5 = 5,000 releases
//! cargo bench --bench mirror -- --packages 200 --rounds 1
//! cargo bench --bench mirror -- --help
//! ```
//!
//! It:
//!
//! 1. creates a data directory, writes N × V small but real `.niso`
//!    archives into `public/archives/` and runs `niso registry build` (not
//!    timed);
//! 2. serves the tree over 127.0.0.1 twice: nginx (the mirror's source, as
//!    a static host would serve it) and an rsync daemon (rsync's);
//! 3. for each round, alternating which goes first, times `rsync -a
//!    rsync://…/tree/ FRESH_DIR/` and `niso registry mirror --from URL --to
//!    FRESH_DIR` (which checks every signature, digest and archive), each a
//!    child process reaped with `wait4` for its CPU times;
//! 4. times both again on their first copy (nothing changed), checks that
//!    the copies hold the same files, and runs `niso registry verify` on the
//!    mirror;
//! 5. prints a Markdown report and writes it to `target/bench-mirror.md`.
//!
//! Every figure printed is measured by this run.

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use common::{cpu_model, loadavg, niso_archive, percentile, syncfs, uname_m, ARCH};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const USAGE: &str = "\
usage: cargo bench --bench mirror -- [options]

  --packages N     packages (default 1000)
  --versions V     releases per package (default 5)
  --payload BYTES  size of each archive's entrypoint (default 4096)
  --rounds R       timed rounds of each tool (default 3)
  --jobs J[,J...]  the mirror's --jobs; several are each timed every round
                   (default: the mirror's own default)
  --dir PATH       where to create the trees (default: the temp dir)
  --niso PATH      the niso binary to run (default: the one cargo built)
  --out PATH       report file (default: target/bench-mirror.md)
  --keep           keep the trees
";

struct Config {
    packages: usize,
    versions: usize,
    payload: usize,
    rounds: usize,
    /// The mirror's `--jobs` values to time (`None`: its default).
    jobs: Vec<Option<usize>>,
    dir: PathBuf,
    niso: PathBuf,
    out: PathBuf,
    keep: bool,
    args: Vec<String>,
}

fn parse_args() -> Result<Config> {
    let mut cfg = Config {
        packages: 1000,
        versions: 5,
        payload: 4096,
        rounds: 3,
        jobs: Vec::new(),
        dir: std::env::temp_dir(),
        niso: PathBuf::from(env!("CARGO_BIN_EXE_niso")),
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-mirror.md"),
        keep: false,
        args: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        // cargo passes --bench to every bench target; it means nothing here.
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
            "--packages" => cfg.packages = value("--packages")?.replace('_', "").parse()?,
            "--versions" => cfg.versions = value("--versions")?.parse()?,
            "--payload" => cfg.payload = value("--payload")?.parse()?,
            "--rounds" => cfg.rounds = value("--rounds")?.parse()?,
            "--jobs" => {
                for j in value("--jobs")?.split(',') {
                    cfg.jobs.push(Some(j.trim().parse()?));
                }
            }
            "--dir" => cfg.dir = value("--dir")?.into(),
            "--niso" => cfg.niso = value("--niso")?.into(),
            "--out" => cfg.out = value("--out")?.into(),
            "--keep" => cfg.keep = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    if cfg.jobs.is_empty() {
        cfg.jobs.push(None);
    }
    if cfg.packages == 0 || cfg.versions == 0 || cfg.rounds == 0 {
        return Err("--packages, --versions and --rounds must be at least 1".into());
    }
    if !cfg.niso.is_file() {
        return Err(format!(
            "{} does not exist: run this through `cargo bench --bench mirror`, which builds it, or pass --niso",
            cfg.niso.display()
        )
        .into());
    }
    Ok(cfg)
}

// ---------------------------------------------------------------------------
// Child processes, measured.

struct ChildRun {
    wall: Duration,
    cpu: Duration,
    stdout: String,
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// Runs `cmd` to completion, reaping it with `wait4` so the CPU time is
/// this child's (and its children's: rsync's receiver forks).
fn run_measured(cmd: &mut Command) -> Result<ChildRun> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut stdout)?;
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr)?;
    }
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our unreaped child; the pointers are to locals.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if rc == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("wait4: {err}").into());
        }
    }
    let wall = start.elapsed();
    drop(child);
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(format!("{cmd:?} failed (wait status {status}):\n{stdout}{stderr}").into());
    }
    Ok(ChildRun {
        wall,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        stdout,
    })
}

// ---------------------------------------------------------------------------
// The servers.

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_listening(child: &mut Child, port: u16, what: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            let log = fs::read_to_string(log).unwrap_or_default();
            return Err(format!("{what} exited ({status}):\n{log}").into());
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{what} did not start listening within 20 s").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx serving the tree as files (two workers, sendfile, ETags).
fn nginx(tree: &Path, work: &Path) -> Result<Server> {
    fs::create_dir_all(work)?;
    let port = free_port()?;
    let w = work.display();
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
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
    let mut child = Command::new("nginx")
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
        .map_err(|e| format!("cannot start nginx (apt-get install nginx): {e}"))?;
    wait_listening(&mut child, port, "nginx", &work.join("error.log"))?;
    Ok(Server { child, port })
}

/// An rsync daemon with one read-only module, `tree`.
fn rsync_daemon(tree: &Path, work: &Path) -> Result<Server> {
    fs::create_dir_all(work)?;
    let port = free_port()?;
    // SAFETY: geteuid has no preconditions.
    let ids = if unsafe { libc::geteuid() } == 0 {
        // As root it would read the tree as nobody otherwise.
        "uid = root\ngid = root\n"
    } else {
        ""
    };
    let conf = format!(
        "use chroot = no\n{ids}log file = {log}\npid file = {pid}\n\n[tree]\npath = {tree}\nread only = yes\n",
        log = work.join("rsyncd.log").display(),
        pid = work.join("rsyncd.pid").display(),
        tree = tree.display()
    );
    let conf_path = work.join("rsyncd.conf");
    fs::write(&conf_path, conf)?;
    let mut child = Command::new("rsync")
        .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--config={}", conf_path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start rsync (apt-get install rsync): {e}"))?;
    wait_listening(&mut child, port, "rsync --daemon", &work.join("rsyncd.log"))?;
    Ok(Server { child, port })
}

// ---------------------------------------------------------------------------
// The tree.

fn generate(root: &Path, cfg: &Config) -> Result<(usize, u64)> {
    let archives = root.join("public/archives");
    fs::create_dir_all(&archives)?;
    let width = cfg.packages.to_string().len();
    let mut bytes = 0u64;
    let mut count = 0;
    for i in 1..=cfg.packages {
        let name = format!("pkg-{i:0width$}");
        for k in 0..cfg.versions {
            let version = format!("1.{k}.0");
            let data = niso_archive(&name, &version, cfg.payload);
            bytes += data.len() as u64;
            count += 1;
            fs::write(archives.join(format!("{name}-{version}-{ARCH}.niso")), data)?;
        }
    }
    Ok((count, bytes))
}

/// Relative path → size of every file under `root`.
fn listing(root: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| {
            let rel = e
                .path()
                .strip_prefix(root)
                .ok()?
                .to_string_lossy()
                .into_owned();
            let len = e.metadata().ok()?.len();
            Some((rel, len))
        })
        .collect();
    v.sort();
    v
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn main() -> Result<()> {
    let cfg = parse_args()?;
    let work = tempfile::Builder::new()
        .prefix("niso-bench-mirror-")
        .tempdir_in(&cfg.dir)?;
    let base = work.path().to_path_buf();
    let data = base.join("data");
    let mut report = String::new();
    let load_start = loadavg(3);
    writeln!(
        report,
        "# Mirror benchmark\n\n`cargo bench --bench mirror -- {}`\n\nMachine: {} ({}), {} CPUs; load average at start {load_start}. Trees in {}.\n",
        cfg.args.join(" "),
        cpu_model(),
        uname_m(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cfg.dir.display()
    )?;

    // 1. The source tree.
    let out = Command::new(&cfg.niso)
        .args(["registry", "init", "--data-dir"])
        .arg(&data)
        .args(["--name", "bench"])
        .output()?;
    if !out.status.success() {
        return Err(format!("registry init: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let started = Instant::now();
    let (releases, archive_bytes) = generate(&data, &cfg)?;
    let build = run_measured(
        Command::new(&cfg.niso)
            .args(["registry", "build", "--data-dir"])
            .arg(&data),
    )?;
    let tree = data.join("public");
    syncfs(&tree)?;
    let files = listing(&tree);
    let tree_bytes: u64 = files.iter().map(|(_, n)| n).sum();
    eprintln!(
        "tree: {releases} releases, {} files, {:.1} MB, made in {:.1} s (build {:.1} s)",
        files.len(),
        tree_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        build.wall.as_secs_f64()
    );
    writeln!(
        report,
        "Source: {} packages × {} releases = {releases} `.niso` archives ({:.1} MB; {} B payload each), built by `niso registry build` into {} files, {:.1} MB (the `v1/` downloads are hard links; rsync without `-H` copies them as files).\n",
        cfg.packages,
        cfg.versions,
        archive_bytes as f64 / 1e6,
        cfg.payload,
        files.len(),
        tree_bytes as f64 / 1e6
    )?;

    // 2. The servers.
    let web = nginx(&tree, &base.join("nginx"))?;
    let rsyncd = rsync_daemon(&tree, &base.join("rsyncd"))?;
    let url = format!("http://127.0.0.1:{}", web.port);
    let rsync_url = format!("rsync://127.0.0.1:{}/tree/", rsyncd.port);
    let key = tree.join("public_key");
    let mirror_cmd = |to: &Path, jobs: Option<usize>| {
        let mut c = Command::new(&cfg.niso);
        c.args(["registry", "mirror", "--from", &url, "--to"])
            .arg(to)
            .arg("--public-key")
            .arg(&key)
            .args(["--name", "bench", "--json"])
            .env_remove("NISO_LOG");
        if let Some(j) = jobs {
            c.args(["--jobs", &j.to_string()]);
        }
        c
    };
    let rsync_cmd = |to: &Path| {
        let mut c = Command::new("rsync");
        c.arg("-a")
            .arg(&rsync_url)
            .arg(format!("{}/", to.display()));
        c
    };

    // 3. Rounds, rotating which tool goes first.
    let label = |j: &Option<usize>| match j {
        Some(j) => format!("mirror --jobs {j}"),
        None => "mirror".to_string(),
    };
    writeln!(
        report,
        "Commands (fresh destination each time; rsync from an rsync daemon, the mirror from nginx, both on 127.0.0.1):\n\n    rsync -a {rsync_url} DIR/\n    niso registry mirror --from {url} --to DIR --public-key public_key --name bench --json [--jobs J]\n"
    )?;
    let mut header = "| round | rsync -a s (CPU s) |".to_string();
    let mut rule = "|---:|---:|".to_string();
    for j in &cfg.jobs {
        header.push_str(&format!(" {} s (CPU s) | / rsync |", label(j)));
        rule.push_str("---:|---:|");
    }
    writeln!(report, "{header}\n{rule}")?;
    let tools = cfg.jobs.len() + 1;
    let mut rsync_walls = Vec::new();
    let mut walls: Vec<Vec<f64>> = vec![Vec::new(); cfg.jobs.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); cfg.jobs.len()];
    let mut counts = String::new();
    for r in 0..cfg.rounds {
        // Tool 0 is rsync, tool k the k-th mirror setting; each round
        // starts with the next one.
        let mut runs: Vec<Option<ChildRun>> = (0..tools).map(|_| None).collect();
        for step in 0..tools {
            let t = (r + step) % tools;
            let run = if t == 0 {
                run_measured(&mut rsync_cmd(&base.join(format!("rsync-{r}"))))?
            } else {
                let to = base.join(format!("mirror-{r}-{t}"));
                run_measured(&mut mirror_cmd(&to, cfg.jobs[t - 1]))?
            };
            runs[t] = Some(run);
        }
        let runs: Vec<ChildRun> = runs.into_iter().flatten().collect();
        let rs = &runs[0];
        let first = if r % tools == 0 {
            "rsync".to_string()
        } else {
            label(&cfg.jobs[r % tools - 1])
        };
        let mut row = format!(
            "| {} ({first} first) | {} ({}) |",
            r + 1,
            secs(rs.wall),
            secs(rs.cpu)
        );
        rsync_walls.push(rs.wall.as_secs_f64());
        let mut line = format!("round {r}: rsync {:.2} s", rs.wall.as_secs_f64());
        for (k, mi) in runs[1..].iter().enumerate() {
            let ratio = mi.wall.as_secs_f64() / rs.wall.as_secs_f64();
            row.push_str(&format!(
                " {} ({}) | ×{ratio:.2} |",
                secs(mi.wall),
                secs(mi.cpu)
            ));
            line.push_str(&format!(
                ", {} {:.2} s (×{ratio:.2})",
                label(&cfg.jobs[k]),
                mi.wall.as_secs_f64()
            ));
            walls[k].push(mi.wall.as_secs_f64());
            ratios[k].push(ratio);
            if r == 0 && k == 0 {
                let v: serde_json::Value =
                    serde_json::from_str(mi.stdout.lines().next().unwrap_or("{}"))?;
                counts = format!(
                    "Each mirror fetched {} archives and {} index files and wrote {} other files (links, indexes, documents).",
                    v["fetched"], v["index_fetches"], v["files_written"]
                );
            }
        }
        eprintln!("{line}");
        writeln!(report, "{row}")?;
    }
    writeln!(report, "\n{counts}\n")?;
    writeln!(
        report,
        "Medians (nearest rank): rsync {:.2} s.",
        percentile(&rsync_walls, 50.0)
    )?;
    for (k, j) in cfg.jobs.iter().enumerate() {
        let med = percentile(&ratios[k], 50.0);
        writeln!(
            report,
            "{}: {:.2} s, median ratio ×{med:.2} (target: at most ×1.5, {}).",
            label(j),
            percentile(&walls[k], 50.0),
            if med <= 1.5 { "met" } else { "not met" }
        )?;
    }
    writeln!(report)?;

    // 4. Nothing changed: both again on their first copy.
    let rs = run_measured(&mut rsync_cmd(&base.join("rsync-0")))?;
    let mi = run_measured(&mut mirror_cmd(&base.join("mirror-0-1"), cfg.jobs[0]))?;
    let v: serde_json::Value = serde_json::from_str(mi.stdout.lines().next().unwrap_or("{}"))?;
    writeln!(
        report,
        "Again on the first copy, nothing changed: rsync {} s ({} CPU), mirror {} s ({} CPU; {} archives fetched, {} files written, all {} archives re-hashed).\n",
        secs(rs.wall),
        secs(rs.cpu),
        secs(mi.wall),
        secs(mi.cpu),
        v["fetched"],
        v["files_written"],
        v["kept"]
    )?;

    // 5. The copies agree, and the mirror verifies.
    let a = listing(&base.join("rsync-0"));
    let b = listing(&base.join("mirror-0-1"));
    let same = a == b && a == files;
    let verify = run_measured(
        Command::new(&cfg.niso)
            .args(["registry", "verify"])
            .arg(base.join("mirror-0-1"))
            .arg("--public-key")
            .arg(&key)
            .args(["--name", "bench"]),
    )?;
    writeln!(
        report,
        "Checks: the rsync copy, the mirror and the source hold the same {} files with the same sizes: {}; `niso registry verify` of the mirror: passed in {} s.\n\nLoad average at the end: {}.",
        files.len(),
        if same { "yes" } else { "NO" },
        secs(verify.wall),
        loadavg(3)
    )?;
    drop(web);
    drop(rsyncd);
    print!("{report}");
    if let Some(dir) = cfg.out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&cfg.out, &report)?;
    if cfg.keep {
        let kept = work.keep();
        eprintln!("kept {}", kept.display());
    }
    if !same {
        return Err("the copies differ".into());
    }
    Ok(())
}
