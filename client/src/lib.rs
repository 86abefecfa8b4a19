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

/// Exit status of a command whose stdout was closed under it, as for a
/// process that SIGPIPE ended (128 + 13).
pub const EXIT_BROKEN_PIPE: i32 = 141;

/// Writes the CLI's output. `print!` panics when stdout is a pipe whose
/// reader has gone (`musicfs search ... | head`); the CLI ends quietly
/// then, as Unix tools do. SIGPIPE itself stays ignored: it would also
/// end the process on a cluster connection that breaks mid-write.
#[doc(hidden)]
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        stdout_failed(&e);
    }
}

/// Ends the CLI after a failed write to stdout: quietly when its reader
/// has gone, with the error otherwise.
pub fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(EXIT_BROKEN_PIPE);
    }
    eprintln!("error: writing to stdout: {e}");
    std::process::exit(1)
}

/// `println!` for the CLI's output (see [`write_stdout`]).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::write_stdout(::std::format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::write_stdout(::std::format_args!("{}\n", ::std::format_args!($($arg)*)))
    };
}

/// `print!` for the CLI's output (see [`write_stdout`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_stdout(::std::format_args!($($arg)*))
    };
}
