//! Group commit of submissions: concurrent `POST /v1/jobs` requests share one transaction, so
//! a durable acknowledgment costs a fraction of a commit (and of an fsync on SQLite).

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::jobs::{CreateOutcome, NewJob};
use crate::store::{Store, StoreError};

/// Most submissions committed together.
const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<CreateOutcome, StoreError>>;

/// Hands submissions to the committer task.
#[derive(Clone)]
pub struct Intake {
    tx: mpsc::Sender<(NewJob, Reply)>,
}

impl Intake {
    /// Start `committers` committer tasks (several only help an engine with concurrent
    /// writers); they stop when `shutdown` fires and the queue is drained.
    pub fn spawn(
        store: Arc<dyn Store>,
        committers: usize,
        max_batch: usize,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        let rx = Arc::new(Mutex::new(rx));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..committers.max(1) {
            tasks.spawn(commit_loop(
                store.clone(),
                rx.clone(),
                max_batch.clamp(1, MAX_BATCH),
                shutdown.clone(),
            ));
        }
        let task = tokio::spawn(async move { while tasks.join_next().await.is_some() {} });
        (Self { tx }, task)
    }

    /// Commit `job`; resolves once it is durable (or failed).
    pub async fn submit(&self, job: NewJob) -> Result<CreateOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Corrupt("the node is shutting down".into());
        self.tx.send((job, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn commit_loop(
    store: Arc<dyn Store>,
    rx: Arc<Mutex<mpsc::Receiver<(NewJob, Reply)>>>,
    max_batch: usize,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        // Whatever queued up while the previous commit ran goes into the next one: no timer,
        // so a lone request is never delayed waiting for company. The lock is held only while
        // taking a batch, so another committer takes the next one while this one commits.
        let received = {
            let mut rx = rx.lock().await;
            tokio::select! {
                n = rx.recv_many(&mut batch, max_batch) => n,
                _ = shutdown.cancelled() => {
                    rx.close();
                    rx.recv_many(&mut batch, max_batch).await
                }
            }
        };
        if received == 0 {
            return;
        }
        let (jobs, replies): (Vec<NewJob>, Vec<Reply>) = batch.drain(..).unzip();
        metrics::histogram!("herald_job_commit_batch_size").record(jobs.len() as f64);
        match store.create_jobs(&jobs).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(err) => {
                let err = Arc::new(err);
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Shared(err.clone())));
                }
            }
        }
    }
}
