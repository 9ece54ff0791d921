//! Registry benchmark: full and no-op rebuilds, incremental and group-commit
//! publishes, on generated trees of N packages × V releases.
//!
//! ```text
//! cargo bench --bench registry                       # N = 1,000 and 10,000
//! cargo bench --bench registry -- --packages 1000    # one size
//! cargo bench --bench registry -- --help
//! ```
//!
//! For each N it:
//!
//! 1. creates a data directory with [`DataDir::init`] and writes N × V small
//!    but real `.niso` archives straight into `public/archives/` (not timed);
//! 2. runs `niso registry build --data-dir ROOT` as a child process three
//!    times (the first writes everything, the next two change nothing),
//!    measuring each child's wall time and, through `wait4(2)`, its own peak
//!    RSS and CPU time;
//! 3. opens a [`Publisher`] in this process and times single publishes of a
//!    new release of an existing package, then `publish_batch` of uploads of
//!    different packages (group commit);
//! 4. prints a Markdown report and writes it to `target/bench-registry.md`.
//!
//! With `--store URL` (e.g. `s3://BUCKET/PREFIX`, settings from the
//! standard `AWS_*` variables), each size's tree is in that store instead,
//! under a prefix of its own (`URL/niso-bench-PID-N`): the data directory
//! is made with `--store`, the archives are put into the store (not timed),
//! and the rebuilds and publishes go to it.
//!
//! `cargo bench` builds the `niso` binary (with the bench profile, which
//! inherits `release`) before running this program and tells it the path as
//! `CARGO_BIN_EXE_niso`; `--niso PATH` runs another binary instead.
//!
//! Every figure printed is measured by this run; nothing is assumed.

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use common::{cpu_model, loadavg, niso_archive, percentile, syncfs, uname_m, ARCH};
use niso::archive::inspect_file;
use niso::datadir::DataDir;
use niso::ident::RepoName;
use niso::limits::Limits;
use niso::publish::{unix_now, Layout, Options, StagedFile, Upload};
use niso::store::{Body, PutMode, Store, TreePath};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const USAGE: &str = "\
usage: cargo bench --bench registry -- [options]

  --packages N[,N...]  package counts to run (repeatable; default 1000,10000)
  --versions V         releases per package (default 5: 1.0.0 .. 1.4.0)
  --publishes K        single publishes to time (default 20)
  --batch B            uploads per publish_batch (default 32)
  --batches R          publish_batch runs to time (default 5)
  --dir PATH           where to create the temporary trees (default: the temp dir)
  --store URL          put each tree in this store (s3://BUCKET/PREFIX, with
                       the AWS_* variables), under a prefix of its own; the data
                       directories stay under --dir
  --niso PATH          the niso binary to run (default: the one cargo built)
  --out PATH           report file (default: target/bench-registry.md)
  --keep               keep the generated trees
";

struct Config {
    packages: Vec<usize>,
    versions: usize,
    publishes: usize,
    batch: usize,
    batches: usize,
    dir: PathBuf,
    store: Option<String>,
    niso: PathBuf,
    out: PathBuf,
    keep: bool,
    /// The arguments as given, for the report.
    args: Vec<String>,
}

