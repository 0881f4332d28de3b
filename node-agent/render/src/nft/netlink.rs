//! Set elements as nf_tables netlink messages, for loading a large table
//! without `nft`: nft parses about 15 µs of CPU per element, which at 100k
//! elements is most of a cold start, while the kernel takes a few µs.
//!
//! Only elements are encoded here: chains, rules and sets are still written by
//! `nft -f`, and the element types come from our own set declarations, so the
//! vocabulary is closed: addresses, protocols, ports, `numgen` indexes and
//! `goto`/`jump`/`drop`/`accept` verdicts. Anything else is an error, never a
//! guess.

use std::net::IpAddr;

use super::{NftTable, SetDecl, TABLE};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
const NFPROTO_INET: u8 = 1;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;

/// A nested attribute's length is 16 bits: one message's element list stays
/// well under it.
const MAX_ELEMENTS_BYTES: usize = 60_000;

/// One field of a key or value, as the kernel lays it out in a register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Ipv4,
    Ipv6,
    /// `inet_proto`: one byte.
    Proto,
    /// `inet_service`: a port, network byte order.
    Port,
    /// A `numgen` result: 32 bits, host byte order.
    Index,
}

/// What a set maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Data {
    None,
    Verdict,
    Fields(Vec<Field>),
}

/// Why elements could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("set {set}: cannot encode {what:?} for netlink")]
pub struct EncodeError {
    /// The set.
    pub set: String,
    /// The declaration or element that is outside the vocabulary.
    pub what: String,
}

/// The batches that add the elements of the sets `which` selects to a kernel
/// holding the table's sets (declared, empty). Each batch is one transaction;
/// its last message asks for an acknowledgement, so a reader knows when the
/// kernel is done. `seq` numbers the messages from `first_seq`.
pub fn element_batch(
    table: &NftTable,
    which: impl Fn(&str) -> bool,
    first_seq: u32,
) -> Result<Option<Vec<u8>>, EncodeError> {
    let mut messages: Vec<Vec<u8>> = Vec::new();
    for (name, decl, _) in table.sets().filter(|(n, d, _)| !d.dynamic && which(n)) {
        let (key, data) = layout(name, decl)?;
        let mut lists: Vec<Vec<u8>> = vec![Vec::new()];
        for (k, v) in table.elements_of(name) {
            let element = encode_element(name, &key, &data, k, v)?;
            if lists
                .last()
                .is_some_and(|l| l.len() + element.len() > MAX_ELEMENTS_BYTES)
            {
                lists.push(Vec::new());
            }
            if let Some(list) = lists.last_mut() {
                list.extend_from_slice(&element);
            }
        }
        for list in lists.iter().filter(|l| !l.is_empty()) {
            messages.push(element_list(name, list));
        }
    }
    let messages: Vec<(u16, Vec<u8>)> = messages
        .into_iter()
        .map(|m| (NFT_MSG_NEWSETELEM, m))
        .collect();
    Ok(batch(&messages, first_seq))
}

/// One batch (one transaction) that takes `removed` out of their sets and puts
/// `added` in: an incremental change of elements only, without `nft`.
pub fn element_change_batch(
    table: &NftTable,
    removed: &[(String, String)],
    added: &[(String, String, String)],
    first_seq: u32,
) -> Result<Option<Vec<u8>>, EncodeError> {
    let mut messages: Vec<(u16, Vec<u8>)> = Vec::new();
    let unknown = |set: &str| EncodeError {
        set: set.to_owned(),
        what: "an undeclared set".to_owned(),
    };
    for (set, key) in removed {
        let decl = table.decl(set).ok_or_else(|| unknown(set))?;
        let (fields, _) = layout(set, decl)?;
        let element = encode_element(set, &fields, &Data::None, key, "")?;
        messages.push((NFT_MSG_DELSETELEM, element_list(set, &element)));
    }
    for (set, key, value) in added {
        let decl = table.decl(set).ok_or_else(|| unknown(set))?;
        let (fields, data) = layout(set, decl)?;
        let element = encode_element(set, &fields, &data, key, value)?;
        messages.push((NFT_MSG_NEWSETELEM, element_list(set, &element)));
    }
    Ok(batch(&messages, first_seq))
}

