use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::child::{ChildGuard, LogDir};
use crate::error::{NetnsError, Result};

/// Every namespace this library creates starts with this prefix, followed by
/// the creating process's id, so stale ones can be told apart from live ones.
pub const NAME_PREFIX: &str = "pp";

/// Linux limits interface names to 15 bytes (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

static NEXT_NAMESPACE: AtomicU32 = AtomicU32::new(1);
static NEXT_CHILD: AtomicU32 = AtomicU32::new(1);
// `ip netns add` sets up the shared /run/netns mount on first use; creating
// namespaces from many test threads at once is serialized so that setup
// never races within one process.
static NETNS_ADMIN: Mutex<()> = Mutex::new(());
static STALE_SWEPT: std::sync::Once = std::sync::Once::new();

/// A network namespace that exists for as long as this guard does.
///
/// Created with `ip netns add` under a unique name (`pp<pid>-<n>-<role>`),
/// with `lo` up. Dropping it (also while unwinding from a panic) kills every
/// process left inside and deletes the namespace, which also removes every
/// interface in it and the peers of its veth pairs.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace; `role` only makes the name readable (`node1`,
    /// `pod-a`, `client`…) and is shortened to 20 characters.
    pub fn new(role: &str) -> Result<Netns> {
        STALE_SWEPT.call_once(|| {
            let _ = remove_stale_namespaces();
        });
        let role: String = role
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(20)
            .collect();
        let n = NEXT_NAMESPACE.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NAME_PREFIX}{}-{n}-{role}", std::process::id());
        {
            let _admin = NETNS_ADMIN.lock().unwrap_or_else(|e| e.into_inner());
            run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        }
        // From here on the guard owns the namespace: an error below still
        // deletes it.
        let ns = Netns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"])?;
        // No duplicate address detection on interfaces created later (their
        // link-local addresses included): a test network has no duplicates,
        // and DAD would delay IPv6 neighbour discovery by seconds.
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file (`/run/netns/<name>`).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs a command inside the namespace and returns its output, whatever
    /// its exit status.
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        let mut command = self.command(args);
        let description = describe(&command);
        command
            .stdin(Stdio::null())
            .output()
            .map_err(|source| NetnsError::Spawn {
                command: description,
                source,
            })
    }

    /// Runs a command inside the namespace; fails (with its stderr) unless it
    /// exits successfully. Returns its stdout.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        run_checked(&mut self.command(args))
    }

    /// Like [`Netns::exec_ok`], feeding `stdin` to the command (for
    /// `iptables-restore` and friends).
    pub fn exec_with_stdin<S: AsRef<OsStr>>(&self, args: &[S], stdin: &str) -> Result<String> {
        let mut command = self.command(args);
        let description = describe(&command);
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| NetnsError::Spawn {
                command: description.clone(),
                source,
            })?;
        if let Some(mut pipe) = child.stdin.take() {
            pipe.write_all(stdin.as_bytes())
                .map_err(|e| NetnsError::io(format!("writing stdin of `{description}`"), e))?;
        }
        let output = child
            .wait_with_output()
            .map_err(|e| NetnsError::io(format!("waiting for `{description}`"), e))?;
        check_output(description, output)
    }

    /// A `Command` that runs `args` inside the namespace via `ip netns exec`.
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(args);
        command
    }

    /// Starts a long-running process inside the namespace. Its stdout and
    /// stderr are collected in a log file ([`ChildGuard::log`]); `envs` are
    /// added to the inherited environment. Dropping the guard kills it.
    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S], envs: &[(&str, &str)]) -> Result<ChildGuard> {
        let mut command = self.command(args);
        command.envs(envs.iter().copied());
        let description = describe(&command);
        let n = NEXT_CHILD.fetch_add(1, Ordering::Relaxed);
        let log_dir = LogDir::create(&format!("{}-child{n}", self.name))?;
        let (log_path, stdout, stderr) = ChildGuard::open_log(&log_dir)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| NetnsError::Spawn {
                command: description.clone(),
                source,
            })?;
        Ok(ChildGuard::new(child, description, log_path, log_dir))
    }

    /// Sets a sysctl inside the namespace, e.g.
    /// `ns.sysctl("net.ipv4.ip_forward", "1")`. Only per-namespace keys
    /// (`net.*`) are accepted, so a test can never change the host.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        if !key.starts_with("net.")
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
        {
            return Err(NetnsError::InvalidName {
                name: key.to_owned(),
                reason: "only net.* sysctls are namespaced",
            });
        }
        self.exec_ok(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on a fresh OS thread that has entered this namespace and
    /// returns its result. Sockets opened by `f` (and by any thread it starts,
    /// e.g. a tokio runtime's workers) live in this namespace.
    ///
    /// Panics if the namespace cannot be entered, or re-raises `f`'s panic;
    /// use [`Netns::try_run_in`] to get an error instead.
    pub fn run_in<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        match self.enter_and_run(f) {
            Ok(Ok(value)) => value,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(e) => panic!("entering a test namespace must succeed: {e}"),
        }
    }

    /// [`Netns::run_in`] that reports failure to enter the namespace, or a
    /// panic inside `f`, as an error.
    pub fn try_run_in<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        match self.enter_and_run(f)? {
            Ok(value) => Ok(value),
            Err(_) => Err(NetnsError::ThreadPanicked {
                namespace: self.name.clone(),
            }),
        }
    }

    fn enter_and_run<F, R>(&self, f: F) -> Result<std::thread::Result<R>>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = self.open()?;
        let name = &self.name;
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{name}"))
                .spawn_scoped(scope, move || {
                    enter(&file, name)?;
                    Ok(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)))
                })
                .map_err(|e| NetnsError::io("starting a namespace thread", e))?;
            handle.join().unwrap_or_else(|panic| Ok(Err(panic)))
        })
    }

    /// Starts a long-lived thread inside this namespace (for servers such as
    /// echo servers). The thread keeps the namespace's network alive
    /// until it ends, even after the guard deletes the name.
    pub fn spawn_thread<F, R>(&self, thread_name: &str, f: F) -> Result<JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = self.open()?;
        let name = self.name.clone();
        // Enter before running `f`, and report a failure to enter to the
        // caller rather than from inside the thread.
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(thread_name.to_owned())
            .spawn(move || {
                let entered = enter(&file, &name);
                let ok = entered.is_ok();
                let _ = entered_tx.send(entered);
                if !ok {
                    // The caller gets the error; there is nothing to run.
                    std::panic::resume_unwind(Box::new("namespace not entered"));
                }
                f()
            })
            .map_err(|e| NetnsError::io("starting a namespace thread", e))?;
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NetnsError::ThreadPanicked {
                namespace: self.name.clone(),
            }),
        }
    }

    /// Creates a socket inside this namespace. The socket stays in this
    /// namespace whichever thread uses it later.
    pub fn socket(
        &self,
        domain: socket2::Domain,
        ty: socket2::Type,
        protocol: Option<socket2::Protocol>,
    ) -> Result<socket2::Socket> {
        self.try_run_in(move || socket2::Socket::new(domain, ty, protocol))?
            .map_err(|e| NetnsError::io(format!("creating a socket in {}", self.name), e))
    }

    fn open(&self) -> Result<File> {
        let path = self.path();
        File::open(&path).map_err(|source| NetnsError::Enter {
            namespace: self.name.clone(),
            source,
        })
    }

    // ---- links, addresses, routes -------------------------------------------------

    /// Creates a bridge named `bridge` and brings it up.
    pub fn add_bridge(&self, bridge: &str) -> Result<()> {
        check_ifname(bridge)?;
        self.exec_ok(&[
            "ip",
            "link",
            "add",
            bridge,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        self.link_up(bridge)
    }

    /// Brings an interface up.
    pub fn link_up(&self, ifname: &str) -> Result<()> {
        self.exec_ok(&["ip", "link", "set", ifname, "up"]).map(drop)
    }

    /// Attaches an interface to a bridge in this namespace.
    pub fn set_master(&self, ifname: &str, bridge: &str) -> Result<()> {
        self.exec_ok(&["ip", "link", "set", ifname, "master", bridge])
            .map(drop)
    }

    /// Adds an address with its prefix length, e.g. `10.244.1.1/24` or
    /// `fd00:244:1::1/64`. IPv6 addresses skip duplicate address detection,
    /// so they are usable immediately.
    pub fn add_addr(&self, ifname: &str, addr: IpAddr, prefix_len: u8) -> Result<()> {
        let cidr = format!("{addr}/{prefix_len}");
        match addr {
            IpAddr::V4(_) => self.exec_ok(&["ip", "addr", "add", &cidr, "dev", ifname]),
            IpAddr::V6(_) => {
                self.exec_ok(&["ip", "-6", "addr", "add", &cidr, "dev", ifname, "nodad"])
            }
        }
        .map(drop)
    }

    /// Adds a route to `destination` (a CIDR, or `default`) via `gateway`.
    pub fn add_route(&self, destination: &str, gateway: IpAddr) -> Result<()> {
        let family = if gateway.is_ipv4() { "-4" } else { "-6" };
        self.exec_ok(&[
            "ip",
            family,
            "route",
            "add",
            destination,
            "via",
            &gateway.to_string(),
        ])
        .map(drop)
    }

    /// Adds a route to `destination` (a CIDR) straight out of `ifname`.
    pub fn add_device_route(&self, destination: &str, ifname: &str) -> Result<()> {
        self.exec_ok(&["ip", "route", "add", destination, "dev", ifname])
            .map(drop)
    }

    /// GETs `path` from `addr` over HTTP/1.1 from inside the namespace, for
    /// health and metrics endpoints: (status code, body), or None when
    /// nothing answered within a second or two.
    pub fn http_get(&self, addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
        use std::io::Read;
        let path = path.to_owned();
        self.run_in(move || {
            let mut stream =
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1))
                    .ok()?;
            stream
                .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .ok()?;
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: planproxy-test\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).ok()?;
            let code = response.split_whitespace().nth(1)?.parse().ok()?;
            let body = response
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .unwrap_or_default();
            Some((code, body))
        })
    }

    /// Both `iptables-save` and `ip6tables-save` of this namespace, for
    /// failure reports.
    pub fn iptables_save(&self) -> String {
        let mut out = String::new();
        for tool in ["iptables-save", "ip6tables-save"] {
            match self.exec_ok(&[tool]) {
                Ok(text) => out.push_str(&text),
                Err(e) => out.push_str(&format!("# {tool} failed: {e}\n")),
            }
        }
        out
    }

    /// Pids of processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        let output = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .stdin(Stdio::null())
            .output();
        match output {
            Ok(output) => String::from_utf8_lossy(&output.stdout)
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_namespace(&self.name);
    }
}

