//! Stable chain names, hashed as kube-proxy hashes them but under planproxy's own
//! `PPX-` prefix so both proxies can run side by side during a migration.

use sha2::{Digest, Sha256};

/// Every chain planproxy owns starts with this.
pub const CHAIN_PREFIX: &str = "PPX-";

/// The longest chain name iptables accepts (`XT_EXTENSION_MAXNAMELEN` - 1 = 28).
pub const MAX_CHAIN_NAME: usize = 28;

/// kube-proxy's name hash: the first 16 characters of base32(sha256(input)).
pub fn short_hash(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut encoded = data_encoding::BASE32.encode(&digest);
    encoded.truncate(16);
    encoded
}

/// The per-service-port hash input: `ns/name[:port]` followed by the lowercase protocol.
pub fn service_port_hash(service_port_name: &str, protocol: &str) -> String {
    short_hash(&format!("{service_port_name}{protocol}"))
}

/// The per-endpoint hash: the service port's input followed by `ip:port`
/// (`[ip]:port` for IPv6).
pub fn endpoint_hash(service_port_name: &str, protocol: &str, endpoint: &str) -> String {
    short_hash(&format!("{service_port_name}{protocol}{endpoint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors from kube-proxy's test fixtures.
    #[test]
    fn hashes_match_kube_proxy_vectors() {
        assert_eq!(service_port_hash("ns1/svc1:p80", "tcp"), "XPGD46QRK7WJZT7O");
        assert_eq!(
            endpoint_hash("ns1/svc1:p80", "tcp", "10.180.0.1:80"),
            "SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            endpoint_hash("ns5/svc5:p80", "tcp", "10.180.0.3:80"),
            "I77PXRDZVX7PMWMN"
        );
    }

    #[test]
    fn hash_is_sixteen_base32_characters() {
        let h = short_hash("anything");
        assert_eq!(h.len(), 16);
        assert!(
            h.bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        );
    }
}
