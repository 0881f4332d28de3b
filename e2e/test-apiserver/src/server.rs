//! Listeners and connections: the HTTPS API listener (which fault injection
//! can close, hang or reset) and the plain-HTTP admin listener.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::faults::OutageMode;
use crate::http::HttpState;

/// Binds with SO_REUSEADDR so the API port can be re-bound after a "refuse" outage.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts API connections until shutdown.
pub async fn run_api(
    mut listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<HttpState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut outages = state.api.faults.outage_changes();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(stream, acceptor.clone(), state.clone(), shutdown.clone()));
                }
                Err(e) => tracing::warn!(error = %e, "accepting a connection failed"),
            },
            changed = outages.changed() => {
                if changed.is_err() {
                    return;
                }
                let outage = *outages.borrow_and_update();
                if let Some((until, OutageMode::Refuse)) = outage {
                    let Ok(addr) = listener.local_addr() else { return };
                    drop(listener);
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => {}
                        // Cleared early (or replaced by another outage).
                        _ = outages.changed() => {}
                        _ = shutdown.changed() => return,
                    }
                    listener = loop {
                        match bind(addr) {
                            Ok(l) => break l,
                            Err(e) => {
                                tracing::warn!(error = %e, %addr, "re-binding the API port failed; retrying");
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            }
                        }
                    };
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    state: Arc<HttpState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut drops = state.api.faults.connection_drops();
    drops.borrow_and_update();
    let _ = stream.set_nodelay(true);
    let tls = tokio::select! {
        tls = acceptor.accept(stream) => match tls {
            Ok(tls) => tls,
            Err(e) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                return;
            }
        },
        _ = drops.changed() => return,
        _ = shutdown.changed() => return,
    };
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let service = service_fn(move |request| crate::http::serve(state.clone(), request));
    let connection = builder.serve_connection(TokioIo::new(tls), service);
    tokio::select! {
        result = connection => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        // Dropping the connection future closes the socket: a "restart".
        _ = drops.changed() => {}
        _ = shutdown.changed() => {}
    }
}

/// Accepts admin (plain HTTP) connections until shutdown.
pub async fn run_admin(
    listener: TcpListener,
    shared: Arc<crate::Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                let mut shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| crate::admin::serve(shared.clone(), request));
                    let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = connection => {}
                        _ = shutdown.changed() => {}
                    }
                });
            }
            _ = shutdown.changed() => return,
        }
    }
}
