//! MusicFS client: the async client core (`fs`, `conn`, `layout`), the FUSE
//! shim over it (`fuse`), and the admin operations the `musicfs` CLI uses.

pub mod admin;
pub mod audio;
pub mod certs;
pub mod conn;
pub mod direct;
pub mod diskcache;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod layout;
pub mod metrics;
pub mod pattern;
pub mod sync;
pub mod tags;
pub mod views;
pub mod watch;

pub use conn::{parse_seeds, Cluster, ClusterConfig};
pub use error::ClientError;
pub use fs::Fs;

/// The credentials of this process (a mount or an admin command): one
/// identity per process, set by the binary before it connects; plain TCP
/// until then.
static TRANSPORT: std::sync::OnceLock<proto::transport::Transport> = std::sync::OnceLock::new();

/// Sets this process's credentials; false if they were set already.
pub fn set_transport(t: proto::transport::Transport) -> bool {
    TRANSPORT.set(t).is_ok()
}

pub fn transport() -> proto::transport::Transport {
    TRANSPORT.get().cloned().unwrap_or_default()
}
