//! The data-plane backends (`--backend`), which iptables implementation the
//! host uses, and the programs of each.

use planproxy_render::Family;

use super::netfilter::{self, Netfilter};
use super::{Backend, BackendChoice, Error};

/// The programs of one backend for one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Programs {
    pub iptables: &'static str,
    pub restore: &'static str,
    pub save: &'static str,
}

impl Backend {
    /// `iptables-nft` / `iptables-legacy` / `nftables`, as `--backend` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::IptablesNft => "iptables-nft",
            Backend::IptablesLegacy => "iptables-legacy",
            Backend::Nftables => "nftables",
        }
    }

    /// Whether this backend writes iptables rules.
    pub fn is_iptables(self) -> bool {
        self != Backend::Nftables
    }

    /// The iptables programs of this backend; the iptables-nft ones for
    /// `nftables`, which never calls them for its own rules (only to remove
    /// iptables rules left by a previous backend).
    pub(crate) fn programs(self, family: Family) -> Programs {
        match (self, family) {
            (Backend::IptablesLegacy, Family::V4) => Programs {
                iptables: "iptables-legacy",
                restore: "iptables-legacy-restore",
                save: "iptables-legacy-save",
            },
            (Backend::IptablesLegacy, Family::V6) => Programs {
                iptables: "ip6tables-legacy",
                restore: "ip6tables-legacy-restore",
                save: "ip6tables-legacy-save",
            },
            (_, Family::V4) => Programs {
                iptables: "iptables-nft",
                restore: "iptables-nft-restore",
                save: "iptables-nft-save",
            },
            (_, Family::V6) => Programs {
                iptables: "ip6tables-nft",
                restore: "ip6tables-nft-restore",
                save: "ip6tables-nft-save",
            },
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendChoice::Iptables => "iptables",
            BackendChoice::Exactly(b) => b.as_str(),
        })
    }
}

impl std::str::FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "iptables" => Ok(BackendChoice::Iptables),
            "iptables-nft" => Ok(BackendChoice::Exactly(Backend::IptablesNft)),
            "iptables-legacy" => Ok(BackendChoice::Exactly(Backend::IptablesLegacy)),
            "nftables" => Ok(BackendChoice::Exactly(Backend::Nftables)),
            other => Err(format!(
                "unknown backend {other:?} (expected nftables, iptables, iptables-nft or iptables-legacy)"
            )),
        }
    }
}

impl BackendChoice {
    /// The backend to use: `iptables` detects the host's iptables variant.
    pub fn resolve(self, nf: &dyn Netfilter) -> Result<Backend, Error> {
        match self {
            BackendChoice::Exactly(b) => Ok(b),
            BackendChoice::Iptables => detect(nf),
        }
    }
}

/// The backend the host's `iptables` uses. When the host's default is nf_tables
/// but only the legacy tables hold rules (a host whose other agents still write
/// legacy rules), legacy wins, as kube-proxy's iptables wrapper decides.
pub(crate) fn detect(nf: &dyn Netfilter) -> Result<Backend, Error> {
    let version = output(nf, "iptables", &["--version"])?;
    let default = if version.contains("nf_tables") {
        Backend::IptablesNft
    } else if version.contains("legacy") {
        Backend::IptablesLegacy
    } else {
        return Err(Error::Backend(format!(
            "cannot tell the backend from `iptables --version`: {}",
            version.trim()
        )));
    };
    if default == Backend::IptablesNft {
        let rules = |save: &str| {
            output(nf, save, &[])
                .map(|s| s.lines().filter(|l| l.starts_with("-A")).count())
                .unwrap_or(0)
        };
        if rules("iptables-nft-save") == 0 && rules("iptables-legacy-save") > 0 {
            return Ok(Backend::IptablesLegacy);
        }
    }
    Ok(default)
}

/// Whether `family` can be programmed with `backend` here (the program exists
/// and the kernel has the nat table for the family). nftables' `inet` table
/// serves both families.
pub(crate) fn supports(nf: &dyn Netfilter, backend: Backend, family: Family) -> bool {
    let ran = if backend == Backend::Nftables {
        nf.run("nft", &["--version"], None)
    } else {
        let programs = backend.programs(family);
        nf.run(
            programs.iptables,
            &["--wait=5", "-t", "nat", "-S", "POSTROUTING"],
            None,
        )
    };
    ran.is_ok_and(|r| r.success)
}

/// What `program args…` printed on standard output, whatever its exit status.
fn output(nf: &dyn Netfilter, program: &str, args: &[&str]) -> Result<String, Error> {
    Ok(netfilter::run(nf, program, args, None)?.stdout)
}
