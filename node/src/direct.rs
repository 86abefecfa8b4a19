//! The node's side of the direct chunk protocol (`proto::chunkwire`): the
//! listener's connections are sorted by their first byte, gRPC's go to
//! tonic, direct ones are served here: reads with `sendfile`, uploads into
//! an aligned buffer that the chunk store writes with `O_DIRECT`.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use proto::chunkwire::{
    decode_request_head, encode_reply_head, FIRST_BYTE, HELLO, MAX_TAG_LEN, OP_GET, OP_PUT,
    REQUEST_HEAD, STATUS_BAD_REQUEST, STATUS_ERROR, STATUS_NOT_FOUND, STATUS_OK, STATUS_REFUSED,
};
use proto::transport::Transport;
use proto::ChunkId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::aligned::AlignedBuf;
use crate::chunkstore::{ChunkStore, MAX_CHUNK_BYTES};
use crate::conns::{ConnTable, Counted, Refused};

// A reply announcing a chunk the client's bound refuses would never be read.
const _: () = assert!(MAX_CHUNK_BYTES <= proto::chunkwire::MAX_REPLY_BYTES as usize);
// The largest upload fits the budget, so its permits can always be had.
const _: () = assert!(MAX_CHUNK_BYTES <= UPLOAD_BUDGET_MIB << 20);

/// How long a new connection may take to send its first byte, and a direct
/// connection to send its next request, before it is closed.
const IDLE: Duration = Duration::from_secs(60);
/// How long one reply may wait on a client that does not read.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Memory all direct uploads of a node may hold at once, in MiB: an
/// upload's buffer is taken before its bytes arrive, so a client that
/// announces chunks and sends nothing must not make the node allocate
/// without bound. Uploads past it wait.
const UPLOAD_BUDGET_MIB: usize = 256;

/// How long an upload's body of `len` bytes may take to arrive once its
/// budget is held: 5 s and a second per MiB.
fn body_deadline(len: usize) -> Duration {
    Duration::from_secs(5) + Duration::from_secs_f64(len as f64 / f64::from(1u32 << 20))
}
static UPLOAD_BUDGET: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(UPLOAD_BUDGET_MIB);

/// Accepts connections on `listener` and returns the gRPC ones as a stream
/// for tonic. With `direct` (a cluster without TLS), connections that open
/// with the direct protocol's hello are served here; otherwise they go to
/// tonic too, which refuses them. The task ends with the returned handle.
pub fn split_incoming(
    listener: TcpListener,
    store: Arc<ChunkStore>,
    wire: Transport,
    conns: Arc<ConnTable>,
    direct: bool,
) -> (
    ReceiverStream<io::Result<Counted>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it
                    // was accepted: the listener itself is fine.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let guard = match conns.admit(peer.ip()) {
                Ok(g) => g,
                Err(why) => {
                    let reason = match why {
                        Refused::Total(_) => "total",
                        Refused::Address(_) => "address",
                    };
                    crate::metrics::connection_refused(reason);
                    tracing::debug!(%peer, ?why, "connection over the limit closed");
                    continue;
                }
            };
            crate::metrics::connections(conns.open());
            // Without TCP_NODELAY, small replies wait on delayed ACKs.
            let _ = stream.set_nodelay(true);
            let ka = socket2::TcpKeepalive::new().with_time(Duration::from_secs(10));
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka);
            let (tx, store, wire) = (tx.clone(), store.clone(), wire.clone());
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                match tokio::time::timeout(IDLE, stream.peek(&mut first)).await {
                    Ok(Ok(1)) if direct && first[0] == FIRST_BYTE => {
                        if let Err(e) = serve(stream, store, wire).await {
                            tracing::debug!(error = %e, "direct chunk connection ended");
                        }
                        drop(guard);
                    }
                    Ok(Ok(1)) => {
                        let _ = tx.send(Ok(Counted::new(stream, guard))).await;
                    }
                    // Closed or silent before its first byte.
                    _ => {}
                }
            });
        }
    });
    (ReceiverStream::new(rx), task)
}

