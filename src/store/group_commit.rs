//! Group commit: concurrent writers (`POST /v1/jobs`, `POST /v1/events`) share one transaction,
//! so a durable acknowledgment costs a fraction of a commit (and of an fsync on SQLite).

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::StoreError;

/// Most items committed together.
pub const MAX_BATCH: usize = 256;

type Reply<O> = oneshot::Sender<Result<O, StoreError>>;
type Queue<I, O> = Arc<Mutex<mpsc::Receiver<(I, Reply<O>)>>>;

/// Hands items to the committer tasks; each item's answer comes back once its batch committed.
pub struct GroupCommit<I, O> {
    tx: mpsc::Sender<(I, Reply<O>)>,
}

impl<I, O> Clone for GroupCommit<I, O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> GroupCommit<I, O> {
    /// Start `committers` tasks that each take up to `max_batch` waiting items and pass them to
    /// `commit`, which answers one output per item in order (several committers only help an
    /// engine with concurrent writers). `name` labels the batch-size metric. They stop when
    /// `shutdown` fires and the queue is drained.
    pub fn spawn<F, Fut>(
        name: &'static str,
        commit: F,
        committers: usize,
        max_batch: usize,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>)
    where
        F: Fn(Vec<I>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<O>, StoreError>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        let rx = Arc::new(Mutex::new(rx));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..committers.max(1) {
            tasks.spawn(commit_loop(
                name,
                commit.clone(),
                rx.clone(),
                max_batch.clamp(1, MAX_BATCH),
                shutdown.clone(),
            ));
        }
        let task = tokio::spawn(async move { while tasks.join_next().await.is_some() {} });
        (Self { tx }, task)
    }

    /// Commit `item`; resolves once it is durable (or failed).
    pub async fn submit(&self, item: I) -> Result<O, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Corrupt("the node is shutting down".into());
        self.tx.send((item, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn commit_loop<I, O, F, Fut>(
    name: &'static str,
    commit: F,
    rx: Queue<I, O>,
    max_batch: usize,
    shutdown: CancellationToken,
) where
    F: Fn(Vec<I>) -> Fut,
    Fut: Future<Output = Result<Vec<O>, StoreError>>,
{
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
        let (items, replies): (Vec<I>, Vec<Reply<O>>) = batch.drain(..).unzip();
        metrics::histogram!("herald_commit_batch_size", "writes" => name)
            .record(items.len() as f64);
        let expected = items.len();
        let committed = commit(items).await.and_then(|outputs| {
            if outputs.len() == expected {
                Ok(outputs)
            } else {
                Err(StoreError::Corrupt(format!(
                    "a batch of {expected} {name} committed with {} answers",
                    outputs.len()
                )))
            }
        });
        match committed {
            Ok(outputs) => {
                for (reply, output) in replies.into_iter().zip(outputs) {
                    let _ = reply.send(Ok(output));
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

/// Group commit of job submissions (`POST /v1/jobs`).
pub type JobIntake = GroupCommit<crate::jobs::NewJob, crate::jobs::CreateOutcome>;

/// Group commit of published events (`POST /v1/events`): (user, update) → the appended update
/// (shared with its handed-off deliveries).
pub type EventIntake =
    GroupCommit<(String, crate::updates::NewUpdate), Arc<crate::updates::Update>>;

/// Committers and batch size for `store`'s engine. SQLite has one writer: one committer, big
/// batches. On PostgreSQL a batch costs a round trip per statement, not per row, so batches
/// are large too; a second committer keeps one batch being written while the next fills.
fn sizing(store: &dyn super::Store, max_connections: u32) -> (usize, usize) {
    match store.engine() {
        super::Engine::Sqlite => (1, MAX_BATCH),
        super::Engine::Postgres => ((max_connections as usize / 4).clamp(1, 2), 64),
    }
}

/// Committers and batch size for published events. On PostgreSQL, unlike job submissions, one
/// committer of up to [`MAX_BATCH`]: an event batch is an update, a counter and a delivery per
/// device per row, and two such statements at once cost the server more per row than one
/// twice the size (the pipeline bench, 20,000 pushes: two committers of 64, 0.44–0.46 of the
/// raw rate; two of 256, 0.44; one of 256, 0.47–0.48). A batch is written while the next one
/// queues, so a lone event still waits for at most one commit.
fn event_sizing(store: &dyn super::Store, max_connections: u32) -> (usize, usize) {
    match store.engine() {
        super::Engine::Sqlite => sizing(store, max_connections),
        super::Engine::Postgres => (1, MAX_BATCH),
    }
}

/// Start the group commit of job submissions.
pub fn job_intake(
    store: Arc<dyn super::Store>,
    max_connections: u32,
    shutdown: CancellationToken,
) -> (JobIntake, tokio::task::JoinHandle<()>) {
    let (committers, max_batch) = sizing(&*store, max_connections);
    let commit = move |jobs: Vec<crate::jobs::NewJob>| {
        let store = store.clone();
        async move { store.create_jobs(&jobs).await }
    };
    GroupCommit::spawn("jobs", commit, committers, max_batch, shutdown)
}

/// Start the group commit of published events; with `handoff` their deliveries go straight
/// to this node's dispatcher while it has room.
pub fn event_intake(
    store: Arc<dyn super::Store>,
    max_connections: u32,
    handoff: Option<Arc<dyn super::HandoffSink>>,
    shutdown: CancellationToken,
) -> (EventIntake, tokio::task::JoinHandle<()>) {
    let (committers, max_batch) = event_sizing(&*store, max_connections);
    let commit = move |events: Vec<(String, crate::updates::NewUpdate)>| {
        let (store, handoff) = (store.clone(), handoff.clone());
        async move {
            let lease = handoff.as_ref().and_then(|h| h.lease());
            let appended = store.append_events(&events, lease.as_ref()).await?;
            if let Some(handoff) = handoff {
                handoff.hand_over(appended.claimed);
            }
            Ok(appended.updates)
        }
    };
    GroupCommit::spawn("events", commit, committers, max_batch, shutdown)
}
