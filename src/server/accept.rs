//! The accept loop: slow clients are closed, and the open connections are
//! bounded so the process never runs out of file descriptors.
//!
//! * Every connection has a header timeout ([`ConnLimits::header_timeout`]):
//!   a request head must arrive within it, counted from the moment the
//!   connection is ready for one (accepted, or done with the previous
//!   request). So it is also the keep-alive idle timeout. hyper enforces it;
//!   `axum::serve` sets no timer, which is why this loop exists.
//! * A client that stops reading its answer (a download left hanging) is
//!   closed once a write to it has made no progress for
//!   [`ConnLimits::send_timeout`]; otherwise it would hold its connection,
//!   which is busy and so never closed to make room, for ever.
//! * At most [`ConnLimits::max_connections`] are open at once. Each holds a
//!   descriptor, and may hold a file more (a download, an upload's staged
//!   file): the default leaves room for that and for the process's own files
//!   ([`default_max_connections`]).
//! * When every slot is taken, a new connection closes the one that has
//!   waited longest with no request in progress (a slow-header client, or an
//!   idle keep-alive one, which HTTP allows a server to close). So a flood
//!   of slow connections cannot keep a health check waiting in the backlog
//!   for a header timeout. Connections in the middle of a request (an
//!   upload, a download) are never closed this way; when all are, new ones
//!   wait in the kernel's backlog until one finishes.
//!
//! Slow request bodies are the upload handler's business (a minimum rate and
//! a deadline), other bodies are bounded by the request timeout.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, Semaphore};
use tower::{Service, ServiceExt};

/// Limits of the connection layer.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Time a client has to send a request head, from accept or from the end
    /// of its previous request.
    pub header_timeout: Duration,
    /// Time a write to a client may make no progress before the connection
    /// is closed.
    pub send_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// Descriptors kept for the process itself (the key database, the tree's
/// lock, the publisher's files) before connections get any: at least this
/// many, or an eighth of the limit.
const FD_RESERVE_MIN: u64 = 64;
/// Upper bound of the default: beyond it, memory (a read buffer per
/// connection) matters more than descriptors.
const DEFAULT_MAX_CONNECTIONS_CAP: u64 = 16_384;

/// The default connection cap: half of the open-file limit (`RLIMIT_NOFILE`,
/// soft) once a reserve for the process is set aside, since a connection may
/// hold a file as well as its socket. 128 files give 32 connections, 1024
/// give 448.
pub fn default_max_connections() -> usize {
    max_connections_for(open_file_limit())
}

fn max_connections_for(nofile: u64) -> usize {
    let reserve = FD_RESERVE_MIN.max(nofile / 8);
    let n = (nofile.saturating_sub(reserve) / 2).clamp(1, DEFAULT_MAX_CONNECTIONS_CAP);
    usize::try_from(n).unwrap_or(1)
}

fn open_file_limit() -> u64 {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass and nothing else.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            // rlim_t is u64 on Linux, not on every Unix.
            #[allow(clippy::useless_conversion)]
            return u64::try_from(lim.rlim_cur).unwrap_or(u64::MAX);
        }
    }
    1024
}

/// One open connection, as the eviction sees it.
struct Slot {
    /// Requests in progress: from the head being read to the last byte of
    /// the response body written.
    busy: AtomicUsize,
    /// When `busy` last dropped to 0 (or the connection was accepted), in
    /// milliseconds since [`Table::epoch`].
    idle_since: AtomicU64,
    /// Chosen to be closed; not chosen twice.
    evicted: AtomicBool,
    close: Notify,
}

struct Table {
    epoch: Instant,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
}

