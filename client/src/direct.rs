//! The client's side of the direct chunk protocol (`proto::chunkwire`):
//! chunk reads and uploads on plain TCP connections to the nodes' gRPC
//! ports, kept open in a small pool per node.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use proto::chunkwire::{
    decode_reply_head, encode_get, encode_put, HELLO, REPLY_HEAD, STATUS_BAD_REQUEST, STATUS_ERROR,
    STATUS_NOT_FOUND, STATUS_OK, STATUS_REFUSED,
};
use proto::meta::Error as WireError;
use proto::ChunkId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Idle connections kept per node.
const IDLE_PER_NODE: usize = 16;
/// A pooled connection idle longer than this is not reused: the node
/// closes idle connections after a minute.
const IDLE_REUSE: Duration = Duration::from_secs(45);
/// How long direct transfers with a node stay off after it answered with
/// something other than the protocol (a node of an older version).
const OFF_FOR: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest error message a node may send.
const MAX_MESSAGE: u32 = 64 << 10;

/// What one direct read came to.
pub enum Direct {
    /// The chunk's bytes (not verified yet).
    Chunk(Bytes),
    /// The node does not hold the chunk.
    NotFound(String),
    /// No answer on this protocol: the caller asks the node over gRPC,
    /// which fails the same way if the node is down.
    Refused(String),
}

/// What one direct upload came to.
#[derive(Debug)]
pub enum DirectPut {
    /// Held durably; true if the node stored it now, false if it had it;
    /// the node's receipt for the commit.
    Stored(bool, Option<proto::meta::Receipt>),
    /// The node refused it (a full disk, bytes that do not match the id).
    Refused(WireError),
    /// The node took the request and then failed or did not answer in
    /// time: the replica failed, as a gRPC upload would have.
    Failed(String),
    /// No answer on this protocol (a node without it): the caller
    /// uploads over gRPC.
    Unanswered(String),
}

pub struct DirectChunks {
    idle: Mutex<HashMap<String, Vec<(TcpStream, Instant)>>>,
    off: Mutex<HashMap<String, Instant>>,
    local: Option<IpAddr>,
    timeout: Duration,
}

/// How a read on one connection failed.
struct Cut {
    /// Some reply byte arrived (the connection was not merely stale).
    answered: bool,
    why: String,
}

impl DirectChunks {
    pub fn new(local: Option<IpAddr>, timeout: Duration) -> Self {
        DirectChunks {
            idle: Mutex::new(HashMap::new()),
            off: Mutex::new(HashMap::new()),
            local,
            timeout,
        }
    }

    /// False while direct transfers with `addr` are off.
    pub fn usable(&self, addr: &str) -> bool {
        let mut off = self.off.lock().unwrap_or_else(|e| e.into_inner());
        match off.get(addr) {
            Some(until) if Instant::now() < *until => false,
            Some(_) => {
                off.remove(addr);
                true
            }
            None => true,
        }
    }

    fn turn_off(&self, addr: &str, why: &str) {
        let mut off = self.off.lock().unwrap_or_else(|e| e.into_inner());
        if off
            .insert(addr.to_string(), Instant::now() + OFF_FOR)
            .is_none()
        {
            tracing::info!(%addr, why, "direct chunk transfers off for this node; using gRPC");
        }
    }

