use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{NetnsError, Result};

/// A process started inside a namespace by [`crate::Netns::spawn`].
///
/// Its stdout and stderr go, interleaved, to a log file that
/// [`ChildGuard::log`] reads back, so a failing test can print what the
/// process said. Dropping the guard kills the process and reaps it.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    description: String,
    log_path: PathBuf,
    // Keeps the log file's directory alive for as long as the guard lives.
    _log_dir: LogDir,
}

#[derive(Debug)]
pub(crate) struct LogDir(PathBuf);

impl LogDir {
    pub(crate) fn create(label: &str) -> Result<LogDir> {
        let dir = std::env::temp_dir().join(format!("{label}-logs"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| NetnsError::io(format!("creating {}", dir.display()), e))?;
        Ok(LogDir(dir))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl ChildGuard {
    pub(crate) fn new(
        child: Child,
        description: String,
        log_path: PathBuf,
        log_dir: LogDir,
    ) -> Self {
        ChildGuard {
            child,
            description,
            log_path,
            _log_dir: log_dir,
        }
    }

    pub(crate) fn open_log(dir: &LogDir) -> Result<(PathBuf, File, File)> {
        let path = dir.path().join("output.log");
        let out = File::create(&path)
            .map_err(|e| NetnsError::io(format!("creating {}", path.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| NetnsError::io(format!("duplicating {}", path.display()), e))?;
        Ok((path, out, err))
    }

    /// The process id (of the program itself: `ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What was started, for messages.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Where stdout and stderr are written.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has written so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|e| format!("<log {} unreadable: {e}>", self.log_path.display()))
    }

    /// The exit status if the process has already exited.
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .map_err(|e| NetnsError::io(format!("checking {}", self.description), e))
    }

    /// Waits up to `timeout` for the process to exit on its own; `None` if it
    /// is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks the process to stop with SIGTERM and waits up to `grace` for it,
    /// then kills it. Returns how it ended.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_exit_status()? {
            return Ok(status);
        }
        self.signal(Signal::SIGTERM);
        match self.wait_timeout(grace)? {
            Some(status) => Ok(status),
            None => self.kill_and_wait(),
        }
    }

    /// Sends `signal` to the process (ignored if it has already exited).
    pub fn signal(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    fn kill_and_wait(&mut self) -> Result<ExitStatus> {
        let _ = self.child.kill();
        self.child
            .wait()
            .map_err(|e| NetnsError::io(format!("waiting for {}", self.description), e))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.kill_and_wait();
    }
}
