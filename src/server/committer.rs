//! Group commit, pipelined: uploads that arrive while a batch is being
//! prepared or written wait in a queue and are all folded into the next
//! batch, and the next batch is checked and signed while the previous one
//! is still being written to disk.
//!
//! Without this every upload would pay for its own `versions` and `names`
//! rewrite (and their fsyncs); with it, N concurrent uploads share one, and
//! the CPU work of one batch overlaps the disk waits of the one before.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::publish::{PublishError, Published, Publisher, Upload};

/// Most uploads folded into one batch.
const MAX_BATCH: usize = 256;

/// Batches prepared but not yet written: one being written, one waiting.
/// More would only queue work behind the disk; while both are taken, new
/// uploads gather into a larger next batch instead.
const IN_FLIGHT: usize = 2;

type Reply = oneshot::Sender<Result<Published, PublishError>>;

pub struct Committer {
    tx: mpsc::UnboundedSender<(Upload, Reply)>,
    publisher: Arc<Publisher>,
}

impl Committer {
    /// Starts the commit loop on the current tokio runtime.
    pub fn start(publisher: Arc<Publisher>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Upload, Reply)>();
        let p = publisher.clone();
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Wait for a slot before taking the batch, so uploads that
                // arrive meanwhile join it.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let (uploads, replies): (Vec<Upload>, Vec<Reply>) = batch.into_iter().unzip();
                let prep = p.clone();
                let size = uploads.len();
                let started = std::time::Instant::now();
                // Prepared in order, here; written in that order by the
                // publisher's queue, on another thread.
                let prepared =
                    match tokio::task::spawn_blocking(move || prep.prepare_batch(uploads)).await {
                        Ok(prepared) => prepared,
                        Err(e) => {
                            fail_all(replies, &e);
                            continue;
                        }
                    };
                tracing::debug!(
                    size,
                    prepare_ms = crate::publish::ms(started.elapsed()),
                    "batch prepared"
                );
                let writer = p.clone();
                tokio::spawn(async move {
                    let results =
                        tokio::task::spawn_blocking(move || writer.commit_batch(prepared)).await;
                    drop(slot);
                    match results {
                        Ok(results) => {
                            for (reply, r) in replies.into_iter().zip(results) {
                                let _ = reply.send(r);
                            }
                        }
                        Err(e) => fail_all(replies, &e),
                    }
                });
            }
        });
        Self { tx, publisher }
    }

    /// Queues an upload and waits for the batch that includes it to be
    /// written.
    pub async fn publish(&self, upload: Upload) -> Result<Published, PublishError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((upload, tx))
            .map_err(|_| PublishError::Invalid("the publisher has stopped".into()))?;
        rx.await
            .map_err(|_| PublishError::Invalid("the publisher has stopped".into()))?
    }

    pub fn publisher(&self) -> &Arc<Publisher> {
        &self.publisher
    }
}

fn fail_all(replies: Vec<Reply>, e: &tokio::task::JoinError) {
    for reply in replies {
        let _ = reply.send(Err(PublishError::Aborted(format!(
            "the publisher failed: {e}"
        ))));
    }
}
