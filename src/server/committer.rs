//! Group commit: uploads that arrive while a change is being written wait in
//! a queue and are all folded into the next change, so N concurrent uploads
//! share one rewrite of `versions`, `names` and the freshness record.
//!
//! The queue owns each upload (its staged file included) from the moment it
//! is queued: a client that hangs up while its upload waits does not take
//! anything away from the change, and its upload is published all the same
//! (a retry then finds it in place).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::publish::{PublishError, Published, Publisher, Upload};

/// Most uploads folded into one change.
const MAX_BATCH: usize = 256;

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
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let (uploads, replies): (Vec<Upload>, Vec<Reply>) = batch.into_iter().unzip();
                let size = uploads.len();
                let started = std::time::Instant::now();
                let results = p.publish_batch(uploads).await;
                tracing::debug!(
                    size,
                    ms = crate::publish::ms(started.elapsed()),
                    "group commit"
                );
                for (reply, r) in replies.into_iter().zip(results) {
                    // A client that hung up gets no answer; its upload
                    // stands.
                    let _ = reply.send(r);
                }
            }
        });
        Self { tx, publisher }
    }

    /// Queues an upload and waits for the change that includes it.
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