/// Tags come from the network: only the `CLIENT:SEQ` shape is logged.
fn clean_tag(raw: &[u8]) -> String {
    let ok = raw.iter().all(|b| b.is_ascii_hexdigit() || *b == b':');
    if ok {
        String::from_utf8_lossy(raw).into_owned()
    } else {
        String::new()
    }
}

async fn serve(mut stream: TcpStream, store: Arc<ChunkStore>, wire: Transport) -> io::Result<()> {
    let mut hello = [0u8; HELLO.len()];
    tokio::time::timeout(IDLE, stream.read_exact(&mut hello)).await??;
    if hello != HELLO {
        send_reply(&mut stream, STATUS_BAD_REQUEST, b"unknown protocol version").await?;
        return Ok(());
    }
    loop {
        let mut head = [0u8; REQUEST_HEAD];
        match tokio::time::timeout(IDLE, stream.read_exact(&mut head)).await {
            // Idle, or the client closed it: both are the normal end.
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(_)) => {}
        }
        let (op, id, tag_len) = decode_request_head(&head);
        if !matches!(op, OP_GET | OP_PUT) || tag_len > MAX_TAG_LEN {
            let msg = format!("unknown request {op} (tag of {tag_len} bytes)");
            send_reply(&mut stream, STATUS_BAD_REQUEST, msg.as_bytes()).await?;
            return Ok(());
        }
        let mut tag = vec![0u8; tag_len];
        tokio::time::timeout(IDLE, stream.read_exact(&mut tag)).await??;
        let tag = clean_tag(&tag);
        let id = ChunkId(id);
        let start = Instant::now();
        if op == OP_PUT {
            if !receive_put(&mut stream, &store, &wire, id, &tag).await? {
                return Ok(());
            }
            continue;
        }
        // The send blocks on the disk when the chunk is not in the page
        // cache: it runs on the blocking pool with the socket in blocking
        // mode, bounded by a send timeout.
        let sock = stream.into_std()?;
        sock.set_nonblocking(false)?;
        let store2 = store.clone();
        let (sock, res) = tokio::task::spawn_blocking(move || {
            let r = send_chunk(&sock, &store2, &id);
            (sock, r)
        })
        .await
        .map_err(io::Error::other)?;
        sock.set_nonblocking(true)?;
        stream = TcpStream::from_std(sock)?;
        match res {
            Ok((status, len)) => {
                tracing::debug!(req = %tag, %id, status, bytes = len, "direct chunk read");
                crate::metrics::direct_read("0", start.elapsed());
            }
            Err(e) => {
                tracing::debug!(req = %tag, %id, error = %e, "direct chunk read failed");
                crate::metrics::direct_read("transport", start.elapsed());
                return Err(e);
            }
        }
    }
}