    fn take_idle(&self, addr: &str) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.get_mut(addr)?;
        while let Some((s, at)) = conns.pop() {
            if at.elapsed() < IDLE_REUSE {
                return Some(s);
            }
        }
        None
    }

    fn put_idle(&self, addr: &str, s: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.entry(addr.to_string()).or_default();
        if conns.len() < IDLE_PER_NODE {
            conns.push((s, Instant::now()));
        }
    }

    async fn connect(&self, addr: &str) -> std::io::Result<TcpStream> {
        let target = tokio::net::lookup_host(addr)
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to no address")))?;
        let connect = async {
            let s = match self.local {
                None => TcpStream::connect(target).await?,
                Some(ip) => {
                    let sock = if target.is_ipv4() {
                        TcpSocket::new_v4()?
                    } else {
                        TcpSocket::new_v6()?
                    };
                    sock.bind((ip, 0).into())?;
                    sock.connect(target).await?
                }
            };
            s.set_nodelay(true)?;
            let mut s = s;
            s.write_all(&HELLO).await?;
            Ok(s)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {CONNECT_TIMEOUT:?}"),
                ))
            })
    }

    /// Reads chunk `id` from the node at `addr`.
    pub async fn get(&self, addr: &str, id: &ChunkId, tag: &str) -> Direct {
        match self.request(addr, &encode_get(&id.0, tag), &[]).await {
            Ok((STATUS_OK, data)) => Direct::Chunk(data),
            Ok((status, msg)) => {
                let msg = format!("{addr}: {}", String::from_utf8_lossy(&msg));
                if status == STATUS_NOT_FOUND {
                    Direct::NotFound(msg)
                } else {
                    Direct::Refused(msg)
                }
            }
            Err(n) => Direct::Refused(n.why),
        }
    }

    /// Uploads chunk `id` (`data`, not checked here: the node verifies it
    /// against the id) to the node at `addr`.
    pub async fn put(&self, addr: &str, id: &ChunkId, data: &[u8], tag: &str) -> DirectPut {
        let Ok(len) = u32::try_from(data.len()) else {
            return DirectPut::Unanswered(format!("{addr}: chunk of {} bytes", data.len()));
        };
        match self.request(addr, &encode_put(&id.0, tag, len), data).await {
            Ok((STATUS_OK, r)) => {
                let receipt = r
                    .get(1..)
                    .filter(|rest| !rest.is_empty())
                    .and_then(|rest| proto::meta::Receipt::decode(rest).ok());
                DirectPut::Stored(r.first() == Some(&1), receipt)
            }
            Ok((STATUS_REFUSED, r)) => match WireError::decode(r) {
                Ok(e) => DirectPut::Refused(e),
                Err(e) => DirectPut::Unanswered(format!("{addr}: undecodable refusal: {e}")),
            },
            Ok((_, msg)) => DirectPut::Failed(format!("{addr}: {}", String::from_utf8_lossy(&msg))),
            // A slow or failing node: sending the chunk again over gRPC
            // would only wait as long once more.
            Err(n) if n.answered => DirectPut::Failed(n.why),
            Err(n) => DirectPut::Unanswered(n.why),
        }
    }

    /// Sends `head` and `body` to `addr` and returns the reply's (status,
    /// payload), or why there is none. A pooled connection the node has
    /// closed fails before any reply byte: then once more on a fresh one
    /// (both requests may be sent twice: a read, and an upload of bytes
    /// named by their hash).
    async fn request(&self, addr: &str, head: &[u8], body: &[u8]) -> Result<(u8, Bytes), NoReply> {
        let fail = |answered: bool, why: String| NoReply { answered, why };
        for _ in 0..2 {
            let (mut s, pooled) = match self.take_idle(addr) {
                Some(s) => (s, true),
                None => match self.connect(addr).await {
                    Ok(s) => (s, false),
                    Err(e) => return Err(fail(false, format!("{addr}: {e}"))),
                },
            };
            let res = tokio::time::timeout(self.timeout, exchange(&mut s, head, body))
                .await
                .unwrap_or_else(|_| {
                    Err(Cut {
                        answered: true,
                        why: format!("no reply within {:?}", self.timeout),
                    })
                });
            match res {
                Ok((STATUS_BAD_REQUEST, msg)) => {
                    let msg = format!("{addr}: {}", String::from_utf8_lossy(&msg));
                    self.turn_off(addr, &msg);
                    return Err(fail(false, msg));
                }
                Ok(reply) => {
                    self.put_idle(addr, s);
                    return Ok(reply);
                }
                Err(c) if pooled && !c.answered => continue,
                Err(c) => {
                    // A fresh connection closed without a reply: a node
                    // that does not speak the protocol.
                    if !c.answered && !pooled {
                        self.turn_off(addr, &c.why);
                    }
                    return Err(fail(c.answered, format!("{addr}: {}", c.why)));
                }
            }
        }
        Err(fail(false, format!("{addr}: connection closed twice")))
    }
}

/// A request without a usable reply.
struct NoReply {
    /// The node answered in part or not in time: it speaks the protocol
    /// and failed this request.
    answered: bool,
    why: String,
}

