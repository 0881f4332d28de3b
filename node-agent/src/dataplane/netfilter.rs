//! The one seam under which the data plane talks to the kernel: every
//! netfilter program (`iptables*`, `ip6tables*`, `nft`, `conntrack`) runs
//! through [`Netfilter::run`], and the one sysctl node ports need
//! (`route_localnet`) is read and written through [`Netfilter::sysctl`]. The
//! agent uses [`System`]; unit tests put a fake in its place and check what
//! would have been run.

use std::io::Write as _;
use std::process::{Command, Stdio};

use super::Error;

/// What a program printed and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ran {
    /// It exited with status 0.
    pub success: bool,
    /// Its exit code, when it exited.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error, trimmed.
    pub stderr: String,
}

/// Runs netfilter programs, and sends nf_tables netlink batches.
pub trait Netfilter: Send + Sync + std::fmt::Debug {
    /// Runs `program` with `args`, feeding `stdin` when given. An error means
    /// the program could not be run at all.
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> std::io::Result<Ran>;

    /// Sends one nf_tables batch (one transaction) and waits for the kernel's
    /// answer to the message numbered `acked_seq`. `Ok(Err(errno))` when the
    /// kernel refused the batch.
    fn netlink(&self, batch: &[u8], acked_seq: u32) -> std::io::Result<Result<(), i32>>;

    /// Reads the sysctl at `path` under `/proc/sys` (`net/ipv4/conf/all/route_localnet`)
    /// of the calling thread's network namespace, trimmed.
    fn sysctl(&self, path: &str) -> std::io::Result<String>;

    /// Writes `value` to the sysctl at `path` under `/proc/sys`.
    fn set_sysctl(&self, path: &str, value: &str) -> std::io::Result<()>;
}

/// The real programs, in the calling thread's network namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

impl Netfilter for System {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> std::io::Result<Ran> {
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn()?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A program that refuses early closes its end; its stderr says why.
            let _ = pipe.write_all(input.as_bytes());
        }
        let out = child.wait_with_output()?;
        Ok(Ran {
            success: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    fn netlink(&self, batch: &[u8], acked_seq: u32) -> std::io::Result<Result<(), i32>> {
        use std::os::fd::AsRawFd as _;

        use nix::sys::socket::{
            AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, sendto,
            setsockopt, sockopt,
        };
        use nix::sys::time::TimeVal;

        let fd = nix::sys::socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        // One batch is one message to the kernel: the buffer must hold it.
        setsockopt(&fd, sockopt::SndBufForce, &(batch.len() + (1 << 16)))?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(30, 0))?;
        sendto(
            fd.as_raw_fd(),
            batch,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        await_ack(&fd, acked_seq)
    }

    fn sysctl(&self, path: &str) -> std::io::Result<String> {
        // /proc/sys/net follows the network namespace of the thread opening it.
        Ok(std::fs::read_to_string(format!("/proc/sys/{path}"))?
            .trim()
            .to_owned())
    }

    fn set_sysctl(&self, path: &str, value: &str) -> std::io::Result<()> {
        std::fs::write(format!("/proc/sys/{path}"), value)
    }
}

const NLMSG_ERROR: u16 = 2;

/// Reads the kernel's answers until the one to `acked_seq`; the first error
/// wins (the kernel drops the whole batch then).
fn await_ack(fd: &std::os::fd::OwnedFd, acked_seq: u32) -> std::io::Result<Result<(), i32>> {
    use std::os::fd::AsRawFd as _;

    use nix::sys::socket::{MsgFlags, recv};

    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Err(std::io::Error::other("netlink socket closed"));
        }
        let mut offset = 0;
        while offset + 20 <= n {
            let word = |at: usize| {
                let mut b = [0u8; 4];
                b.copy_from_slice(&buf[at..at + 4]);
                b
            };
            let len = u32::from_ne_bytes(word(offset)) as usize;
            let kind = u16::from_ne_bytes([buf[offset + 4], buf[offset + 5]]);
            let seq = u32::from_ne_bytes(word(offset + 8));
            if kind == NLMSG_ERROR {
                let errno = i32::from_ne_bytes(word(offset + 16));
                if errno != 0 {
                    return Ok(Err(-errno));
                }
                if seq == acked_seq {
                    return Ok(Ok(()));
                }
            }
            if len < 16 {
                break;
            }
            offset += (len + 3) & !3;
        }
    }
}

