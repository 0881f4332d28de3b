//! The control plane's processes: each one a child with its own log file,
//! killed when dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{ControlPlaneError, Result};

/// One running component (etcd, kube-apiserver, kube-controller-manager).
#[derive(Debug)]
pub struct Component {
    pub name: &'static str,
    pub log: PathBuf,
    child: Child,
}

impl Component {
    /// Starts `binary args…`, appending stdout and stderr to `log`.
    pub fn spawn(name: &'static str, binary: &Path, args: &[String], log: PathBuf) -> Result<Self> {
        let open = || {
            File::options()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(|e| ControlPlaneError::io(format!("opening {}", log.display()), e))
        };
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(open()?)
            .stderr(open()?)
            .spawn()
            .map_err(|e| ControlPlaneError::io(format!("starting {}", binary.display()), e))?;
        Ok(Component { name, log, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Err if the process has exited, with its status and log tail.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(ControlPlaneError::Exited {
                component: self.name,
                status: status.to_string(),
                log: self.log.clone(),
                tail: self.log_tail(40),
            }),
            Err(e) => Err(ControlPlaneError::io(
                format!("waiting for {}", self.name),
                e,
            )),
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`).
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        let signal = if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        let pid = i32::try_from(self.pid())
            .map_err(|_| ControlPlaneError::Invalid("pid out of range".into()))?;
        kill(Pid::from_raw(pid), signal)
            .map_err(|e| ControlPlaneError::io(format!("signalling {}", self.name), e.into()))
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(
            &std::fs::read_to_string(&self.log).unwrap_or_default(),
            lines,
        )
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        // A stopped process would not die on SIGKILL's delivery order alone.
        let _ = self.freeze(false);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    out.push('\n');
    out
}
