//! A TCP proxy in front of kube-apiserver, through which every component
//! under test connects. It answers nothing itself (TLS passes through
//! untouched): it only drops connections, or refuses them for a while, so
//! faults happen at the network level exactly as a client would see them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy currently does with connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Forwards; connections accepted before `epoch` last changed are closed.
    Serving { epoch: u64 },
    /// The listening socket is closed: connects are refused, and every open
    /// connection has been closed.
    Refusing,
}

/// The running proxy. Dropping it stops accepting; its tasks end with the
/// runtime.
#[derive(Debug)]
pub(crate) struct FaultProxy {
    mode: watch::Sender<Mode>,
    /// Bytes sent from kube-apiserver to clients, over the proxy's life.
    pub(crate) bytes_to_clients: Arc<AtomicU64>,
    /// The same bytes split by the client's address: in the namespace
    /// cluster each node's components connect from the node's own address,
    /// so this is what each node's proxy received.
    pub(crate) bytes_by_peer: PeerBytes,
}

/// Bytes sent to clients, per client address.
pub(crate) type PeerBytes = Arc<Mutex<BTreeMap<IpAddr, u64>>>;

/// Where one connection's bytes are added up.
#[derive(Clone)]
struct Counters {
    total: Arc<AtomicU64>,
    by_peer: PeerBytes,
}

impl FaultProxy {
    /// Binds `listen` and forwards to `upstream`. Must run on the control
    /// plane's runtime (its sockets live in that runtime's network namespace).
    pub(crate) async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
    ) -> std::io::Result<(Self, SocketAddr)> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel(Mode::Serving { epoch: 0 });
        let counters = Counters {
            total: Arc::new(AtomicU64::new(0)),
            by_peer: PeerBytes::default(),
        };
        tokio::spawn(accept_loop(listener, addr, upstream, rx, counters.clone()));
        Ok((
            FaultProxy {
                mode,
                bytes_to_clients: counters.total,
                bytes_by_peer: counters.by_peer,
            },
            addr,
        ))
    }

    /// Closes every open connection (watches included); new ones are accepted.
    pub(crate) fn close_connections(&self) {
        self.mode.send_modify(|mode| {
            if let Mode::Serving { epoch } = mode {
                *epoch += 1;
            }
        });
    }

    /// Closes every connection and refuses new ones for `duration`.
    pub(crate) fn refuse_for(&self, duration: Duration) {
        let before = *self.mode.borrow();
        self.mode.send_replace(Mode::Refusing);
        let mode = self.mode.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            let epoch = match before {
                Mode::Serving { epoch } => epoch + 1,
                Mode::Refusing => 1,
            };
            mode.send_replace(Mode::Serving { epoch });
        });
    }
}

async fn accept_loop(
    mut listener: TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    counters: Counters,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, peer)) = accepted else { continue };
                let Mode::Serving { epoch } = *mode.borrow() else { continue };
                let counters = counters.clone();
                tokio::spawn(forward(client, peer.ip(), upstream, epoch, mode.clone(), counters));
            }
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                if *mode.borrow() == Mode::Refusing {
                    drop(listener);
                    if mode.wait_for(|m| *m != Mode::Refusing).await.is_err() {
                        return;
                    }
                    listener = match rebind(addr).await {
                        Some(listener) => listener,
                        None => return,
                    };
                }
            }
        }
    }
}

async fn rebind(addr: SocketAddr) -> Option<TcpListener> {
    for _ in 0..100 {
        if let Ok(listener) = TcpListener::bind(addr).await {
            return Some(listener);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::error!(%addr, "the fault proxy could not listen again");
    None
}

async fn forward(
    mut client: TcpStream,
    peer: IpAddr,
    upstream: SocketAddr,
    epoch: u64,
    mut mode: watch::Receiver<Mode>,
    counters: Counters,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let to_server = tokio::io::copy(&mut client_read, &mut server_write);
    let to_client = copy_counted(&mut server_read, &mut client_write, &counters, peer);
    let dropped = mode.wait_for(|m| *m != Mode::Serving { epoch });
    tokio::select! {
        _ = to_server => {}
        _ = to_client => {}
        _ = dropped => {}
    }
}

async fn copy_counted<R, W>(reader: &mut R, writer: &mut W, counters: &Counters, peer: IpAddr)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if writer.write_all(&buffer[..n]).await.is_err() {
            return;
        }
        counters.total.fetch_add(n as u64, Ordering::Relaxed);
        // A plain map update; a panic elsewhere cannot leave it half done.
        let mut by_peer = counters.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        *by_peer.entry(peer).or_default() += n as u64;
    }
}
