//! The database side: a fresh database per run, samples of its size and dead rows while the
//! soak runs (from a connection of the bench's own), and the mid-run maintenance.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::{AssertSqlSafe, Connection, Row};

/// One PostgreSQL table's figures.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TableStat {
    pub name: String,
    /// Heap bytes (`pg_relation_size`).
    pub bytes: i64,
    /// All its indexes (`pg_indexes_size`).
    pub index_bytes: i64,
    pub live: i64,
    pub dead: i64,
    /// Updates since the database was created, and how many of them were HOT.
    pub upd: i64,
    pub hot_upd: i64,
    pub last_autovacuum: Option<String>,
    pub last_vacuum: Option<String>,
}

/// One sample of the database.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all_fields = "camelCase", tag = "engine")]
pub enum Sample {
    #[serde(rename = "sqlite")]
    Sqlite {
        /// page_count × page_size: the database as a reader sees it, WAL included.
        db_bytes: i64,
        /// The -wal file on disk.
        wal_bytes: u64,
        /// The main file on disk.
        file_bytes: u64,
        page_count: i64,
        freelist_count: i64,
    },
    #[serde(rename = "postgres")]
    Postgres {
        /// `pg_database_size`.
        db_bytes: i64,
        tables: Vec<TableStat>,
    },
}

impl Sample {
    /// The size "bytes per push" is computed from.
    pub fn db_bytes(&self) -> i64 {
        match self {
            Sample::Sqlite { db_bytes, .. } | Sample::Postgres { db_bytes, .. } => *db_bytes,
        }
    }
}

/// The database a run uses; a PostgreSQL one is dropped when this is.
pub enum Db {
    Sqlite {
        path: PathBuf,
        conn: sqlx::SqliteConnection,
    },
    Postgres {
        /// The server's base URL (HERALD_TEST_DATABASE_URL), to drop the database from.
        base: String,
        name: String,
        /// The run's database.
        url: String,
        pool: Option<sqlx::PgPool>,
    },
}

