//! SCTP through the kernel without SCTP sockets. Netfilter matches, tracks
//! and NATs SCTP (`CONFIG_NF_CT_PROTO_SCTP`, `xt_sctp`, nft's `sctp` payload)
//! even where the kernel has no SCTP stack (`CONFIG_IP_SCTP` unset, so
//! `socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP)` fails with
//! EPROTONOSUPPORT). A test therefore builds the first packet of an
//! association itself, an INIT chunk behind a common header with its CRC32c,
//! sends it on a raw IP socket, and reads what arrives on the other side on
//! another raw socket, which sees every SCTP packet addressed to its
//! namespace with its IP header. IPv4 only: an IPv6 raw socket does not hand
//! over the header that holds the destination address.

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::error::{NetnsError, Result};
use crate::ns::Netns;

/// SCTP's IP protocol number.
pub const IPPROTO_SCTP: i32 = 132;

/// The chunk type of INIT.
const CHUNK_INIT: u8 = 1;

/// Common header (12 bytes) and an INIT chunk without parameters (20 bytes).
const INIT_PACKET_LEN: usize = 32;

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78), as RFC 9260
/// appendix A defines SCTP's checksum. Bitwise: test packets are tiny.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The first packet of an SCTP association: an INIT chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SctpInit {
    pub source_port: u16,
    pub destination_port: u16,
    /// The initiate tag, which a test picks so it can tell its packet from
    /// any other (it survives NAT unchanged).
    pub initiate_tag: u32,
}

impl SctpInit {
    /// The SCTP packet (common header and INIT chunk), checksummed. An INIT
    /// carries verification tag 0 (conntrack drops one that does not).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut packet = Vec::with_capacity(INIT_PACKET_LEN);
        packet.extend_from_slice(&self.source_port.to_be_bytes());
        packet.extend_from_slice(&self.destination_port.to_be_bytes());
        packet.extend_from_slice(&0u32.to_be_bytes()); // verification tag
        packet.extend_from_slice(&0u32.to_be_bytes()); // checksum, filled below
        packet.push(CHUNK_INIT);
        packet.push(0); // flags
        packet.extend_from_slice(&20u16.to_be_bytes()); // chunk length
        packet.extend_from_slice(&self.initiate_tag.to_be_bytes());
        packet.extend_from_slice(&65_535u32.to_be_bytes()); // advertised window
        packet.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
        packet.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
        packet.extend_from_slice(&self.initiate_tag.to_be_bytes()); // initial TSN
        // The kernel stores the CRC little-endian (`sctp_compute_cksum`).
        let checksum = crc32c(&packet).to_le_bytes();
        packet[8..12].copy_from_slice(&checksum);
        packet
    }

    /// Reads an INIT packet; `None` for anything else. The flag says whether
    /// its checksum is right (NAT must recompute it after changing a port).
    pub fn parse(sctp: &[u8]) -> Option<(SctpInit, bool)> {
        if sctp.len() < INIT_PACKET_LEN || sctp[12] != CHUNK_INIT {
            return None;
        }
        let u16_at = |at: usize| u16::from_be_bytes([sctp[at], sctp[at + 1]]);
        let u32_at =
            |at: usize| u32::from_be_bytes([sctp[at], sctp[at + 1], sctp[at + 2], sctp[at + 3]]);
        let stored = u32::from_le_bytes([sctp[8], sctp[9], sctp[10], sctp[11]]);
        let mut zeroed = sctp.to_vec();
        zeroed[8..12].fill(0);
        let init = SctpInit {
            source_port: u16_at(0),
            destination_port: u16_at(2),
            initiate_tag: u32_at(16),
        };
        Some((init, crc32c(&zeroed) == stored))
    }
}

/// An INIT as it arrived, with the addresses of its IP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceivedInit {
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    pub initiate_tag: u32,
    pub checksum_valid: bool,
}

/// A raw socket in one namespace that sees every SCTP packet addressed to it.
#[derive(Debug)]
pub struct SctpCapture {
    socket: Socket,
    namespace: String,
}

impl SctpCapture {
    /// Waits up to `timeout` for the INIT with `initiate_tag`; other packets
    /// are skipped. `Ok(None)` when it did not come.
    pub fn wait_for(&self, initiate_tag: u32, timeout: Duration) -> Result<Option<ReceivedInit>> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.socket
                .set_read_timeout(Some(left))
                .map_err(|e| self.error("setting the capture timeout", e))?;
            let n = match (&self.socket).read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(self.error("reading the capture socket", e)),
            };
            if let Some(init) = received_init(&buf[..n]).filter(|r| r.initiate_tag == initiate_tag)
            {
                return Ok(Some(init));
            }
        }
    }

    fn error(&self, what: &str, source: std::io::Error) -> NetnsError {
        NetnsError::io(format!("{what} in {}", self.namespace), source)
    }
}