/// Creates a veth pair: `a_if` inside `a`, `b_if` inside `b`, both up. The
/// pair is created inside `a` and its peer moved straight into `b`, so it
/// never exists in the root namespace.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    check_ifname(a_if)?;
    check_ifname(b_if)?;
    a.exec_ok(&[
        "ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])?;
    a.link_up(a_if)?;
    b.link_up(b_if)
}

/// Deletes namespaces this library created in processes that no longer exist
/// (a test run killed with SIGKILL cannot run its guards). Namespaces of live
/// processes, and every namespace not named `pp<pid>-…`, are left alone.
/// Returns the names it deleted.
pub fn remove_stale_namespaces() -> Result<Vec<String>> {
    let listing = run_checked(Command::new("ip").args(["netns", "list"]))?;
    let mut removed = Vec::new();
    for line in listing.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(owner) = owner_pid(name) else {
            continue;
        };
        if owner != std::process::id() && !PathBuf::from(format!("/proc/{owner}")).exists() {
            delete_namespace(name);
            removed.push(name.to_owned());
        }
    }
    Ok(removed)
}

/// The pid encoded in a name this library generated (`pp<pid>-<n>-<role>`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, rest) = rest.split_once('-')?;
    let (counter, _role) = rest.split_once('-')?;
    counter.parse::<u32>().ok()?;
    pid.parse().ok()
}

