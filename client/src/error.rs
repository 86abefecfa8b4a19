//! Errors of the client core, and their one mapping to errno.

use proto::meta::{Error as WireError, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The cluster answered with a definite error about the operation.
    #[error("{0}")]
    Server(WireError),
    /// No node answered in time; the operation may or may not have happened.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// A chunk could not be read intact from any replica.
    #[error("chunk {id} unreadable: {reason}")]
    ChunkUnreadable { id: String, reason: String },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("bad file handle {0}")]
    BadHandle(u64),
    #[error("cannot connect to the cluster: {0}")]
    Connect(String),
    /// The cluster refused the caller: no or a wrong admin token, or a
    /// certificate that may not make the call.
    #[error("not allowed: {0}")]
    Denied(String),
    /// Reading or writing a local file (put, get) failed.
    #[error("local file: {0}")]
    Local(String),
    /// A change asked of something read-only (a tag view).
    #[error("read-only: {0}")]
    ReadOnly(String),
}

impl ClientError {
    /// A failed call to the node at `addr`: refusals are told apart from
    /// a node that could not answer.
    pub fn from_status(addr: &str, s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                ClientError::Denied(format!("{addr}: {}", s.message()))
            }
            _ => ClientError::Unavailable(format!("{addr}: {}", s.message())),
        }
    }

    pub fn server(code: ErrorCode, msg: impl Into<String>) -> Self {
        ClientError::Server(WireError::new(code, msg))
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => Some(e.code()),
            _ => None,
        }
    }

    /// Whether the operation may have taken effect despite the error: the
    /// cluster gave no definite answer (a lost reply, a deadline passed).
    pub fn is_indefinite(&self) -> bool {
        match self {
            ClientError::Server(e) => matches!(
                e.code(),
                ErrorCode::Ok | ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::NotLeader
            ),
            ClientError::Unavailable(_) | ClientError::Connect(_) => true,
            _ => false,
        }
    }

    /// The errno a file-system call reports for this error. Transient errors
    /// are EIO (never ENOENT): a file must not look deleted because a node is
    /// slow.
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::Server(e) => match e.code() {
                // An error without a known code (a newer server): treat as transient.
                ErrorCode::Ok => libc::EIO,
                ErrorCode::NotFound => libc::ENOENT,
                ErrorCode::Exists => libc::EEXIST,
                ErrorCode::NotDir => libc::ENOTDIR,
                ErrorCode::IsDir => libc::EISDIR,
                ErrorCode::NotEmpty => libc::ENOTEMPTY,
                ErrorCode::Invalid => libc::EINVAL,
                ErrorCode::NameTooLong => libc::ENAMETOOLONG,
                ErrorCode::TooManyLinks => libc::EMLINK,
                ErrorCode::Permission => libc::EPERM,
                ErrorCode::NoSpace => libc::ENOSPC,
                ErrorCode::FileTooBig => libc::EFBIG,
                ErrorCode::Busy => libc::EAGAIN,
                ErrorCode::NotLeader
                | ErrorCode::Unavailable
                | ErrorCode::CrossShard
                | ErrorCode::Corrupt
                | ErrorCode::Internal
                | ErrorCode::WrongCluster
                | ErrorCode::NotInitialized
                | ErrorCode::AlreadyInitialized
                | ErrorCode::UnknownChunk
                | ErrorCode::Stale => libc::EIO,
            },
            ClientError::Unavailable(_) | ClientError::ChunkUnreadable { .. } => libc::EIO,
            ClientError::Connect(_) => libc::EIO,
            ClientError::Invalid(_) => libc::EINVAL,
            ClientError::BadHandle(_) => libc::EBADF,
            ClientError::Denied(_) => libc::EACCES,
            ClientError::Local(_) => libc::EIO,
            ClientError::ReadOnly(_) => libc::EROFS,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_never_look_like_missing_files() {
        for e in [
            ClientError::Unavailable("x".into()),
            ClientError::server(ErrorCode::NotLeader, "x"),
            ClientError::server(ErrorCode::Unavailable, "x"),
            ClientError::ChunkUnreadable {
                id: "a".into(),
                reason: "b".into(),
            },
        ] {
            assert_eq!(e.errno(), libc::EIO, "{e}");
        }
        assert_eq!(
            ClientError::server(ErrorCode::NotFound, "x").errno(),
            libc::ENOENT
        );
        assert_eq!(
            ClientError::server(ErrorCode::NameTooLong, "x").errno(),
            libc::ENAMETOOLONG
        );
    }
}
