//! Group commit: uploads that arrive while the indexes are being rewritten
//! wait in a queue and are all folded into the next rewrite.
//!
//! Without this every upload would pay for its own `versions` and `names`
//! rewrite (and their fsyncs); with it, N concurrent uploads share one.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::publish::{PublishError, Published, Publisher, Upload};

/// Most uploads folded into one rewrite.
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
                let p = p.clone();
                let results = tokio::task::spawn_blocking(move || p.publish_batch(uploads)).await;
                match results {
                    Ok(results) => {
                        for (reply, r) in replies.into_iter().zip(results) {
                            let _ = reply.send(r);
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply
                                .send(Err(PublishError::Invalid(format!("publisher failed: {e}"))));
                        }
                    }
                }
            }
        });
        Self { tx, publisher }
    }

    /// Queues an upload and waits for the rewrite that includes it.
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