/// Runs `program args…` and returns what it ran into, or why it could not start.
pub(crate) fn run(
    nf: &dyn Netfilter,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Ran, Error> {
    nf.run(program, args, stdin).map_err(|source| Error::Spawn {
        program: program.to_owned(),
        source,
    })
}

/// Runs `program args…` and returns its output; a failure is an error naming
/// the command.
pub(crate) fn output(nf: &dyn Netfilter, program: &str, args: &[&str]) -> Result<String, Error> {
    let ran = run(nf, program, args, None)?;
    if !ran.success {
        return Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: ran.stderr,
        });
    }
    Ok(ran.stdout)
}

/// The rule arguments of an iptables rule spec as iptables-save prints it:
/// words, with double-quoted comments kept whole.
pub(crate) fn split_spec(spec: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in spec.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(word);
    }
    words
}

/// One iptables program (`iptables-nft`, `ip6tables-legacy`, …) and the
/// single-rule commands the data plane needs besides restores.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Iptables<'a> {
    pub nf: &'a dyn Netfilter,
    pub program: &'static str,
}

impl Iptables<'_> {
    fn call(&self, table: &str, args: &[&str]) -> Result<Ran, Error> {
        let mut all = vec!["--wait=5", "-t", table];
        all.extend_from_slice(args);
        run(self.nf, self.program, &all, None)
    }

    fn must(&self, table: &str, args: &[&str]) -> Result<(), Error> {
        let ran = self.call(table, args)?;
        if ran.success {
            return Ok(());
        }
        Err(Error::Command {
            command: format!("{} -t {table} {}", self.program, args.join(" ")),
            stderr: ran.stderr,
        })
    }

    /// Creates `chain`; an existing one is fine.
    pub fn ensure_chain(&self, table: &str, chain: &str) -> Result<(), Error> {
        let ran = self.call(table, &["-N", chain])?;
        if ran.success || ran.stderr.contains("exists") {
            return Ok(());
        }
        Err(Error::Command {
            command: format!("{} -t {table} -N {chain}", self.program),
            stderr: ran.stderr,
        })
    }

    /// Whether `chain` holds the rule `spec`.
    pub fn exists(&self, table: &str, chain: &str, spec: &str) -> Result<bool, Error> {
        let words = split_spec(spec);
        let mut args = vec!["-C", chain];
        args.extend(words.iter().map(String::as_str));
        let ran = self.call(table, &args)?;
        // Exit status 1 is "no such rule"; anything else is a real failure.
        match ran.code {
            _ if ran.success => Ok(true),
            Some(1) => Ok(false),
            _ => Err(Error::Command {
                command: format!("{} -t {table} -C {chain} {spec}", self.program),
                stderr: ran.stderr,
            }),
        }
    }

    /// Appends `spec` to `chain`.
    pub fn append(&self, table: &str, chain: &str, spec: &str) -> Result<(), Error> {
        self.edit(table, &["-A", chain], spec)
    }

    /// Inserts `spec` at the top of `chain`.
    pub fn insert_first(&self, table: &str, chain: &str, spec: &str) -> Result<(), Error> {
        self.edit(table, &["-I", chain, "1"], spec)
    }

    /// Deletes the rule `spec` from `chain`.
    pub fn delete(&self, table: &str, chain: &str, spec: &str) -> Result<(), Error> {
        self.edit(table, &["-D", chain], spec)
    }

    /// `iptables -S chain`: the chain's rules as `-A` lines; `None` when the
    /// chain does not exist.
    pub fn list(&self, table: &str, chain: &str) -> Result<Option<String>, Error> {
        let ran = self.call(table, &["-S", chain])?;
        Ok(ran.success.then_some(ran.stdout))
    }

    fn edit(&self, table: &str, command: &[&str], spec: &str) -> Result<(), Error> {
        let words = split_spec(spec);
        let mut args = command.to_vec();
        args.extend(words.iter().map(String::as_str));
        self.must(table, &args)
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A kernel that is only a script: each program answers from a table of
    //! replies, and every call is recorded.

    use std::sync::Mutex;

    use super::{Netfilter, Ran};

    /// One recorded call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Call {
        pub program: String,
        pub args: Vec<String>,
        pub stdin: Option<String>,
    }

    impl Call {
        /// `program arg arg…`.
        pub fn line(&self) -> String {
            std::iter::once(self.program.as_str())
                .chain(self.args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" ")
        }
    }

    type Reply = Box<dyn Fn(&Call) -> Option<Ran> + Send + Sync>;

    /// Answers calls with the first matching reply, else with success and no
    /// output.
    #[derive(Default)]
    pub struct FakeNetfilter {
        replies: Mutex<Vec<Reply>>,
        calls: Mutex<Vec<Call>>,
        netlink_errno: Mutex<Option<i32>>,
        /// Sysctl values by path; a missing one reads as `0`.
        sysctls: Mutex<std::collections::BTreeMap<String, String>>,
        /// Writes fail with this errno.
        sysctl_errno: Mutex<Option<i32>>,
    }

    impl std::fmt::Debug for FakeNetfilter {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("FakeNetfilter").finish_non_exhaustive()
        }
    }

    impl FakeNetfilter {
        /// Adds a reply, tried before the ones added earlier.
        pub fn reply(&self, reply: impl Fn(&Call) -> Option<Ran> + Send + Sync + 'static) {
            self.replies
                .lock()
                .expect("fake netfilter lock")
                .insert(0, Box::new(reply));
        }

        /// From now on the kernel refuses netlink batches with `errno`.
        pub fn refuse_netlink(&self, errno: i32) {
            *self.netlink_errno.lock().expect("fake netfilter lock") = Some(errno);
        }

        /// From now on sysctl writes fail with `errno`.
        pub fn refuse_sysctl_writes(&self, errno: i32) {
            *self.sysctl_errno.lock().expect("fake netfilter lock") = Some(errno);
        }

        /// The sysctl's value now (`0` when never written).
        pub fn sysctl_value(&self, path: &str) -> String {
            self.sysctls
                .lock()
                .expect("fake netfilter lock")
                .get(path)
                .cloned()
                .unwrap_or_else(|| "0".to_owned())
        }

        /// Every call so far.
        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().expect("fake netfilter lock").clone()
        }

        /// Forgets the calls so far.
        pub fn clear(&self) {
            self.calls.lock().expect("fake netfilter lock").clear();
        }
    }

    impl Netfilter for FakeNetfilter {
        fn netlink(&self, batch: &[u8], _acked_seq: u32) -> std::io::Result<Result<(), i32>> {
            self.calls.lock().expect("fake netfilter lock").push(Call {
                program: "netlink".to_owned(),
                args: vec![batch.len().to_string()],
                stdin: None,
            });
            let refused = *self.netlink_errno.lock().expect("fake netfilter lock");
            Ok(refused.map_or(Ok(()), Err))
        }

        fn sysctl(&self, path: &str) -> std::io::Result<String> {
            Ok(self.sysctl_value(path))
        }

        fn set_sysctl(&self, path: &str, value: &str) -> std::io::Result<()> {
            self.calls.lock().expect("fake netfilter lock").push(Call {
                program: "sysctl".to_owned(),
                args: vec![format!("{path}={value}")],
                stdin: None,
            });
            if let Some(errno) = *self.sysctl_errno.lock().expect("fake netfilter lock") {
                return Err(std::io::Error::from_raw_os_error(errno));
            }
            self.sysctls
                .lock()
                .expect("fake netfilter lock")
                .insert(path.to_owned(), value.to_owned());
            Ok(())
        }

        fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> std::io::Result<Ran> {
            let call = Call {
                program: program.to_owned(),
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                stdin: stdin.map(str::to_owned),
            };
            self.calls
                .lock()
                .expect("fake netfilter lock")
                .push(call.clone());
            let replies = self.replies.lock().expect("fake netfilter lock");
            Ok(replies
                .iter()
                .find_map(|reply| reply(&call))
                .unwrap_or(Ran {
                    success: true,
                    code: Some(0),
                    ..Default::default()
                }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_specs_split_into_words_with_quoted_comments_whole() {
        assert_eq!(
            split_spec(r#"-m comment --comment "planproxy service portals" -j PPX-SERVICES"#),
            [
                "-m",
                "comment",
                "--comment",
                "planproxy service portals",
                "-j",
                "PPX-SERVICES"
            ]
        );
        assert_eq!(split_spec("  -j  RETURN "), ["-j", "RETURN"]);
        assert_eq!(split_spec(r#"--comment """#), ["--comment", ""]);
    }
}
