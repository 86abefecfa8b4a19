//! MusicFS client: the async client core (`fs`, `conn`, `layout`), the FUSE
//! shim over it (`fuse`), and the admin operations the `musicfs` CLI uses.

pub mod admin;
pub mod conn;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod layout;
pub mod metrics;
pub mod pattern;

pub use conn::{parse_seeds, Cluster, ClusterConfig};
pub use error::ClientError;
pub use fs::Fs;