/// `base` with its database replaced by `name`.
fn with_database(base: &str, name: &str) -> Result<String, String> {
    let mut url = url::Url::parse(base).map_err(|e| format!("HERALD_TEST_DATABASE_URL: {e}"))?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

fn db_err(what: &str) -> impl Fn(sqlx::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Db {
    /// A fresh PostgreSQL database on the server at `base`: `herald_soak_<pid>`. Checks
    /// autovacuum first and says loudly when it is off.
    pub async fn postgres(base: &str) -> Result<Self, String> {
        let mut admin = sqlx::PgConnection::connect(base)
            .await
            .map_err(db_err("PostgreSQL (HERALD_TEST_DATABASE_URL)"))?;
        let autovacuum: String = sqlx::query_scalar("SHOW autovacuum")
            .fetch_one(&mut admin)
            .await
            .map_err(db_err("SHOW autovacuum"))?;
        if autovacuum != "on" {
            println!(
                "!!!!! WARNING: autovacuum is {autovacuum} on this PostgreSQL server. Dead tuples \
                 will only be removed by the mid-run VACUUM, so this run does NOT represent \
                 production. scripts/ turns autovacuum on for the test server; this bench does \
                 not change server settings. !!!!!"
            );
        } else {
            println!("PostgreSQL: autovacuum is on");
        }
        let name = format!("herald_soak_{}", std::process::id());
        // A database left by an earlier run with the same pid (killed with SIGKILL).
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await
        .map_err(db_err("DROP DATABASE"))?;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .map_err(db_err("CREATE DATABASE"))?;
        let _ = admin.close().await;
        let url = with_database(base, &name)?;
        Ok(Self::Postgres {
            base: base.to_string(),
            name,
            url,
            pool: None,
        })
    }

    /// A fresh SQLite file in `dir` (created by Herald when it starts).
    pub fn sqlite_url(dir: &std::path::Path) -> (String, PathBuf) {
        let path = dir.join("herald.db");
        (format!("sqlite://{}", path.display()), path)
    }

    /// Opens the bench's own connection to the SQLite file Herald created.
    pub async fn sqlite(path: PathBuf) -> Result<Self, String> {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(false)
            // The TRUNCATE checkpoint waits for Herald's writer; give it time.
            .busy_timeout(Duration::from_secs(30));
        let conn = sqlx::SqliteConnection::connect_with(&options)
            .await
            .map_err(db_err("SQLite"))?;
        Ok(Self::Sqlite { path, conn })
    }

    /// The URL Herald is given.
    pub fn postgres_url(&self) -> Option<&str> {
        match self {
            Db::Postgres { url, .. } => Some(url),
            Db::Sqlite { .. } => None,
        }
    }

    /// Connects the sampling pool once Herald has migrated the database.
    pub async fn attach(&mut self) -> Result<(), String> {
        if let Db::Postgres { url, pool, .. } = self {
            // One for sampling, one for the VACUUMs running beside it.
            let p = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(url)
                .await
                .map_err(db_err("PostgreSQL soak database"))?;
            *pool = Some(p);
        }
        Ok(())
    }

    fn pool(&self) -> Result<&sqlx::PgPool, String> {
        match self {
            Db::Postgres { pool: Some(p), .. } => Ok(p),
            _ => Err("PostgreSQL pool not attached".into()),
        }
    }

    pub async fn sample(&mut self) -> Result<Sample, String> {
        match self {
            Db::Sqlite { path, conn } => {
                let file = |p: PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
                let wal = PathBuf::from(format!("{}-wal", path.display()));
                let (page_count, page_size, freelist_count): (i64, i64, i64) = (
                    sqlx::query_scalar("PRAGMA page_count")
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(db_err("page_count"))?,
                    sqlx::query_scalar("PRAGMA page_size")
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(db_err("page_size"))?,
                    sqlx::query_scalar("PRAGMA freelist_count")
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(db_err("freelist_count"))?,
                );
                Ok(Sample::Sqlite {
                    db_bytes: page_count * page_size,
                    wal_bytes: file(wal),
                    file_bytes: file(path.clone()),
                    page_count,
                    freelist_count,
                })
            }
            Db::Postgres { .. } => {
                let pool = self.pool()?;
                let db_bytes: i64 =
                    sqlx::query_scalar("SELECT pg_database_size(current_database())")
                        .fetch_one(pool)
                        .await
                        .map_err(db_err("pg_database_size"))?;
                let rows = sqlx::query(
                    "SELECT s.relname::text AS name, pg_relation_size(s.relid) AS bytes, \
                     pg_indexes_size(s.relid) AS index_bytes, s.n_live_tup AS live, \
                     s.n_dead_tup AS dead, s.n_tup_upd AS upd, s.n_tup_hot_upd AS hot_upd, \
                     to_char(s.last_autovacuum, 'HH24:MI:SS') AS last_autovacuum, \
                     to_char(s.last_vacuum, 'HH24:MI:SS') AS last_vacuum \
                     FROM pg_stat_user_tables s WHERE s.schemaname = 'public' ORDER BY 1",
                )
                .fetch_all(pool)
                .await
                .map_err(db_err("pg_stat_user_tables"))?;
                let tables = rows
                    .iter()
                    .map(|r| TableStat {
                        name: r.get("name"),
                        bytes: r.get("bytes"),
                        index_bytes: r.get("index_bytes"),
                        live: r.get("live"),
                        dead: r.get("dead"),
                        upd: r.get("upd"),
                        hot_upd: r.get("hot_upd"),
                        last_autovacuum: r.get("last_autovacuum"),
                        last_vacuum: r.get("last_vacuum"),
                    })
                    .collect();
                Ok(Sample::Postgres { db_bytes, tables })
            }
        }
    }

    /// What the mid-run maintenance needs, to run in a task of its own beside the sampling.
    pub fn maintenance(&self) -> Result<Maintenance, String> {
        match self {
            Db::Sqlite { path, .. } => Ok(Maintenance::Sqlite(path.clone())),
            Db::Postgres { .. } => Ok(Maintenance::Postgres(self.pool()?.clone())),
        }
    }

    /// Closes the bench's connections and drops a PostgreSQL database.
    pub async fn close(mut self) {
        match &mut self {
            Db::Sqlite { .. } => {}
            Db::Postgres {
                pool, base, name, ..
            } => {
                if let Some(p) = pool.take() {
                    p.close().await;
                }
                drop_database(base, name).await;
                // Dropped: nothing left for Drop to do.
                name.clear();
            }
        }
    }
}

async fn drop_database(base: &str, name: &str) {
    if name.is_empty() {
        return;
    }
    match sqlx::PgConnection::connect(base).await {
        Ok(mut admin) => {
            // FORCE: the node's connections may still be closing.
            if let Err(e) = sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await
            {
                eprintln!("soak: could not drop database {name}: {e}");
            }
            let _ = admin.close().await;
        }
        Err(e) => eprintln!("soak: could not drop database {name}: {e}"),
    }
}

impl Drop for Db {
    /// A run that failed or panicked still drops its database: from a thread with a runtime
    /// of its own, as this may run inside the bench's runtime.
    fn drop(&mut self) {
        let Db::Postgres { base, name, .. } = self else {
            return;
        };
        if name.is_empty() {
            return;
        }
        let (base, name) = (base.clone(), name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(drop_database(&base, &name));
            }
        })
        .join();
    }
}

