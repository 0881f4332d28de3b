//! In-process echo servers and clients.
//!
//! Sockets are created inside the namespace (a socket belongs to the
//! namespace it was created in for its whole life) and then served or used
//! from ordinary threads, so nothing here needs a helper binary.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::error::{NetnsError, Result};
use crate::ns::Netns;

/// What an echo server listens on.
#[derive(Clone, Debug)]
pub struct EchoConfig {
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
    /// Addresses to bind. Empty means `[::]`, which (dual-stack) also
    /// answers IPv4.
    pub bind: Vec<IpAddr>,
}

impl EchoConfig {
    /// TCP and UDP on the same ports, on every address.
    pub fn tcp_and_udp(ports: &[u16]) -> Self {
        EchoConfig {
            tcp_ports: ports.to_vec(),
            udp_ports: ports.to_vec(),
            bind: Vec::new(),
        }
    }

    /// TCP only, on every address.
    pub fn tcp(ports: &[u16]) -> Self {
        EchoConfig {
            tcp_ports: ports.to_vec(),
            udp_ports: Vec::new(),
            bind: Vec::new(),
        }
    }
}

/// Running echo servers; dropping the guard stops them and closes their
/// sockets.
#[derive(Debug)]
pub struct EchoGuard {
    stop: Arc<AtomicBool>,
    sockets: Vec<Socket>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoGuard {
    /// The addresses the servers are bound to (TCP first, then UDP).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|s| s.local_addr().ok()?.as_socket())
            .collect()
    }
}

impl Drop for EchoGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Shutting a socket down wakes a thread blocked in accept/recv on it.
        for socket in &self.sockets {
            let _ = socket.shutdown(Shutdown::Both);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The line an echo server answers with: `<server name> <peer ip>:<port>`.
pub fn echo_line(server: &str, peer: SocketAddr) -> String {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    format!("{server} {peer}\n")
}

/// How a client connects.
#[derive(Clone, Debug)]
pub struct ConnectOpts {
    /// Total time allowed for connecting and reading the reply.
    pub timeout: Duration,
    /// Source address to bind before connecting (must exist in the
    /// namespace).
    pub source: Option<IpAddr>,
}

impl Default for ConnectOpts {
    fn default() -> Self {
        ConnectOpts {
            timeout: Duration::from_secs(2),
            source: None,
        }
    }
}

impl ConnectOpts {
    pub fn with_timeout(timeout: Duration) -> Self {
        ConnectOpts {
            timeout,
            ..ConnectOpts::default()
        }
    }
}

/// The outcome of one client attempt. Refused (an ICMP port unreachable or a
/// TCP reset, as iptables `REJECT` sends) is distinct from `Timeout` (nothing
/// came back, as with `DROP`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The server answered; `reply` is its line without the newline, and
    /// `connect_time` the TCP handshake time (UDP: the round trip).
    Ok {
        reply: String,
        connect_time: Duration,
    },
    Refused,
    Timeout,
    Other(String),
}

impl Attempt {
    pub fn is_ok(&self) -> bool {
        matches!(self, Attempt::Ok { .. })
    }

    /// The name of the server that answered.
    pub fn server(&self) -> Option<&str> {
        match self {
            Attempt::Ok { reply, .. } => reply.split_whitespace().next(),
            _ => None,
        }
    }

    /// The client address the server saw (after any NAT on the way).
    pub fn peer(&self) -> Option<SocketAddr> {
        match self {
            Attempt::Ok { reply, .. } => reply.split_whitespace().nth(1)?.parse().ok(),
            _ => None,
        }
    }

    fn from_io(error: &std::io::Error) -> Attempt {
        match error.kind() {
            ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset => Attempt::Refused,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Attempt::Timeout,
            _ => Attempt::Other(error.to_string()),
        }
    }
}

/// Where sockets are created: in a test namespace, or wherever the calling
/// thread is (for code that already runs inside one, e.g. under
/// `ip netns exec` or in [`Netns::run_in`]).
#[derive(Clone, Copy)]
enum Place<'a> {
    In(&'a Netns),
    Here,
}

