use herald_domain::TransitionError;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StorageError {
    pub fn is_unique_violation(err: &sqlx::Error) -> bool {
        matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
    }

    /// The database could not be reached, or dropped the connection (a restart, a
    /// failover, a full pool), as opposed to a query that failed: worth a retry on a
    /// fresh connection, and a 503 to the client.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StorageError::Database(e) if is_connection_error(e))
    }

    /// A value PostgreSQL refused as data (a NUL in text, a number out of range): the
    /// input's fault, not the server's.
    pub fn is_bad_data(&self) -> bool {
        matches!(self, StorageError::Database(sqlx::Error::Database(db))
            if db.code().is_some_and(|c| matches!(c.as_ref(), "22021" | "22P05" | "22003" | "22P02" | "54000")))
    }
}

/// SQLSTATE class 08 (connection exception), 57P01-57P03 (admin shutdown, crash
/// shutdown, cannot connect now), 53300 (too many connections), and every error of the
/// transport or the pool itself.
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}