/// The mid-run maintenance, on connections apart from the sampling one.
pub enum Maintenance {
    Sqlite(PathBuf),
    Postgres(sqlx::PgPool),
}

impl Maintenance {
    /// PostgreSQL: a plain VACUUM of every table in `public`, one statement each. SQLite: a
    /// TRUNCATE checkpoint; with SOAK_SQLITE_ANALYZE=1 then fresh planner statistics as
    /// `PRAGMA optimize` takes them (ANALYZE with `analysis_limit` 400). ANALYZE holds SQLite's
    /// one write lock while it reads the indexes (0.65 s at 1 GB, 3.5 s at 3.3 GB, measured)
    /// and every writer waits it out: a stall of the bench's making, so it is not run by
    /// default; it is there to check the node's plans once SQLite has statistics. Each step is timed and printed as it ends; `elapsed`
    /// gives the run's clock for those lines.
    pub async fn run(self, elapsed: impl Fn() -> f64) -> Result<(), String> {
        let took = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
        match self {
            Maintenance::Sqlite(path) => {
                let wal = PathBuf::from(format!("{}-wal", path.display()));
                let wal_mib =
                    || std::fs::metadata(&wal).map_or(0.0, |m| m.len() as f64 / 1048576.0);
                let mut conn = Db::sqlite(path.clone()).await?;
                let Db::Sqlite { conn, .. } = &mut conn else {
                    return Err("not SQLite".into());
                };
                let before = wal_mib();
                let t = Instant::now();
                // (busy, log, checkpointed): busy 0 means it completed; after a TRUNCATE the
                // other two are 0, the WAL being empty, so its size on disk says more.
                let (busy, _, _): (i64, i64, i64) =
                    sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(db_err("wal_checkpoint"))?;
                println!(
                    "  [{:>5.0} s] maintenance: PRAGMA wal_checkpoint(TRUNCATE) took {:.1} ms, {}; \
                     WAL file {before:.1} MiB before, {:.1} MiB after",
                    elapsed(),
                    took(t),
                    if busy == 0 {
                        "completed"
                    } else {
                        "busy: not completed"
                    },
                    wal_mib(),
                );
                if std::env::var("SOAK_SQLITE_ANALYZE").is_ok_and(|v| v == "1") {
                    let t = Instant::now();
                    sqlx::raw_sql("PRAGMA analysis_limit = 400; ANALYZE")
                        .execute(&mut *conn)
                        .await
                        .map_err(db_err("ANALYZE"))?;
                    println!(
                        "  [{:>5.0} s] maintenance: ANALYZE (analysis_limit 400) took {:.1} ms",
                        elapsed(),
                        took(t)
                    );
                }
            }
            Maintenance::Postgres(pool) => {
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
                )
                .fetch_all(&pool)
                .await
                .map_err(db_err("pg_tables"))?;
                let all = Instant::now();
                for table in &tables {
                    let t = Instant::now();
                    // VACUUM refuses to run in a transaction or as a prepared statement: the
                    // simple query protocol, one statement per table.
                    sqlx::raw_sql(AssertSqlSafe(format!(
                        "VACUUM \"{}\"",
                        table.replace('"', "\"\"")
                    )))
                    .execute(&pool)
                    .await
                    .map_err(db_err("VACUUM"))?;
                    println!(
                        "  [{:>5.0} s] maintenance: VACUUM {table} took {:.1} ms",
                        elapsed(),
                        took(t)
                    );
                }
                println!(
                    "  [{:>5.0} s] maintenance: VACUUM of {} tables took {:.1} ms in all",
                    elapsed(),
                    tables.len(),
                    took(all)
                );
            }
        }
        Ok(())
    }
}