/// Reads an IPv4 packet carrying an SCTP INIT.
fn received_init(ip: &[u8]) -> Option<ReceivedInit> {
    let header_len = usize::from(ip.first()? & 0x0f) * 4;
    if ip.len() < header_len || header_len < 20 || i32::from(ip[9]) != IPPROTO_SCTP {
        return None;
    }
    let address = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    let (init, checksum_valid) = SctpInit::parse(&ip[header_len..])?;
    Some(ReceivedInit {
        source: SocketAddrV4::new(address(12), init.source_port),
        destination: SocketAddrV4::new(address(16), init.destination_port),
        initiate_tag: init.initiate_tag,
        checksum_valid,
    })
}

fn raw_sctp_socket(ns: &Netns) -> Result<Socket> {
    ns.socket(Domain::IPV4, Type::RAW, Some(Protocol::from(IPPROTO_SCTP)))
}

impl Netns {
    /// Starts capturing the SCTP packets addressed to this namespace. Start it
    /// before sending: packets that arrive earlier are not seen.
    pub fn capture_sctp(&self) -> Result<SctpCapture> {
        Ok(SctpCapture {
            socket: raw_sctp_socket(self)?,
            namespace: self.name().to_owned(),
        })
    }

    /// Sends `init` to `to`'s address (its port is `init`'s destination port),
    /// from `source` when given, else from the address the route picks.
    pub fn send_sctp_init(
        &self,
        source: Option<Ipv4Addr>,
        to: Ipv4Addr,
        init: &SctpInit,
    ) -> Result<()> {
        let socket = raw_sctp_socket(self)?;
        let context = |what: &str| format!("{what} from {}", self.name());
        if let Some(source) = source {
            let local = SockAddr::from(SocketAddr::from((source, 0)));
            socket.bind(&local).map_err(|e| {
                NetnsError::io(
                    context(&format!("binding a raw SCTP socket to {source}")),
                    e,
                )
            })?;
        }
        // A raw IPv4 socket takes no port: the SCTP header carries it.
        let destination = SockAddr::from(SocketAddr::from((to, 0)));
        socket
            .send_to(&init.to_bytes(), &destination)
            .map_err(|e| NetnsError::io(context(&format!("sending an SCTP INIT to {to}")), e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value_and_rfc_3720_vectors() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        // RFC 3720 B.4: 32 bytes of zeros, of ones, incrementing.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let incrementing: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&incrementing), 0x46DD_794E);
    }

    #[test]
    fn an_init_packet_reads_back_and_a_changed_byte_breaks_its_checksum() {
        let init = SctpInit {
            source_port: 40_000,
            destination_port: 3868,
            initiate_tag: 0xC0FF_EE01,
        };
        let mut bytes = init.to_bytes();
        assert_eq!(bytes.len(), INIT_PACKET_LEN);
        assert_eq!(
            &bytes[4..8],
            &[0, 0, 0, 0],
            "an INIT's verification tag is 0"
        );
        assert_eq!(SctpInit::parse(&bytes), Some((init, true)));
        // A port rewritten without a new checksum, as a broken NAT would leave it.
        bytes[3] ^= 1;
        let (rewritten, valid) = SctpInit::parse(&bytes).expect("still an INIT");
        assert_eq!(rewritten.destination_port, 3869);
        assert!(!valid);
    }

    #[test]
    fn an_ipv4_packet_gives_its_addresses_and_ports() {
        let init = SctpInit {
            source_port: 5000,
            destination_port: 6000,
            initiate_tag: 7,
        };
        let mut ip = vec![
            0x45, 0, 0, 52, 0, 0, 0, 0, 64, 132, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip.extend(init.to_bytes());
        let received = received_init(&ip).expect("an INIT in IPv4");
        assert_eq!(received.source, "10.0.0.1:5000".parse().expect("valid"));
        assert_eq!(
            received.destination,
            "10.0.0.2:6000".parse().expect("valid")
        );
        assert!(received.checksum_valid);
        ip[9] = 17;
        assert_eq!(received_init(&ip), None, "not SCTP");
    }
}
