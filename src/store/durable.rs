//! Making files and directories durable, many at a time.
//!
//! A change to the tree ends each stage with a round of fsyncs: the temp
//! files that hold its new bytes, then the directories its renames touched.
//! The fsyncs of one round run at once, so the disk flushes they cause
//! overlap (the block layer and a journal both fold concurrent flushes
//! together). They run on a few threads kept for the life of the process:
//! a thread started per fsync cost about 15 system calls of its own, and
//! a sequential upload made 18 of them. The same threads close the files a
//! change replaced, off the writer's path ([`spawn`]).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// Something to fsync: a file still open from writing it (no second open),
/// or a path (a directory, or a file written elsewhere).
pub(super) enum Durable {
    File(File, PathBuf),
    Path(PathBuf),
}

impl Durable {
    pub(super) fn path(&self) -> &Path {
        match self {
            Durable::File(_, p) | Durable::Path(p) => p,
        }
    }

    fn sync(self) -> Result<(), (PathBuf, io::Error)> {
        let result = match &self {
            Durable::File(f, _) => f.sync_all(),
            Durable::Path(p) => File::open(p).and_then(|f| f.sync_all()),
        };
        result.map_err(|e| (self.path().to_path_buf(), e))
    }
}

/// Threads kept for fsyncs and other waits on the disk. More than the
/// cores: they wait on the disk, not on the CPU, and a round of a small
/// change has up to a dozen paths.
const THREADS: usize = 8;

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    jobs: Mutex<mpsc::Sender<Job>>,
}

/// The pool, started on first use; `None` if no thread could be started
/// (then every fsync runs on the caller's thread).
fn pool() -> Option<&'static Pool> {
    static POOL: OnceLock<Option<Pool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..THREADS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("niso-sync-{i}"))
                .spawn(move || loop {
                    // The lock is held only to take one job.
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    match job {
                        // A panic ends the job (its share reports it), not
                        // the thread.
                        Ok(job) => {
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                        Err(_) => break,
                    }
                });
            if spawned.is_ok() {
                started += 1;
            }
        }
        (started > 0).then(|| Pool {
            jobs: Mutex::new(tx),
        })
    })
    .as_ref()
}

/// Runs `job` on the kept threads, or here if none could be started.
pub(super) fn spawn(job: impl FnOnce() + Send + 'static) {
    let job: Job = Box::new(job);
    let job = match pool() {
        Some(pool) => match pool
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
        {
            Ok(()) => return,
            // Every pool thread is gone.
            Err(mpsc::SendError(job)) => job,
        },
        None => job,
    };
    job();
}

/// Counts a round's outstanding fsyncs down and keeps its first error.
struct Round {
    state: Mutex<(usize, Option<(PathBuf, io::Error)>)>,
    done: Condvar,
}

/// One fsync's share of a [`Round`]: counts it down when dropped, so a job
/// that panics (and never reports) still ends the round, as a failure.
struct Share {
    round: Arc<Round>,
    path: PathBuf,
    result: Option<Result<(), (PathBuf, io::Error)>>,
}

impl Share {
    /// Reports the fsync's result (the drop right after counts it down).
    fn done(mut self, result: Result<(), (PathBuf, io::Error)>) {
        self.result = Some(result);
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let result = self.result.take().unwrap_or_else(|| {
            Err((
                std::mem::take(&mut self.path),
                io::Error::other("the fsync did not complete"),
            ))
        });
        self.round.finish(result);
    }
}

impl Round {
    fn finish(&self, result: Result<(), (PathBuf, io::Error)>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 -= 1;
        if let Err(e) = result {
            s.1.get_or_insert(e);
        }
        if s.0 == 0 {
            self.done.notify_all();
        }
    }
}

/// fsyncs every item, at once, and returns the first failure with its path.
/// Returns only when every fsync has ended, failed or not.
pub(super) fn sync_all(items: Vec<Durable>) -> Result<(), (PathBuf, io::Error)> {
    let mut items = items.into_iter();
    let Some(first) = items.next() else {
        return Ok(());
    };
    let rest: Vec<Durable> = items.collect();
    if rest.is_empty() {
        return first.sync();
    }
    let round = Arc::new(Round {
        state: Mutex::new((rest.len(), None)),
        done: Condvar::new(),
    });
    for item in rest {
        let share = Share {
            round: round.clone(),
            path: item.path().to_path_buf(),
            result: None,
        };
        spawn(move || share.done(item.sync()));
    }
    // The caller's thread takes one fsync itself instead of only waiting.
    let first = first.sync();
    let mut s = round.state.lock().unwrap_or_else(|e| e.into_inner());
    while s.0 > 0 {
        s = round.done.wait(s).unwrap_or_else(|e| e.into_inner());
    }
    first?;
    match s.1.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_syncs_every_item_and_reports_the_failing_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut items = Vec::new();
        for i in 0..20 {
            let path = dir.path().join(format!("f{i}"));
            std::fs::write(&path, b"x").unwrap();
            items.push(if i % 2 == 0 {
                Durable::File(File::open(&path).unwrap(), path)
            } else {
                Durable::Path(path)
            });
        }
        items.push(Durable::Path(dir.path().to_path_buf()));
        sync_all(items).unwrap();
        sync_all(Vec::new()).unwrap();

        let missing = dir.path().join("missing");
        let err = sync_all(vec![
            Durable::Path(dir.path().to_path_buf()),
            Durable::Path(missing.clone()),
            Durable::Path(dir.path().join("f1")),
        ])
        .unwrap_err();
        assert_eq!(err.0, missing);
        assert_eq!(err.1.kind(), io::ErrorKind::NotFound);
        // Also when the failing item is the one the caller runs itself.
        let err = sync_all(vec![Durable::Path(missing.clone())]).unwrap_err();
        assert_eq!(err.0, missing);
    }

    #[test]
    fn a_job_that_never_reports_still_ends_its_round_as_a_failure() {
        let round = Arc::new(Round {
            state: Mutex::new((2, None)),
            done: Condvar::new(),
        });
        let share = |path: &str| Share {
            round: round.clone(),
            path: PathBuf::from(path),
            result: None,
        };
        share("a").done(Ok(()));
        // As when the job panics before it reports (on a pool thread: the
        // pool must be there, or spawn would run it here).
        assert!(pool().is_some(), "sync threads start");
        let dropped = share("b");
        spawn(move || {
            let _keep = dropped;
            panic!("a job failing half-way");
        });
        let mut s = round.state.lock().unwrap();
        while s.0 > 0 {
            s = round.done.wait(s).unwrap();
        }
        assert_eq!(s.1.as_ref().map(|e| e.0.clone()), Some(PathBuf::from("b")));
        drop(s);
        // Rounds still complete after it.
        let dir = tempfile::tempdir().unwrap();
        let items = (0..2 * THREADS)
            .map(|_| Durable::Path(dir.path().to_path_buf()))
            .collect();
        sync_all(items).unwrap();
    }
}
