//! Which iptables implementation the host uses, and its programs.

use std::process::Command;

use planproxy_render::Family;

use super::{Backend, Error};

/// The programs of one backend for one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Programs {
    pub iptables: &'static str,
    pub restore: &'static str,
    pub save: &'static str,
}

impl Backend {
    /// `nf_tables` / `legacy`, as `iptables --version` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::NfTables => "nf_tables",
            Backend::Legacy => "legacy",
        }
    }

    pub(crate) fn programs(self, family: Family) -> Programs {
        match (self, family) {
            (Backend::NfTables, Family::V4) => Programs {
                iptables: "iptables-nft",
                restore: "iptables-nft-restore",
                save: "iptables-nft-save",
            },
            (Backend::NfTables, Family::V6) => Programs {
                iptables: "ip6tables-nft",
                restore: "ip6tables-nft-restore",
                save: "ip6tables-nft-save",
            },
            (Backend::Legacy, Family::V4) => Programs {
                iptables: "iptables-legacy",
                restore: "iptables-legacy-restore",
                save: "iptables-legacy-save",
            },
            (Backend::Legacy, Family::V6) => Programs {
                iptables: "ip6tables-legacy",
                restore: "ip6tables-legacy-restore",
                save: "ip6tables-legacy-save",
            },
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nft" | "nf_tables" | "nftables" => Ok(Backend::NfTables),
            "legacy" => Ok(Backend::Legacy),
            other => Err(format!(
                "unknown iptables backend {other:?} (expected nft or legacy)"
            )),
        }
    }
}

/// The backend the host's `iptables` uses. When the host's default is nf_tables
/// but only the legacy tables hold rules (a host whose other agents still write
/// legacy rules), legacy wins, as kube-proxy's iptables wrapper decides.
pub(crate) fn detect() -> Result<Backend, Error> {
    let version = output("iptables", &["--version"])?;
    let default = if version.contains("nf_tables") {
        Backend::NfTables
    } else if version.contains("legacy") {
        Backend::Legacy
    } else {
        return Err(Error::Backend(format!(
            "cannot tell the backend from `iptables --version`: {}",
            version.trim()
        )));
    };
    if default == Backend::NfTables {
        let rules = |save: &str| {
            output(save, &[])
                .map(|s| s.lines().filter(|l| l.starts_with("-A")).count())
                .unwrap_or(0)
        };
        if rules("iptables-nft-save") == 0 && rules("iptables-legacy-save") > 0 {
            return Ok(Backend::Legacy);
        }
    }
    Ok(default)
}

/// Whether `family` can be programmed with `backend` here (the program exists
/// and the kernel has the nat table for the family).
pub(crate) fn supports(backend: Backend, family: Family) -> bool {
    let programs = backend.programs(family);
    Command::new(programs.iptables)
        .args(["--wait=5", "-t", "nat", "-S", "POSTROUTING"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn output(program: &str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| Error::Spawn {
            program: program.to_owned(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
