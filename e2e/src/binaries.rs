//! Finding the planproxy binaries the scenarios run as real processes.

use std::path::PathBuf;

use crate::error::{E2eError, Result};

/// The controller binary.
pub const CONTROLLER: &str = "planproxy-controller";
/// The node agent binary.
pub const AGENT: &str = "planproxy-agent";

/// Where `name` is: `$PLANPROXY_<NAME>_BIN` if set (e.g.
/// `PLANPROXY_AGENT_BIN`), otherwise next to the running test binary in
/// cargo's target directory (`target/<profile>/`). Cargo only builds other
/// packages' binaries when asked, so `scripts/test.sh` runs
/// `cargo build --bins` before the tests.
pub fn locate(name: &str) -> Result<PathBuf> {
    let variable = format!(
        "{}_BIN",
        name.replace("planproxy-", "PLANPROXY_")
            .replace('-', "_")
            .to_uppercase()
    );
    if let Some(path) = std::env::var_os(&variable) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| E2eError::io("locating the test binary", e))?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join(name))
        .collect();
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| E2eError::MissingBinary {
            name: name.to_owned(),
            looked_at: format!(
                "${variable}, {}",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}