fn parse_args() -> Result<Config> {
    let mut cfg = Config {
        packages: Vec::new(),
        versions: 5,
        publishes: 20,
        batch: 32,
        batches: 5,
        dir: std::env::temp_dir(),
        store: None,
        niso: PathBuf::from(env!("CARGO_BIN_EXE_niso")),
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-registry.md"),
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
            "--packages" => {
                for n in value("--packages")?.split(',') {
                    cfg.packages.push(n.trim().replace('_', "").parse()?);
                }
            }
            "--versions" => cfg.versions = value("--versions")?.parse()?,
            "--publishes" => cfg.publishes = value("--publishes")?.parse()?,
            "--batch" => cfg.batch = value("--batch")?.parse()?,
            "--batches" => cfg.batches = value("--batches")?.parse()?,
            "--dir" => cfg.dir = value("--dir")?.into(),
            "--store" => cfg.store = Some(value("--store")?.trim_end_matches('/').to_string()),
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
    if cfg.packages.is_empty() {
        cfg.packages = vec![1_000, 10_000];
    }
    if cfg.packages.contains(&0) || cfg.versions == 0 || cfg.publishes == 0 {
        return Err("--packages, --versions and --publishes must be at least 1".into());
    }
    if cfg.batch == 0 || cfg.batches == 0 {
        return Err("--batch and --batches must be at least 1".into());
    }
    if !cfg.niso.is_file() {
        return Err(format!(
            "{} does not exist: run this through `cargo bench --bench registry`, which builds it, or pass --niso",
            cfg.niso.display()
        )
        .into());
    }
    Ok(cfg)
}

// ---------------------------------------------------------------------------
// Generating the tree.

fn package_name(i: usize, width: usize) -> String {
    format!("pkg-{i:0width$}")
}

/// The `k`-th release: 1.0.0, 1.1.0, …
fn version(k: usize) -> String {
    format!("1.{k}.0")
}

const PAYLOAD_LEN: usize = 1024;

/// Writes N × V archives into `archives`, on every core; returns the total
/// bytes written.
fn generate(archives: &Path, n: usize, v: usize, width: usize) -> Result<u64> {
    let threads = std::thread::available_parallelism().map_or(2, |t| t.get());
    let results: Vec<std::io::Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> std::io::Result<u64> {
                    let mut bytes = 0u64;
                    for i in (1..=n).skip(t).step_by(threads) {
                        let name = package_name(i, width);
                        for k in 0..v {
                            let ver = version(k);
                            let data = niso_archive(&name, &ver, PAYLOAD_LEN);
                            bytes += data.len() as u64;
                            fs::write(archives.join(format!("{name}-{ver}-{ARCH}.niso")), data)?;
                        }
                    }
                    Ok(bytes)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("generator thread panicked"))
            .collect()
    });
    let mut total = 0;
    for r in results {
        total += r?;
    }
    Ok(total)
}

/// Puts N × V archives into `store`'s `archives/`, 16 at a time; returns
/// the total bytes written.
async fn generate_into(store: Arc<dyn Store>, n: usize, v: usize, width: usize) -> Result<u64> {
    let mut jobs = tokio::task::JoinSet::new();
    let mut total = 0u64;
    let mut next = (1..=n).flat_map(|i| (0..v).map(move |k| (i, k)));
    loop {
        while jobs.len() < 16 {
            let Some((i, k)) = next.next() else { break };
            let store = store.clone();
            jobs.spawn(async move {
                let (name, ver) = (package_name(i, width), version(k));
                let data = niso_archive(&name, &ver, PAYLOAD_LEN);
                let len = data.len() as u64;
                let path = TreePath::new(format!("archives/{name}-{ver}-{ARCH}.niso"))?;
                let attrs = niso::index::layout::attributes(path.as_str(), None);
                store
                    .put(&path, Body::from(data), &attrs, PutMode::Overwrite)
                    .await?;
                Ok::<u64, niso::store::StoreError>(len)
            });
        }
        match jobs.join_next().await {
            Some(r) => total += r??,
            None => return Ok(total),
        }
    }
}

// ---------------------------------------------------------------------------
// Measuring a child process.

struct ChildRun {
    wall: Duration,
    user: Duration,
    sys: Duration,
    /// The child's own peak resident set, KiB (from `wait4`).
    maxrss_kib: i64,
    stderr: String,
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// Runs `cmd` to completion, reaping it with `wait4` so the rusage is this
/// child's alone (RUSAGE_CHILDREN would be the maximum over all children).
fn run_measured(cmd: &mut Command) -> Result<ChildRun> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let mut stderr = String::new();
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
    // The child is reaped; `child` must not be waited on again (dropping a
    // Child does not wait).
    drop(child);
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(format!("{cmd:?} failed (wait status {status}):\n{stderr}").into());
    }
    Ok(ChildRun {
        wall,
        user: tv(ru.ru_utime),
        sys: tv(ru.ru_stime),
        maxrss_kib: ru.ru_maxrss,
        stderr,
    })
}

/// The numbers in `Built REPO: P packages, R releases, A archives (W files
/// written, D removed)`, in order.
fn build_report_numbers(stderr: &str) -> Vec<u64> {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("Built "))
        .unwrap_or("");
    let after_colon = line.split_once(':').map_or("", |(_, r)| r);
    after_colon
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------
// One size.

