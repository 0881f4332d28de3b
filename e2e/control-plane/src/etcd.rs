//! The two etcd calls the fault scenarios need, through etcd's JSON gateway
//! (plain HTTP on its loopback client port): the current revision, and a
//! compaction that makes every older resourceVersion expire.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{ControlPlaneError, Result};

async fn post(etcd: SocketAddr, path: &str, body: &str) -> Result<serde_json::Value> {
    let mut stream = TcpStream::connect(etcd)
        .await
        .map_err(|e| ControlPlaneError::io("connecting to etcd", e))?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {etcd}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| ControlPlaneError::io("writing to etcd", e))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|e| ControlPlaneError::io("reading from etcd", e))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| ControlPlaneError::Etcd(format!("no HTTP response: {response}")))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(ControlPlaneError::Etcd(format!("{path}: {head}\n{body}")));
    }
    serde_json::from_str(body.trim())
        .map_err(|e| ControlPlaneError::Etcd(format!("{path}: {e}: {body}")))
}

/// etcd's current revision.
pub(crate) async fn revision(etcd: SocketAddr) -> Result<u64> {
    // A range over one key answers with the store's header.
    let reply = post(etcd, "/v3/kv/range", r#"{"key":"AA=="}"#).await?;
    reply
        .pointer("/header/revision")
        .and_then(|r| {
            r.as_str()
                .and_then(|s| s.parse().ok())
                .or_else(|| r.as_u64())
        })
        .ok_or_else(|| ControlPlaneError::Etcd(format!("no revision in {reply}")))
}

/// Compacts etcd's history up to its current revision and returns it.
pub(crate) async fn compact(etcd: SocketAddr) -> Result<u64> {
    let revision = revision(etcd).await?;
    post(
        etcd,
        "/v3/kv/compaction",
        &format!(r#"{{"revision":"{revision}","physical":true}}"#),
    )
    .await?;
    Ok(revision)
}
