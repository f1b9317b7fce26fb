use lapin::protocol::{AMQPErrorKind, AMQPSoftError};

/// Everything that can go wrong talking to the broker.
#[derive(thiserror::Error, Debug)]
pub enum BusError {
    /// An error reported by the AMQP client (I/O, protocol, closed channel or connection...).
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    /// An operation did not complete in time.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The broker negatively acknowledged some published messages.
    #[error("broker nacked {nacked} of {total} published messages")]
    Nacked { nacked: usize, total: usize },
    /// A passive declare found no such queue.
    #[error("queue not found: {0}")]
    QueueNotFound(String),
    /// The bus was called outside a tokio runtime.
    #[error("no tokio runtime")]
    NoRuntime,
    /// Invalid argument (e.g. an empty queue name).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl BusError {
    /// True when the broker replied NOT_FOUND (404) to the request.
    pub fn is_not_found(&self) -> bool {
        match self {
            BusError::QueueNotFound(_) => true,
            BusError::Amqp(lapin::Error::ProtocolError(e)) => {
                matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
            }
            _ => false,
        }
    }

    /// True when the broker refused a declaration that conflicts with an existing entity
    /// (PRECONDITION_FAILED, 406), e.g. a queue declared with other arguments.
    pub fn is_precondition_failed(&self) -> bool {
        match self {
            BusError::Amqp(lapin::Error::ProtocolError(e)) => {
                matches!(
                    e.kind(),
                    AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
                )
            }
            _ => false,
        }
    }
}