/// Reads an upload's length and bytes, stores the chunk and replies.
/// Returns false when the connection is to be closed (a length no chunk
/// has: what follows it cannot be framed).
async fn receive_put(
    stream: &mut TcpStream,
    store: &Arc<ChunkStore>,
    wire: &Transport,
    id: ChunkId,
    tag: &str,
) -> io::Result<bool> {
    let start = Instant::now();
    let mut len = [0u8; 4];
    tokio::time::timeout(IDLE, stream.read_exact(&mut len)).await??;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_CHUNK_BYTES {
        let msg = format!("chunk of {len} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit");
        send_reply(stream, STATUS_BAD_REQUEST, msg.as_bytes()).await?;
        crate::metrics::direct_put("INVALID", start.elapsed());
        return Ok(false);
    }
    let mib = len.div_ceil(1 << 20).max(1) as u32;
    let _budget = UPLOAD_BUDGET
        .acquire_many(mib)
        .await
        .map_err(io::Error::other)?;
    // Straight from the socket to where the disk reads it. A sender that
    // announces a chunk and then stalls holds budget others wait for: the
    // body must arrive at 1 MiB/s or better (plus a few seconds).
    let mut buf = AlignedBuf::new(len);
    tokio::time::timeout(body_deadline(len), stream.read_exact(buf.as_mut_slice())).await??;
    let store = store.clone();
    let res = match tokio::task::spawn_blocking(move || store.put(&id, buf.as_slice())).await {
        Ok(r) => r,
        Err(e) => {
            // Said before the connection closes: a silent close would
            // read as a node without the protocol.
            let msg = format!("storing chunk {id} failed: {e}");
            let _ = send_reply(stream, STATUS_ERROR, msg.as_bytes()).await;
            crate::metrics::direct_put("INTERNAL", start.elapsed());
            return Err(io::Error::other(msg));
        }
    };
    let (status, payload, code) = match res {
        Ok(stored) => {
            tracing::debug!(req = %tag, %id, bytes = len, new = stored, "chunk stored");
            // Whether it is new, then the node's receipt for the commit.
            let mut payload = vec![u8::from(stored)];
            if let Some(r) = wire.receipt(&id.0, len as u64) {
                r.encode(&mut payload).map_err(io::Error::other)?;
            }
            (STATUS_OK, payload, "0")
        }
        Err(e) => {
            tracing::warn!(req = %tag, %id, error = %e, "chunk put refused");
            let w = crate::chunk_service::chunk_error(&e);
            let code = w.code().as_str_name();
            (STATUS_REFUSED, w.encode_to_vec(), code)
        }
    };
    // Counted before the reply: a client that has its answer finds the
    // upload in the node's metrics.
    crate::metrics::direct_put(code, start.elapsed());
    tokio::time::timeout(SEND_TIMEOUT, send_reply(stream, status, &payload)).await??;
    Ok(true)
}

/// Sends a reply of `status` carrying `payload` (a message, or an
/// upload's answer) in one write.
async fn send_reply(stream: &mut TcpStream, status: u8, payload: &[u8]) -> io::Result<()> {
    let mut out = encode_reply_head(status, payload.len() as u32).to_vec();
    out.extend_from_slice(payload);
    stream.write_all(&out).await
}

/// Replies with a status and a message.
fn reply(mut sock: &std::net::TcpStream, status: u8, msg: &str) -> io::Result<(u8, u64)> {
    let mut out = encode_reply_head(status, msg.len() as u32).to_vec();
    out.extend_from_slice(msg.as_bytes());
    sock.write_all(&out)?;
    Ok((status, 0))
}

/// Sends chunk `id`'s file as the reply: (status, bytes sent).
fn send_chunk(
    sock: &std::net::TcpStream,
    store: &ChunkStore,
    id: &ChunkId,
) -> io::Result<(u8, u64)> {
    sock.set_write_timeout(Some(SEND_TIMEOUT))?;
    let path = store.path_of(id);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return reply(sock, STATUS_NOT_FOUND, &format!("chunk {id} not found"))
        }
        Err(e) => return reply(sock, STATUS_ERROR, &format!("{}: {e}", path.display())),
    };
    let len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return reply(sock, STATUS_ERROR, &format!("{}: {e}", path.display())),
    };
    if len > MAX_CHUNK_BYTES as u64 {
        return reply(
            sock,
            STATUS_ERROR,
            &format!("{}: {len} bytes is larger than any chunk", path.display()),
        );
    }
    let head = encode_reply_head(STATUS_OK, len as u32);
    // MSG_MORE: the header goes out in one segment with the data.
    // SAFETY: `head` outlives the call; the descriptor is the live socket.
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            head.as_ptr().cast(),
            head.len(),
            libc::MSG_MORE,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if (n as usize) < head.len() {
        let mut s = sock;
        s.write_all(&head[n as usize..])?;
    }
    let mut off: libc::off_t = 0;
    while (off as u64) < len {
        let want = (len - off as u64) as usize;
        // SAFETY: both descriptors are open for the call; `off` is ours.
        let n = unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut off, want) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            // The file shrank under us: the client sees a cut reply and
            // asks another replica.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} is shorter than its length", path.display()),
            ));
        }
    }
    Ok((STATUS_OK, len))
}