/// `messages` (`(message type, attributes)`) as one batch between the begin
/// and end markers, numbered from `first_seq`; only the last asks for an
/// acknowledgement. `None` when there is nothing to send.
fn batch(messages: &[(u16, Vec<u8>)], first_seq: u32) -> Option<Vec<u8>> {
    let last = messages.len().checked_sub(1)?;
    let mut out = Vec::new();
    let mut seq = first_seq;
    push_batch_marker(&mut out, NFNL_MSG_BATCH_BEGIN, seq);
    for (i, (kind, body)) in messages.iter().enumerate() {
        seq += 1;
        let ack = if i == last { NLM_F_ACK } else { 0 };
        let create = if *kind == NFT_MSG_NEWSETELEM {
            NLM_F_CREATE
        } else {
            0
        };
        push_message(
            &mut out,
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | create | ack,
            seq,
            NFPROTO_INET,
            0,
            body,
        );
    }
    push_batch_marker(&mut out, NFNL_MSG_BATCH_END, seq + 1);
    Some(out)
}

/// The attributes of a message about `elements` of `set`.
fn element_list(set: &str, elements: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    attr_str(&mut body, NFTA_SET_ELEM_LIST_TABLE, TABLE);
    attr_str(&mut body, NFTA_SET_ELEM_LIST_SET, set);
    attr(
        &mut body,
        NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED,
        elements,
    );
    body
}

/// The sequence number of the batch's acknowledged (last) message.
pub fn acknowledged_seq(batch: &[u8]) -> Option<u32> {
    let mut offset = 0;
    let mut acked = None;
    while offset + 16 <= batch.len() {
        let len = u32::from_ne_bytes(batch[offset..offset + 4].try_into().ok()?) as usize;
        let flags = u16::from_ne_bytes(batch[offset + 6..offset + 8].try_into().ok()?);
        let seq = u32::from_ne_bytes(batch[offset + 8..offset + 12].try_into().ok()?);
        if flags & NLM_F_ACK != 0 {
            acked = Some(seq);
        }
        if len == 0 {
            return None;
        }
        offset += align(len);
    }
    acked
}

fn layout(set: &str, decl: &SetDecl) -> Result<(Vec<Field>, Data), EncodeError> {
    let bad = || EncodeError {
        set: set.to_owned(),
        what: decl.spec.clone(),
    };
    let clause = decl
        .spec
        .split(';')
        .map(str::trim)
        .find(|c| c.starts_with("type ") || c.starts_with("typeof "))
        .ok_or_else(bad)?;
    let (typeof_, body) = match clause.strip_prefix("typeof ") {
        Some(rest) => (true, rest),
        None => (false, clause.strip_prefix("type ").ok_or_else(bad)?),
    };
    let (key, data) = match body.split_once(" : ") {
        Some((k, d)) => (k, Some(d)),
        None => (body, None),
    };
    let fields = |s: &str| -> Result<Vec<Field>, EncodeError> {
        s.split(" . ")
            .map(|f| field(f.trim(), typeof_).ok_or_else(bad))
            .collect()
    };
    let data = match data {
        None => Data::None,
        Some("verdict") => Data::Verdict,
        Some(d) => Data::Fields(fields(d)?),
    };
    Ok((fields(key)?, data))
}

fn field(name: &str, typeof_: bool) -> Option<Field> {
    if typeof_ {
        return match name {
            "ip daddr" | "ip saddr" => Some(Field::Ipv4),
            "ip6 daddr" | "ip6 saddr" => Some(Field::Ipv6),
            "th dport" | "tcp dport" | "udp dport" | "sctp dport" => Some(Field::Port),
            "numgen random mod 1" => Some(Field::Index),
            "meta l4proto" => Some(Field::Proto),
            _ => None,
        };
    }
    match name {
        "ipv4_addr" => Some(Field::Ipv4),
        "ipv6_addr" => Some(Field::Ipv6),
        "inet_proto" => Some(Field::Proto),
        "inet_service" => Some(Field::Port),
        _ => None,
    }
}

