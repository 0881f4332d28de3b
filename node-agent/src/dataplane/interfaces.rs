//! The node's interface addresses, read from the kernel: what
//! `nodePortAddresses` CIDRs are matched against for the health-check node
//! ports, as kube-proxy matches them (a secondary NIC that Node status does
//! not list counts). The node-port rules need no list: they match the
//! kernel's own idea of a local address.

use std::net::IpAddr;

/// Every address of every interface of the calling thread's network
/// namespace, sorted, without duplicates.
pub fn local_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = nix::ifaddrs::getifaddrs()?
        .filter_map(|interface| interface.address)
        .filter_map(|address| {
            address
                .as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}