impl Place<'_> {
    fn socket(self, domain: Domain, ty: Type) -> Result<Socket> {
        match self {
            Place::In(ns) => ns.socket(domain, ty, None),
            Place::Here => {
                Socket::new(domain, ty, None).map_err(|e| NetnsError::io("creating a socket", e))
            }
        }
    }

    fn serve_echo(self, name: &str, config: EchoConfig) -> Result<EchoGuard> {
        let binds = if config.bind.is_empty() {
            vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)]
        } else {
            config.bind.clone()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut guard = EchoGuard {
            stop: stop.clone(),
            sockets: Vec::new(),
            threads: Vec::new(),
        };
        for &ip in &binds {
            for &port in &config.tcp_ports {
                let socket = self.bound_socket(SocketAddr::new(ip, port), Type::STREAM)?;
                socket
                    .listen(1024)
                    .map_err(|e| NetnsError::io(format!("listening on {ip} port {port}"), e))?;
                let listener: TcpListener = clone_socket(&socket)?.into();
                guard.sockets.push(socket);
                let (name, stop) = (name.to_owned(), stop.clone());
                guard
                    .threads
                    .push(spawn_server(move || serve_tcp(&listener, &name, &stop))?);
            }
            for &port in &config.udp_ports {
                let socket = self.bound_socket(SocketAddr::new(ip, port), Type::DGRAM)?;
                socket
                    .set_read_timeout(Some(Duration::from_millis(200)))
                    .map_err(|e| NetnsError::io("setting a read timeout", e))?;
                let udp: UdpSocket = clone_socket(&socket)?.into();
                guard.sockets.push(socket);
                let (name, stop) = (name.to_owned(), stop.clone());
                guard
                    .threads
                    .push(spawn_server(move || serve_udp(&udp, &name, &stop))?);
            }
        }
        Ok(guard)
    }

    fn bound_socket(self, addr: SocketAddr, ty: Type) -> Result<Socket> {
        let socket = self.socket(Domain::for_address(addr), ty)?;
        let configure = || -> std::io::Result<()> {
            socket.set_reuse_address(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(!addr.ip().is_unspecified())?;
            }
            if ty == Type::STREAM {
                socket.set_tcp_nodelay(true)?;
            }
            socket.bind(&SockAddr::from(addr))
        };
        configure().map_err(|e| NetnsError::io(format!("binding {addr}"), e))?;
        Ok(socket)
    }

    fn connect_many(
        self,
        addr: SocketAddr,
        n: usize,
        ty: Type,
        opts: &ConnectOpts,
    ) -> Vec<Attempt> {
        (0..n)
            .map(|_| match self.client_socket(addr, ty, opts) {
                Ok(socket) if ty == Type::STREAM => tcp_attempt(socket, addr, opts),
                Ok(socket) => udp_attempt(socket, addr, opts),
                Err(e) => Attempt::Other(e.to_string()),
            })
            .collect()
    }

    fn client_socket(self, addr: SocketAddr, ty: Type, opts: &ConnectOpts) -> Result<Socket> {
        let socket = self.socket(Domain::for_address(addr), ty)?;
        if let Some(source) = opts.source {
            socket
                .bind(&SockAddr::from(SocketAddr::new(source, 0)))
                .map_err(|e| NetnsError::io(format!("binding source {source}"), e))?;
        }
        Ok(socket)
    }
}

fn single(mut attempts: Vec<Attempt>) -> Attempt {
    attempts
        .pop()
        .unwrap_or_else(|| Attempt::Other("no attempt made".to_owned()))
}

impl Netns {
    /// Starts echo servers in this namespace that answer every TCP connection
    /// and every UDP datagram with `<name> <peer-ip>:<peer-port>\n`.
    pub fn serve_echo(&self, name: &str, config: EchoConfig) -> Result<EchoGuard> {
        Place::In(self).serve_echo(name, config)
    }

    /// One TCP connection to `addr` from this namespace; reads the server's
    /// line.
    pub fn connect_tcp(&self, addr: SocketAddr, opts: &ConnectOpts) -> Attempt {
        single(Place::In(self).connect_many(addr, 1, Type::STREAM, opts))
    }

    /// `n` TCP connections one after another, each from a new source port
    /// (so a load balancer picks anew each time). For distribution and
    /// latency measurements.
    pub fn connect_many(&self, addr: SocketAddr, n: usize, opts: &ConnectOpts) -> Vec<Attempt> {
        Place::In(self).connect_many(addr, n, Type::STREAM, opts)
    }

    /// One UDP datagram to `addr` from this namespace; waits for the reply.
    pub fn connect_udp(&self, addr: SocketAddr, opts: &ConnectOpts) -> Attempt {
        single(Place::In(self).connect_many(addr, 1, Type::DGRAM, opts))
    }

    /// `n` UDP exchanges, each from a new socket (a new source port).
    pub fn connect_many_udp(&self, addr: SocketAddr, n: usize, opts: &ConnectOpts) -> Vec<Attempt> {
        Place::In(self).connect_many(addr, n, Type::DGRAM, opts)
    }
}

/// The echo server and clients in the calling thread's current namespace:
/// for code already inside one (under `ip netns exec`, or in
/// [`Netns::run_in`]).
pub mod here {
    use super::*;

    /// [`Netns::serve_echo`] in the current namespace.
    pub fn serve_echo(name: &str, config: EchoConfig) -> Result<EchoGuard> {
        Place::Here.serve_echo(name, config)
    }

    /// [`Netns::connect_tcp`] from the current namespace.
    pub fn connect_tcp(addr: SocketAddr, opts: &ConnectOpts) -> Attempt {
        single(Place::Here.connect_many(addr, 1, Type::STREAM, opts))
    }

    /// [`Netns::connect_udp`] from the current namespace.
    pub fn connect_udp(addr: SocketAddr, opts: &ConnectOpts) -> Attempt {
        single(Place::Here.connect_many(addr, 1, Type::DGRAM, opts))
    }
}