fn encode_element(
    set: &str,
    key: &[Field],
    data: &Data,
    k: &str,
    v: &str,
) -> Result<Vec<u8>, EncodeError> {
    let bad = |what: &str| EncodeError {
        set: set.to_owned(),
        what: what.to_owned(),
    };
    let mut inner = Vec::new();
    let mut key_attr = Vec::new();
    attr(
        &mut key_attr,
        NFTA_DATA_VALUE,
        &values(key, k).ok_or_else(|| bad(k))?,
    );
    attr(&mut inner, NFTA_SET_ELEM_KEY | NLA_F_NESTED, &key_attr);
    match data {
        Data::None => {}
        Data::Fields(fields) => {
            let mut d = Vec::new();
            attr(
                &mut d,
                NFTA_DATA_VALUE,
                &values(fields, v).ok_or_else(|| bad(v))?,
            );
            attr(&mut inner, NFTA_SET_ELEM_DATA | NLA_F_NESTED, &d);
        }
        Data::Verdict => {
            let (code, chain) = match v.split_once(' ') {
                Some(("goto", chain)) => (NFT_GOTO, Some(chain)),
                Some(("jump", chain)) => (NFT_JUMP, Some(chain)),
                None if v == "drop" => (NF_DROP, None),
                None if v == "accept" => (NF_ACCEPT, None),
                _ => return Err(bad(v)),
            };
            let mut verdict = Vec::new();
            attr(&mut verdict, NFTA_VERDICT_CODE, &code.to_be_bytes());
            if let Some(chain) = chain {
                attr_str(&mut verdict, NFTA_VERDICT_CHAIN, chain);
            }
            let mut d = Vec::new();
            attr(&mut d, NFTA_DATA_VERDICT | NLA_F_NESTED, &verdict);
            attr(&mut inner, NFTA_SET_ELEM_DATA | NLA_F_NESTED, &d);
        }
    }
    let mut element = Vec::new();
    attr(&mut element, NFTA_LIST_ELEM | NLA_F_NESTED, &inner);
    Ok(element)
}

/// The register bytes of `text` (`a . b . c`) laid out as `fields`: each field
/// of a concatenation takes a multiple of four bytes.
fn values(fields: &[Field], text: &str) -> Option<Vec<u8>> {
    let parts: Vec<&str> = text.split(" . ").map(str::trim).collect();
    if parts.len() != fields.len() {
        return None;
    }
    let concat = fields.len() > 1;
    let mut out = Vec::new();
    for (field, part) in fields.iter().zip(parts) {
        let start = out.len();
        match field {
            Field::Ipv4 => match part.parse::<IpAddr>().ok()? {
                IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
                IpAddr::V6(_) => return None,
            },
            Field::Ipv6 => match part.parse::<IpAddr>().ok()? {
                IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
                IpAddr::V4(_) => return None,
            },
            Field::Proto => out.push(match part {
                "tcp" => 6,
                "udp" => 17,
                "sctp" => 132,
                _ => return None,
            }),
            Field::Port => out.extend_from_slice(&part.parse::<u16>().ok()?.to_be_bytes()),
            Field::Index => out.extend_from_slice(&part.parse::<u32>().ok()?.to_ne_bytes()),
        }
        if concat {
            while (out.len() - start) % 4 != 0 {
                out.push(0);
            }
        }
    }
    Some(out)
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(align(out.len()), 0);
}

fn attr_str(out: &mut Vec<u8>, kind: u16, s: &str) {
    let mut payload = s.as_bytes().to_vec();
    payload.push(0);
    attr(out, kind, &payload);
}

fn push_message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let len = u32::try_from(16 + 4 + attrs.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(0);
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(attrs);
    out.resize(align(out.len()), 0);
}

fn push_batch_marker(out: &mut Vec<u8>, kind: u16, seq: u32) {
    push_message(out, kind, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_key_is_laid_out_as_nft_sends_it() {
        // nft 1.0.6 sends the key of `10.96.0.1 . 80 . 2` in endpoints4-tcp as
        // these bytes (read off strace).
        let key = [Field::Ipv4, Field::Port, Field::Index];
        let bytes = values(&key, "10.96.0.1 . 80 . 2").expect("valid key");
        let mut expected = vec![0x0a, 0x60, 0x00, 0x01, 0x00, 0x50, 0x00, 0x00];
        expected.extend_from_slice(&2u32.to_ne_bytes());
        assert_eq!(bytes, expected);
        let mut element_attr = Vec::new();
        attr(&mut element_attr, NFTA_DATA_VALUE, &bytes);
        assert_eq!(element_attr.len(), 16);
    }

    #[test]
    fn only_our_vocabulary_is_encoded() {
        assert_eq!(values(&[Field::Proto], "icmp"), None);
        assert_eq!(values(&[Field::Ipv4, Field::Port], "10.0.0.1"), None);
        assert_eq!(values(&[Field::Ipv4], "fd00::1"), None);
        let decl = SetDecl {
            keyword: "map",
            spec: "type mark : verdict;".to_owned(),
            dynamic: false,
        };
        assert!(layout("m", &decl).is_err());
    }

    #[test]
    fn a_single_port_is_two_bytes_unpadded() {
        assert_eq!(
            values(&[Field::Port], "30080"),
            Some(30080u16.to_be_bytes().to_vec())
        );
    }
}