/// Sends one request and reads its reply: (status, payload).
async fn exchange(s: &mut TcpStream, head: &[u8], body: &[u8]) -> Result<(u8, Bytes), Cut> {
    let quiet = |e: std::io::Error| Cut {
        answered: false,
        why: e.to_string(),
    };
    s.write_all(head).await.map_err(quiet)?;
    s.write_all(body).await.map_err(quiet)?;
    let mut head = [0u8; REPLY_HEAD];
    s.read_exact(&mut head).await.map_err(quiet)?;
    let (status, len) = decode_reply_head(&head);
    let known = matches!(
        status,
        STATUS_OK | STATUS_NOT_FOUND | STATUS_ERROR | STATUS_BAD_REQUEST | STATUS_REFUSED
    );
    let limit = if status == STATUS_OK {
        proto::chunkwire::MAX_REPLY_BYTES
    } else {
        MAX_MESSAGE
    };
    if !known || len > limit {
        return Err(Cut {
            answered: false,
            why: format!("not a direct-protocol reply (status {status}, length {len})"),
        });
    }
    let cut = |e: std::io::Error| Cut {
        answered: true,
        why: format!("reply cut short: {e}"),
    };
    // Read into spare capacity: the buffer is the one the cache keeps.
    let len = len as usize;
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let n = s.read_buf(&mut buf).await.map_err(cut)?;
        if n == 0 {
            return Err(cut(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok((status, Bytes::from(buf)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::chunkwire::{encode_reply_head, REQUEST_HEAD};
    use tokio::net::TcpListener;

    /// A listener on a free loopback port, and its address.
    async fn listener() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        (l, addr)
    }

    /// A node that serves `data` for any id, `replies` times per
    /// connection, then closes the connection.
    async fn fake_node(data: &'static [u8], replies: usize) -> String {
        let (l, addr) = listener().await;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut hello = [0u8; HELLO.len()];
                    s.read_exact(&mut hello).await.expect("hello");
                    assert_eq!(hello, HELLO);
                    for _ in 0..replies {
                        let mut head = [0u8; REQUEST_HEAD];
                        if s.read_exact(&mut head).await.is_err() {
                            return;
                        }
                        let mut tag = vec![0u8; head[REQUEST_HEAD - 1] as usize];
                        s.read_exact(&mut tag).await.expect("tag");
                        s.write_all(&encode_reply_head(STATUS_OK, data.len() as u32))
                            .await
                            .expect("head");
                        s.write_all(data).await.expect("data");
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_closed_pooled_connection_is_replaced() {
        let addr = fake_node(b"chunk bytes", 1).await;
        let d = DirectChunks::new(None, Duration::from_secs(5));
        let id = ChunkId::of(b"chunk bytes");
        for round in 0..3 {
            match d.get(&addr, &id, "1:2").await {
                Direct::Chunk(b) => assert_eq!(&b[..], b"chunk bytes", "round {round}"),
                Direct::NotFound(m) | Direct::Refused(m) => panic!("round {round}: {m}"),
            }
        }
        assert!(d.usable(&addr));
    }

    #[tokio::test]
    async fn a_node_without_the_protocol_turns_it_off() {
        // Accepts and closes at once, as a node without the protocol
        // closes a connection that does not start with HTTP/2's preface.
        let (l, addr) = listener().await;
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        let d = DirectChunks::new(None, Duration::from_secs(5));
        let id = ChunkId::of(b"x");
        assert!(matches!(d.get(&addr, &id, "").await, Direct::Refused(_)));
        assert!(!d.usable(&addr), "direct reads stay off for that node");
    }

    /// A node that takes every request (an upload's body included) and
    /// never answers.
    async fn silent_node() -> String {
        let (l, addr) = listener().await;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_upload_a_node_takes_and_never_answers_fails_the_replica() {
        let addr = silent_node().await;
        let d = DirectChunks::new(None, Duration::from_millis(300));
        let data = vec![5u8; 100 << 10];
        match d.put(&addr, &ChunkId::of(&data), &data, "").await {
            DirectPut::Failed(why) => assert!(why.contains("no reply"), "{why}"),
            DirectPut::Stored(..) => panic!("stored without an answer"),
            DirectPut::Refused(e) => panic!("refused: {e:?}"),
            // Sending it again over gRPC would wait as long once more.
            DirectPut::Unanswered(why) => panic!("handed to gRPC: {why}"),
        }
        assert!(d.usable(&addr), "a slow node still speaks the protocol");
    }

    #[tokio::test]
    async fn an_upload_to_a_node_without_the_protocol_goes_to_grpc() {
        // A node that knows reads only: it refuses the upload's op.
        let (l, addr) = listener().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut head = [0u8; HELLO.len() + REQUEST_HEAD];
            s.read_exact(&mut head).await.expect("head");
            let msg = b"unknown request 2";
            let _ = s
                .write_all(&encode_reply_head(STATUS_BAD_REQUEST, msg.len() as u32))
                .await;
            let _ = s.write_all(msg).await;
        });
        let d = DirectChunks::new(None, Duration::from_secs(5));
        let data = b"tag chunk".to_vec();
        assert!(matches!(
            d.put(&addr, &ChunkId::of(&data), &data, "").await,
            DirectPut::Unanswered(_)
        ));
        assert!(!d.usable(&addr), "direct transfers stay off for that node");
    }

    #[tokio::test]
    async fn a_reply_longer_than_any_chunk_is_refused() {
        let (l, addr) = listener().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(&encode_reply_head(STATUS_OK, u32::MAX)).await;
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        let d = DirectChunks::new(None, Duration::from_secs(5));
        assert!(matches!(
            d.get(&addr, &ChunkId::of(b"y"), "").await,
            Direct::Refused(_)
        ));
    }
}