impl Table {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the connection idle longest. False when every one is busy.
    fn evict_one(&self) -> bool {
        let slots = self.slots();
        let victim = slots
            .values()
            .filter(|s| s.busy.load(Ordering::Acquire) == 0 && !s.evicted.load(Ordering::Acquire))
            .min_by_key(|s| s.idle_since.load(Ordering::Acquire));
        match victim {
            Some(v) => {
                v.evicted.store(true, Ordering::Release);
                // notify_one keeps the wake-up if the task is not waiting yet.
                v.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Marks its connection busy while it lives: made when a request arrives,
/// dropped with the response body.
struct Busy {
    slot: Arc<Slot>,
    table: Arc<Table>,
}

impl Busy {
    fn new(slot: Arc<Slot>, table: Arc<Table>) -> Self {
        slot.busy.fetch_add(1, Ordering::AcqRel);
        Self { slot, table }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.slot.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.slot
                .idle_since
                .store(self.table.now_ms(), Ordering::Release);
        }
    }
}

/// A response body that keeps its connection marked busy until it is sent.
struct TrackedBody {
    inner: Body,
    _busy: Busy,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    // Forwarded so hyper still sends Content-Length for sized bodies.
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The router as a hyper service that marks its connection busy.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    slot: Arc<Slot>,
    table: Arc<Table>,
}

impl<S> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let busy = Busy::new(self.slot.clone(), self.table.clone());
        let svc = self.inner.clone();
        Box::pin(async move {
            let resp = svc.oneshot(req).await?;
            Ok(resp.map(|inner| Body::new(TrackedBody { inner, _busy: busy })))
        })
    }
}

/// A socket whose writes fail once they have been pending (the client's
/// receive window full) for `limit` without a byte going out.
struct SendStall<T> {
    inner: T,
    limit: Duration,
    /// Running while the current write is pending; reset by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> SendStall<T> {
    fn new(inner: T, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// After a pending write: an error once the stall has lasted `limit`.
    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<R>> {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<R>(
        &mut self,
        r: Poll<std::io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<R>> {
        match r {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendStall<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendStall<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progressed(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progressed(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.progressed(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progressed(r, cx)
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets the
/// requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let max = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max));
    let table = Arc::new(Table {
        epoch: Instant::now(),
        slots: Mutex::new(HashMap::new()),
    });
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut make = router.into_make_service_with_connect_info::<SocketAddr>();
    let mut shutdown = pin!(shutdown);
    let mut next_id: u64 = 0;
    let mut last_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            r = listener.accept() => r,
        };
        let (stream, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let evicted = table.evict_one();
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    last_warning = Some(Instant::now());
                    if evicted {
                        tracing::warn!(
                            max,
                            "connection limit reached: closing the connection idle longest"
                        );
                    } else {
                        tracing::warn!(
                            max,
                            "connection limit reached and every connection is busy: new ones wait"
                        );
                    }
                }
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        // Never closed; if it were, no connection could be served.
                        Err(_) => break,
                    },
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let id = next_id;
        next_id += 1;
        let slot = Arc::new(Slot {
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(table.now_ms()),
            evicted: AtomicBool::new(false),
            close: Notify::new(),
        });
        table.slots().insert(id, slot.clone());
        let Ok(svc) = make.call(addr).await;
        let svc = Tracked {
            inner: svc,
            slot: slot.clone(),
            table: table.clone(),
        };
        let io = TokioIo::new(SendStall::new(stream, limits.send_timeout));
        let conn = graceful.watch(builder.serve_connection(io, svc));
        let table = table.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        // Timeouts and resets are the client's affair.
                        tracing::debug!(%addr, error = %e, "connection ended");
                    }
                }
                () = slot.close.notified() => {
                    tracing::debug!(%addr, "connection closed to make room for a new one");
                }
            }
            table.slots().remove(&id);
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// What to do when accept fails: a connection that died in the backlog is
/// nothing; anything else (out of descriptors) is logged and retried after a
/// pause, so the loop does not spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_room_for_files() {
        assert_eq!(max_connections_for(128), 32);
        assert_eq!(max_connections_for(1024), 448);
        assert_eq!(max_connections_for(20_000), 8_750);
        assert_eq!(max_connections_for(1 << 20), 16_384);
        assert_eq!(max_connections_for(10), 1);
    }

    #[test]
    fn eviction_picks_the_longest_idle_and_never_a_busy_one() {
        let table = Arc::new(Table {
            epoch: Instant::now(),
            slots: Mutex::new(HashMap::new()),
        });
        let slot = |idle: u64| {
            Arc::new(Slot {
                busy: AtomicUsize::new(0),
                idle_since: AtomicU64::new(idle),
                evicted: AtomicBool::new(false),
                close: Notify::new(),
            })
        };
        let (old_busy, old, new) = (slot(1), slot(5), slot(9));
        let busy = Busy::new(old_busy.clone(), table.clone());
        for (i, s) in [&old_busy, &old, &new].into_iter().enumerate() {
            table.slots().insert(i as u64, s.clone());
        }
        assert!(table.evict_one());
        assert!(old.evicted.load(Ordering::Acquire));
        assert!(table.evict_one());
        assert!(new.evicted.load(Ordering::Acquire));
        assert!(!table.evict_one(), "the busy one stays");
        drop(busy);
        assert!(table.evict_one(), "idle once its response is sent");
    }
}
