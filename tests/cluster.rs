//! Several `herald serve` processes on one PostgreSQL: every job runs to completion exactly
//! once, both nodes work, and SIGTERM drains a node cleanly.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Engine, SECRET, TestDb};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_herald");

/// A `herald serve` child process.
struct Proc {
    child: Child,
    base: String,
}

impl Proc {
    fn start(db: &TestDb, extra: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(BIN);
        cmd.current_dir(dir.path())
            .arg("serve")
            .env("HERALD_LISTEN", "127.0.0.1:0")
            .env("HERALD_DATABASE_URL", &db.url)
            .env("HERALD_AUTH_HS256_SECRET", SECRET)
            .env("HERALD_LOG", "warn")
            .env("HERALD_QUEUE_BACKOFF_BASE_MS", "10")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no listen line: {line:?}"))
            .to_string();
        Self { child, base: addr }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn completed_by_me(&self, client: &reqwest::Client) -> u64 {
        let text = client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| {
                l.starts_with("herald_jobs_finished_total{") && l.contains("outcome=\"completed\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token(sub: &str) -> String {
    herald::auth::mint_hs256(
        &herald::config::Secret::new(SECRET),
        sub,
        None,
        Duration::from_secs(3600),
        None,
        None,
    )
    .unwrap()
}

async fn count(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_run_every_job_exactly_once() {
    const JOBS: usize = 2000;
    let db = TestDb::new(Engine::Postgres).await;
    let nodes = [Proc::start(&db, &[]), Proc::start(&db, &[])];
    let client = reqwest::Client::new();
    let token = token("alice");

    let submitted = futures::future::join_all((0..16).map(|lane| {
        let client = client.clone();
        let token = token.clone();
        let bases: Vec<String> = nodes.iter().map(|n| n.base.clone()).collect();
        async move {
            let mut ids = Vec::new();
            for i in (lane..JOBS).step_by(16) {
                let response = client
                    .post(format!("{}/v1/jobs", bases[i % 2]))
                    .bearer_auth(&token)
                    .json(&json!({"kind": "echo", "input": {"i": i}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
                let body: Value = response.json().await.unwrap();
                ids.push(body["trackingId"].as_str().unwrap().to_string());
            }
            ids
        }
    }))
    .await;
    assert_eq!(submitted.iter().map(Vec::len).sum::<usize>(), JOBS);

    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(
        &pool,
        "SELECT count(*) FROM jobs WHERE status = 'completed'",
    )
    .await
        < JOBS as i64
    {
        assert!(Instant::now() < deadline, "jobs did not all complete");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM jobs").await,
        JOBS as i64,
        "nothing lost, nothing extra"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM jobs WHERE attempts <> 1").await,
        0,
        "each job ran once"
    );
    let completions = count(
        &pool,
        "SELECT count(*) FROM (SELECT tracking_id FROM updates WHERE type = 'job.completed' \
         GROUP BY tracking_id HAVING count(*) = 1) once",
    )
    .await;
    assert_eq!(
        completions, JOBS as i64,
        "exactly one completion update per job"
    );
    let per_node = [
        nodes[0].completed_by_me(&client).await,
        nodes[1].completed_by_me(&client).await,
    ];
    assert_eq!(per_node[0] + per_node[1], JOBS as u64, "{per_node:?}");
    assert!(
        per_node[0] > 0 && per_node[1] > 0,
        "both nodes claimed work: {per_node:?}"
    );
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_or_releases_then_another_node_completes() {
    let db = TestDb::new(Engine::Postgres).await;
    let client = reqwest::Client::new();
    let token = token("alice");
    let mut first = Proc::start(&db, &[("HERALD_QUEUE_SHUTDOWN_GRACE_SECS", "1")]);
    let submit = |base: String, delay: u64| {
        let client = client.clone();
        let token = token.clone();
        async move {
            let response = client
                .post(format!("{base}/v1/jobs"))
                .bearer_auth(&token)
                .json(&json!({"kind": "echo", "input": {"delayMs": delay}}))
                .send()
                .await
                .unwrap();
            let body: Value = response.json().await.unwrap();
            body["trackingId"].as_str().unwrap().to_string()
        }
    };
    let quick = submit(first.base.clone(), 300).await;
    let slow = submit(first.base.clone(), 8000).await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(
        &pool,
        "SELECT count(*) FROM jobs WHERE status = 'processing'",
    )
    .await
        < 2
    {
        assert!(Instant::now() < deadline, "jobs were not picked up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = first.terminate();
    assert!(status.success(), "exit status {status}");

    let state = |id: String| {
        let pool = pool.clone();
        async move {
            let uuid = uuid::Uuid::parse_str(&id).unwrap();
            let row: (String, i32) =
                sqlx::query_as("SELECT status, attempts FROM jobs WHERE id = $1")
                    .bind(uuid)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            row
        }
    };
    assert_eq!(
        state(quick.clone()).await,
        ("completed".to_string(), 1),
        "finished within the grace period"
    );
    assert_eq!(
        state(slow.clone()).await,
        ("pending".to_string(), 0),
        "released without using up its attempt"
    );

    let _second = Proc::start(&db, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(slow.clone()).await.0 != "completed" {
        assert!(
            Instant::now() < deadline,
            "the released job was not finished by the other node"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pool.close().await;
}