struct Rebuild {
    run: ChildRun,
    /// packages, releases, archives, files written, files removed.
    report: Vec<u64>,
}

struct SizeResult {
    n: usize,
    releases: usize,
    archives: usize,
    archive_bytes: u64,
    generate: Duration,
    rebuilds: Vec<Rebuild>,
    open: Duration,
    publish_ms: Vec<f64>,
    batch: usize,
    batch_ms: Vec<f64>,
    fs_type: String,
    /// `/proc/loadavg` before the rebuilds and after the publishes: other
    /// work on the machine skews every figure.
    load: (String, String),
}

fn run_size(cfg: &Config, n: usize) -> Result<SizeResult> {
    let v = cfg.versions;
    let width = n.to_string().len().max(5);
    let tmp = tempfile::Builder::new()
        .prefix("niso-bench-")
        .tempdir_in(&cfg.dir)?;
    let root = tmp.path().join("registry");
    // Each size's tree under a prefix of its own in the store.
    let store_url = cfg
        .store
        .as_ref()
        .map(|u| format!("{u}/niso-bench-{}-{n}", std::process::id()));
    let fs_type = match &store_url {
        Some(u) => u.clone(),
        None => fs_type(tmp.path()),
    };
    eprintln!(
        "== N = {n} × {v} releases in {}",
        store_url.as_deref().unwrap_or(&root.display().to_string())
    );

    // 1. Generate (not timed as a result; its time is reported for context).
    let t = Instant::now();
    let name = RepoName::new("bench")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dd = rt.block_on(DataDir::init(&root, &name, None, store_url.as_deref()))?;
    let limits = Limits::default();
    let archive_bytes = match &store_url {
        Some(_) => rt.block_on(generate_into(dd.store(None)?, n, v, width))?,
        None => {
            let archives_dir = dd.public_dir().join("archives");
            fs::create_dir_all(&archives_dir)?;
            let bytes = generate(&archives_dir, n, v, width)?;
            // Make the generated archives durable now, so the first
            // rebuild does not pay for writing them (a real tree's archives
            // are already on disk).
            syncfs(&archives_dir)?;
            // Check one archive with the registry's own reader before
            // measuring.
            let first = archives_dir.join(format!(
                "{}-{}-{ARCH}.niso",
                package_name(1, width),
                version(0)
            ));
            inspect_file(&first, &limits)?;
            bytes
        }
    };
    let generate_time = t.elapsed();
    eprintln!(
        "   generated {} archives ({:.1} MiB) in {:.1} s",
        n * v,
        archive_bytes as f64 / (1 << 20) as f64,
        generate_time.as_secs_f64()
    );

    // 2. Rebuilds, each in a fresh child process.
    let load_before = loadavg(3);
    let mut rebuilds = Vec::new();
    for i in 0..3 {
        let run = run_measured(
            Command::new(&cfg.niso)
                .args(["registry", "build", "--data-dir"])
                .arg(&root),
        )?;
        let report = build_report_numbers(&run.stderr);
        eprintln!(
            "   rebuild {}: {:.3} s wall, {:.3} s user, {:.3} s sys, {:.1} MiB peak RSS — {}",
            i + 1,
            run.wall.as_secs_f64(),
            run.user.as_secs_f64(),
            run.sys.as_secs_f64(),
            run.maxrss_kib as f64 / 1024.0,
            run.stderr.trim()
        );
        if report.len() < 3 || report[0] != n as u64 || report[2] != (n * v) as u64 {
            return Err(format!(
                "rebuild {} reported {:?}, expected {n} packages and {} archives",
                i + 1,
                run.stderr.trim(),
                n * v
            )
            .into());
        }
        rebuilds.push(Rebuild { run, report });
    }

    // 3. Publishes, in this process.
    let dd = DataDir::open(&root)?;
    let t = Instant::now();
    let publisher = rt.block_on(dd.publisher(
        Arc::new(dd.key()?),
        Layout::root(),
        Options::default(),
        None,
    ))?;
    let open = t.elapsed();
    let staging = dd.staging_dir();
    fs::create_dir_all(&staging)?;
    let stage = |name: &str, ver: &str| -> Result<PathBuf> {
        let p = staging.join(format!("bench-{name}-{ver}.niso"));
        fs::write(&p, niso_archive(name, ver, PAYLOAD_LEN))?;
        Ok(p)
    };

    // A new release (the next version) of existing packages spread over
    // the whole name range.
    // (With more publishes than packages, later rounds take later versions.)
    let mut publish_ms = Vec::with_capacity(cfg.publishes);
    let per_round = cfg.publishes.min(n);
    for k in 0..cfg.publishes {
        let pkg = package_name(1 + (k % per_round) * n / per_round, width);
        let staged = stage(&pkg, &version(v + k / per_round))?;
        let t = Instant::now();
        let info = inspect_file(&staged, &limits)?;
        rt.block_on(publisher.publish(Upload {
            info,
            staged: StagedFile::Borrowed(staged.clone()),
            uploaded_at: unix_now(),
            signature: None,
        }))?;
        publish_ms.push(t.elapsed().as_secs_f64() * 1e3);
        fs::remove_file(&staged)?;
    }

    // Group commit: `batch` uploads of different packages per call.
    let batch = cfg.batch.min(n);
    let mut batch_ms = Vec::with_capacity(cfg.batches);
    for r in 0..cfg.batches {
        let ver = version(v + cfg.publishes.div_ceil(per_round) + r);
        let staged: Vec<(String, PathBuf)> = (0..batch)
            .map(|j| {
                let pkg = package_name(1 + j * n / batch, width);
                stage(&pkg, &ver).map(|p| (pkg, p))
            })
            .collect::<Result<_>>()?;
        let t = Instant::now();
        let uploads = staged
            .iter()
            .map(|(_, p)| {
                Ok(Upload {
                    info: inspect_file(p, &limits)?,
                    staged: StagedFile::Borrowed(p.clone()),
                    uploaded_at: unix_now(),
                    signature: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let results = rt.block_on(publisher.publish_batch(uploads));
        let elapsed = t.elapsed();
        for ((pkg, _), r) in staged.iter().zip(&results) {
            if let Err(e) = r {
                return Err(format!("batch publish of {pkg} {ver}: {e}").into());
            }
        }
        batch_ms.push(elapsed.as_secs_f64() * 1e3);
        for (_, p) in &staged {
            fs::remove_file(p)?;
        }
    }
    drop(publisher);
    let load_after = loadavg(3);

    // As the full rebuild counted them.
    let (releases, archives) = (
        rebuilds[0].report[1] as usize,
        rebuilds[0].report[2] as usize,
    );
    if cfg.keep {
        let kept = tmp.keep();
        eprintln!("   kept {}", kept.display());
    }
    Ok(SizeResult {
        n,
        releases,
        archives,
        archive_bytes,
        generate: generate_time,
        rebuilds,
        open,
        publish_ms,
        batch,
        batch_ms,
        fs_type,
        load: (load_before, load_after),
    })
}

// ---------------------------------------------------------------------------
// Reporting.

fn mib(kib: i64) -> f64 {
    kib as f64 / 1024.0
}

fn fs_type(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return "unknown".into();
    };
    // SAFETY: statfs is plain data; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "unknown".into();
    }
    #[allow(clippy::unnecessary_cast)]
    match st.f_type as i64 {
        0xEF53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x0102_1997 => "9p".into(),
        other => format!("0x{other:x}"),
    }
}

fn report(cfg: &Config, results: &[SizeResult]) -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = String::new();
    let _ = writeln!(md, "# niso registry benchmark\n");
    let _ = writeln!(
        md,
        "Machine: {nproc} CPUs (`nproc`), `uname -m` {}, CPU {}; trees on {}{}.\n",
        uname_m(),
        cpu_model(),
        results.first().map_or("?", |r| r.fs_type.as_str()),
        match cfg.store {
            Some(_) => String::new(),
            None => format!(" under {}", cfg.dir.display()),
        }
    );
    let mut command = String::from("cargo bench --bench registry");
    if !cfg.args.is_empty() {
        command.push_str(" -- ");
        command.push_str(&cfg.args.join(" "));
    }
    let _ = writeln!(md, "Command: `{command}`\n");
    let _ = writeln!(md, "niso binary: `{}`\n", cfg.niso.display());
    let _ = writeln!(
        md,
        "| N packages | releases | archives | full rebuild s | no-op rebuild s (2nd / 3rd) | rebuild peak RSS MiB (full / no-op) | publish p50 / p90 ms | batch-of-{} ms per upload (median of {}) |",
        cfg.batch, cfg.batches
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let per_upload: Vec<f64> = r.batch_ms.iter().map(|ms| ms / r.batch as f64).collect();
        let noop_rss = r.rebuilds[1..]
            .iter()
            .map(|b| b.run.maxrss_kib)
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.3} | {:.3} / {:.3} | {:.1} / {:.1} | {:.2} / {:.2} | {:.2} |",
            r.n,
            r.releases,
            r.archives,
            r.rebuilds[0].run.wall.as_secs_f64(),
            r.rebuilds[1].run.wall.as_secs_f64(),
            r.rebuilds[2].run.wall.as_secs_f64(),
            mib(r.rebuilds[0].run.maxrss_kib),
            mib(noop_rss),
            percentile(&r.publish_ms, 50.0),
            percentile(&r.publish_ms, 90.0),
            percentile(&per_upload, 50.0),
        );
    }
    let _ = writeln!(md, "\n## Details\n");
    let _ = writeln!(
        md,
        "Each rebuild is a fresh `niso registry build --data-dir ROOT` process; wall clock around spawn..reap, CPU and peak RSS from `wait4(2)` for that child alone.\n"
    );
    let _ = writeln!(
        md,
        "| N | rebuild | wall s | user s | sys s | peak RSS MiB | files written | files removed |"
    );
    let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in results {
        for (i, b) in r.rebuilds.iter().enumerate() {
            let what = if i == 0 { "full (fresh tree)" } else { "no-op" };
            let _ = writeln!(
                md,
                "| {} | {} {} | {:.3} | {:.3} | {:.3} | {:.1} | {} | {} |",
                r.n,
                i + 1,
                what,
                b.run.wall.as_secs_f64(),
                b.run.user.as_secs_f64(),
                b.run.sys.as_secs_f64(),
                mib(b.run.maxrss_kib),
                b.report.get(3).map_or("?".into(), u64::to_string),
                b.report.get(4).map_or("?".into(), u64::to_string),
            );
        }
    }
    let _ = writeln!(
        md,
        "\nPublishes run in this process (`Publisher::publish` / `publish_batch` on the tree, `inspect_file` of the staged archive included in the time; opening the publisher is not).\n"
    );
    let _ = writeln!(
        md,
        "| N | archives generated (MiB, s, not timed) | publisher open ms | single publishes | publish min / p50 / p90 / max ms | batches | batch ms (min / median / max) | load avg before / after |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in results {
        let _ = writeln!(
            md,
            "| {} | {:.1} MiB in {:.1} s | {:.1} | {} | {:.2} / {:.2} / {:.2} / {:.2} | {} × {} | {:.1} / {:.1} / {:.1} | {} / {} |",
            r.n,
            r.archive_bytes as f64 / (1 << 20) as f64,
            r.generate.as_secs_f64(),
            r.open.as_secs_f64() * 1e3,
            r.publish_ms.len(),
            percentile(&r.publish_ms, 0.0),
            percentile(&r.publish_ms, 50.0),
            percentile(&r.publish_ms, 90.0),
            percentile(&r.publish_ms, 100.0),
            r.batch_ms.len(),
            r.batch,
            percentile(&r.batch_ms, 0.0),
            percentile(&r.batch_ms, 50.0),
            percentile(&r.batch_ms, 100.0),
            r.load.0,
            r.load.1,
        );
    }
    md
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench registry: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cfg = parse_args()?;
    eprintln!("niso binary: {}", cfg.niso.display());
    let mut results = Vec::new();
    for &n in &cfg.packages {
        results.push(run_size(&cfg, n)?);
    }
    let md = report(&cfg, &results);
    print!("{md}");
    if let Some(parent) = cfg.out.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&cfg.out, &md)?;
    eprintln!("wrote {}", cfg.out.display());
    Ok(())
}
