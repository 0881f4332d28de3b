//! `net.ipv4.conf.all.route_localnet`: the one node setting besides netfilter
//! rules that node ports need. Without it the kernel treats a packet to or from
//! 127.0.0.0/8 on any other interface as a martian, so a node connection to
//! `127.0.0.1:<nodePort>` DNATed to a pod could neither leave nor get its reply.
//!
//! It is set only while the plan serves localhost node ports, and never reset:
//! other software on the node (kubelet, an earlier kube-proxy) may rely on it,
//! and turning it off under them is not planproxy's call. Both are logged.

use super::Netfilter;

/// The sysctl, as a path under `/proc/sys`.
pub const ROUTE_LOCALNET: &str = "net/ipv4/conf/all/route_localnet";

/// A node setting the plan asks for that could not be made. The rules are in
/// place; the node just does not behave entirely as planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SettingProblem {
    /// A short UpperCamelCase reason for the plan's status.
    pub reason: &'static str,
    /// What failed and what it means for traffic.
    pub message: String,
}

/// What the data plane remembers between syncs about route_localnet.
#[derive(Debug, Default)]
pub struct RouteLocalnet {
    /// Whether the last sync's plan served localhost node ports.
    wanted: Option<bool>,
}

impl RouteLocalnet {
    /// Sets route_localnet to 1 when `wanted` and it is not 1 already; when
    /// the plan stops wanting it, says that it stays as it is.
    pub fn ensure(&mut self, nf: &dyn Netfilter, wanted: bool) -> Result<(), SettingProblem> {
        let was_wanted = self.wanted.replace(wanted);
        if !wanted {
            if was_wanted == Some(true) {
                tracing::info!(
                    sysctl = "net.ipv4.conf.all.route_localnet",
                    "IPv4 node ports no longer answer on 127.0.0.1; route_localnet is left as it is (planproxy never resets it)"
                );
            }
            return Ok(());
        }
        let failed = |what: &str, error: std::io::Error| SettingProblem {
            reason: planproxy_crds::condition::reason::SYSCTL_FAILED,
            message: format!(
                "{what} net.ipv4.conf.all.route_localnet failed ({error}), so IPv4 node ports do not answer on 127.0.0.1"
            ),
        };
        let current = nf
            .sysctl(ROUTE_LOCALNET)
            .map_err(|e| failed("reading", e))?;
        if current == "1" {
            return Ok(());
        }
        nf.set_sysctl(ROUTE_LOCALNET, "1")
            .map_err(|e| failed("setting", e))?;
        tracing::info!(
            sysctl = "net.ipv4.conf.all.route_localnet",
            previous = %current,
            "set route_localnet=1 so IPv4 node ports answer on 127.0.0.1; packets to 127.0.0.0/8 from elsewhere are dropped"
        );
        Ok(())
    }
}