fn delete_namespace(name: &str) {
    let own_pid = std::process::id();
    // Kill what is left inside, twice: a process may fork while dying.
    for _ in 0..2 {
        let output = Command::new("ip")
            .args(["netns", "pids", name])
            .stdin(Stdio::null())
            .output();
        let Ok(output) = output else { break };
        let pids: Vec<i32> = String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .filter(|pid| u32::try_from(*pid).ok() != Some(own_pid))
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _admin = NETNS_ADMIN.lock().unwrap_or_else(|e| e.into_inner());
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn enter(file: &File, name: &str) -> Result<()> {
    setns(file, CloneFlags::CLONE_NEWNET).map_err(|errno| NetnsError::Enter {
        namespace: name.to_owned(),
        source: errno.into(),
    })
}

pub(crate) fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_IFNAME_LEN {
        return Err(NetnsError::InvalidName {
            name: name.to_owned(),
            reason: "interface names are 1 to 15 bytes",
        });
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(NetnsError::InvalidName {
            name: name.to_owned(),
            reason: "interface names use letters, digits, '-', '_' and '.'",
        });
    }
    Ok(())
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn run_checked(command: &mut Command) -> Result<String> {
    let description = describe(command);
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: description.clone(),
            source,
        })?;
    check_output(description, output)
}

fn check_output(description: String, output: Output) -> Result<String> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(NetnsError::CommandFailed {
            command: description,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_encode_their_owner_pid() {
        assert_eq!(owner_pid("pp4242-7-node1"), Some(4242));
        assert_eq!(owner_pid("pp4242-7-"), Some(4242));
    }

    #[test]
    fn foreign_namespace_names_have_no_owner() {
        assert_eq!(owner_pid("cni-1234"), None);
        assert_eq!(owner_pid("pp-7-node1"), None);
        assert_eq!(owner_pid("pp4242-node1"), None);
        assert_eq!(owner_pid("ppx-1-a"), None);
    }

    #[test]
    fn interface_names_longer_than_the_kernel_limit_are_rejected() {
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("fifteen-chars-x").is_ok());
        assert!(check_ifname("sixteen-chars-xx").is_err());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a b").is_err());
    }
}
