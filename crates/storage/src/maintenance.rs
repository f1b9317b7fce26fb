//! Leader election for single-instance tasks: a session-level advisory lock on a
//! dedicated connection. It dies with the session, so a killed leader never leaves a
//! lock behind.

use crate::error::StorageError;
use sqlx::{Connection, PgConnection};

/// Advisory-lock keys, one per single-instance task.
pub mod keys {
    pub const MAINTENANCE: i64 = 0x4845_5241_4c44_0001;
    pub const RELAY: i64 = 0x4845_5241_4c44_0002;
    pub const NOTIFY_SCHEDULER: i64 = 0x4845_5241_4c44_0003;
}

/// Opens a dedicated session for holding a leader lock. The server checks every second
/// that the client is still there, so a standby blocked in `pg_advisory_lock` is
/// cleaned up when its process dies.
pub async fn leader_session(
    url: &str,
    application_name: &str,
) -> Result<PgConnection, StorageError> {
    let mut conn = PgConnection::connect(url).await?;
    sqlx::query("SELECT set_config('application_name', $1, false), set_config('client_connection_check_interval', '1s', false)")
        .bind(application_name)
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

/// Blocks inside one statement until this session holds `key`: a standby costs the
/// database no query per second while it waits.
pub async fn acquire(conn: &mut PgConnection, key: i64) -> Result<(), StorageError> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn release(conn: &mut PgConnection, key: i64) -> Result<(), StorageError> {
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(conn)
        .await?;
    Ok(())
}

/// The tables every job passes through several times. Their dead rows lengthen the
/// dispatcher's index scans until a vacuum removes them.
pub const HOT_TABLES: &[&str] = &["agents", "builds", "jobs", "outbox"];

/// A hot table to vacuum, and whether its statistics are stale enough to analyze too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VacuumTarget {
    pub table: String,
    pub analyze: bool,
}

/// Which hot tables have at least `min_dead` dead rows (statistics, no table scan).
/// ANALYZE samples up to 30,000 rows however little changed, so it only comes along
/// once a fifth of the table (and at least `min_dead` rows) changed since the last one.
pub async fn tables_to_vacuum(
    conn: &mut PgConnection,
    min_dead: i64,
) -> Result<Vec<VacuumTarget>, StorageError> {
    if min_dead <= 0 {
        return Ok(Vec::new());
    }
    let rows: Vec<(String, bool)> = sqlx::query_as(
        "SELECT relname::text, \
                n_mod_since_analyze >= greatest($2, n_live_tup / 5) OR last_analyze IS NULL \
         FROM pg_stat_user_tables \
         WHERE schemaname = current_schema() AND relname = ANY($1) AND n_dead_tup >= $2 \
         ORDER BY relname",
    )
    .bind(HOT_TABLES)
    .bind(min_dead)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(table, analyze)| VacuumTarget { table, analyze })
        .collect())
}

/// `VACUUM` (with `ANALYZE` when asked) of one hot table, outside any transaction. It
/// takes no lock that blocks reads or writes.
pub async fn vacuum(conn: &mut PgConnection, target: &VacuumTarget) -> Result<(), StorageError> {
    let Some(table) = HOT_TABLES.iter().find(|t| **t == target.table) else {
        return Err(StorageError::Conflict(format!(
            "{} is not a hot table",
            target.table
        )));
    };
    let sql = if target.analyze {
        format!("VACUUM (ANALYZE) {table}")
    } else {
        format!("VACUUM {table}")
    };
    sqlx::query(&sql).persistent(false).execute(conn).await?;
    Ok(())
}
