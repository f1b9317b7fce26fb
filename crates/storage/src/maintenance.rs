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
