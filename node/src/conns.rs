//! A bound on the connections a node keeps open: in all, and from any one
//! address, so that a flood of idle connections from one host can neither
//! use up the node's file descriptors nor crowd out its peers and mounts.
//! A connection over the bound is closed as soon as it is accepted.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How many connections a node accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    pub total: usize,
    pub per_address: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            total: 8192,
            per_address: 512,
        }
    }
}

/// The connections open now, by the address they came from.
pub struct ConnTable {
    limits: ConnLimits,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one admitted connection's place until it is dropped.
pub struct ConnGuard {
    table: Arc<ConnTable>,
    ip: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Total(usize),
    Address(usize),
}

impl ConnTable {
    pub fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(ConnTable {
            limits,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for a new connection from `ip`, if the limits allow one.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, Refused> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = open.values().sum();
        if total >= self.limits.total {
            return Err(Refused::Total(total));
        }
        let here = open.entry(ip).or_insert(0);
        if *here >= self.limits.per_address {
            return Err(Refused::Address(*here));
        }
        *here += 1;
        Ok(ConnGuard {
            table: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }
}

/// An admitted connection: gives its place back when tonic drops it.
pub struct Counted {
    inner: TcpStream,
    _guard: ConnGuard,
}

impl Counted {
    pub fn new(inner: TcpStream, guard: ConnGuard) -> Self {
        Counted {
            inner,
            _guard: guard,
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = <TcpStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Raises the soft limit on open files to the hard one: a node started
/// from a shell often has 1,024, too few for its connections, chunk files
/// and RocksDB's tables. Returns the limit in force.
pub fn raise_nofile_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 0;
        }
        if l.rlim_cur < l.rlim_max {
            let want = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    l.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_per_address_and_in_all_and_given_back() {
        let t = ConnTable::new(ConnLimits {
            total: 3,
            per_address: 2,
        });
        let a: IpAddr = "127.0.0.1".parse().expect("ip");
        let b: IpAddr = "127.0.0.2".parse().expect("ip");
        let g1 = t.admit(a).expect("first");
        let g2 = t.admit(a).expect("second");
        assert_eq!(t.admit(a).err(), Some(Refused::Address(2)));
        let g3 = t.admit(b).expect("another address");
        assert_eq!(t.admit(b).err(), Some(Refused::Total(3)));
        assert_eq!(t.open(), 3);
        drop(g1);
        assert_eq!(t.open(), 2);
        let _g4 = t.admit(a).expect("a place given back is taken again");
        drop((g2, g3));
        assert_eq!(t.open(), 1);
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_one() {
        let got = raise_nofile_limit();
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit with a valid pointer to a local struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
        assert_eq!(l.rlim_cur, l.rlim_max);
        assert_eq!(got, l.rlim_cur);
    }
}