/// Connects within `timeout`. Unlike `Socket::connect_timeout`, a signal
/// arriving while waiting (EINTR) is not an outcome: the wait resumes.
fn connect_within(socket: &Socket, addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    socket.set_nonblocking(true)?;
    match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => return socket.set_nonblocking(false),
        Err(e) if e.raw_os_error() == Some(Errno::EINPROGRESS as i32) => {}
        Err(e) => return Err(e),
    }
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        let wait = PollTimeout::try_from(remaining).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
        match poll(&mut fds, wait) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => break,
            Err(errno) => return Err(errno.into()),
        }
    }
    if let Some(error) = socket.take_error()? {
        return Err(error);
    }
    socket.set_nonblocking(false)
}

fn tcp_attempt(socket: Socket, addr: SocketAddr, opts: &ConnectOpts) -> Attempt {
    let started = Instant::now();
    if let Err(e) = connect_within(&socket, addr, opts.timeout) {
        return Attempt::from_io(&e);
    }
    let connect_time = started.elapsed();
    let remaining = opts
        .timeout
        .saturating_sub(connect_time)
        .max(Duration::from_millis(1));
    let mut stream: TcpStream = socket.into();
    if let Err(e) = stream.set_read_timeout(Some(remaining)) {
        return Attempt::Other(e.to_string());
    }
    let mut reply = String::new();
    match stream.read_to_string(&mut reply) {
        Ok(_) if reply.is_empty() => {
            Attempt::Other("connected, but the server sent nothing".into())
        }
        Ok(_) => Attempt::Ok {
            reply: reply.trim_end().to_owned(),
            connect_time,
        },
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Attempt::Other(format!("connected, but no reply within {remaining:?}"))
        }
        Err(e) => Attempt::Other(format!("connected, then: {e}")),
    }
}

fn udp_attempt(socket: Socket, addr: SocketAddr, opts: &ConnectOpts) -> Attempt {
    let started = Instant::now();
    // A connected UDP socket reports an ICMP port unreachable as ECONNREFUSED.
    if let Err(e) = socket.connect(&SockAddr::from(addr)) {
        return Attempt::from_io(&e);
    }
    let udp: UdpSocket = socket.into();
    if let Err(e) = udp.set_read_timeout(Some(opts.timeout)) {
        return Attempt::Other(e.to_string());
    }
    if let Err(e) = udp.send(b"ping\n") {
        return Attempt::from_io(&e);
    }
    let mut buf = [0u8; 512];
    loop {
        match udp.recv(&mut buf) {
            Ok(len) => {
                return Attempt::Ok {
                    reply: String::from_utf8_lossy(&buf[..len]).trim_end().to_owned(),
                    connect_time: started.elapsed(),
                };
            }
            // A signal is not an outcome; wait for what is left of the time.
            Err(e) if e.kind() == ErrorKind::Interrupted => {
                let remaining = opts.timeout.saturating_sub(started.elapsed());
                if remaining.is_zero() {
                    return Attempt::Timeout;
                }
                if let Err(e) = udp.set_read_timeout(Some(remaining)) {
                    return Attempt::Other(e.to_string());
                }
            }
            Err(e) => return Attempt::from_io(&e),
        }
    }
}

fn serve_tcp(listener: &TcpListener, name: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                let _ = stream.write_all(echo_line(name, peer).as_bytes());
                // Closing without reading is fine: clients send nothing.
            }
            Err(_) if stop.load(Ordering::SeqCst) => break,
            // accept fails on a shut-down listener; anything else (e.g. a
            // connection reset before accept) is retried.
            Err(e) if e.kind() == ErrorKind::InvalidInput => break,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn serve_udp(socket: &UdpSocket, name: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((0, _)) if stop.load(Ordering::SeqCst) => break,
            Ok((_, peer)) => {
                let _ = socket.send_to(echo_line(name, peer).as_bytes(), peer);
            }
            Err(_) => {}
        }
    }
}

fn spawn_server(serve: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("echo-server".to_owned())
        .spawn(serve)
        .map_err(|e| NetnsError::io("starting an echo server thread", e))
}

fn clone_socket(socket: &Socket) -> Result<Socket> {
    socket
        .try_clone()
        .map_err(|e| NetnsError::io("duplicating a socket", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_line_shows_ipv4_mapped_peers_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.244.1.2]:40000".parse().unwrap();
        assert_eq!(echo_line("pod-a", mapped), "pod-a 10.244.1.2:40000\n");
        let v6: SocketAddr = "[fd00:244:1::2]:40000".parse().unwrap();
        assert_eq!(echo_line("pod-a", v6), "pod-a [fd00:244:1::2]:40000\n");
    }

    #[test]
    fn attempt_exposes_the_answering_server_and_the_peer_it_saw() {
        let attempt = Attempt::Ok {
            reply: "pod-b 172.31.0.101:51000".to_owned(),
            connect_time: Duration::from_millis(1),
        };
        assert_eq!(attempt.server(), Some("pod-b"));
        assert_eq!(attempt.peer(), Some("172.31.0.101:51000".parse().unwrap()));
        assert_eq!(Attempt::Refused.server(), None);
    }
}
