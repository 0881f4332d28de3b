//! The metadata checks kube-apiserver applies to every object (names, labels).
//!
//! These matter because a lenient server would accept plan names or labels
//! that a real cluster rejects.

fn is_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A DNS-1123 subdomain: what most object names must be.
pub fn dns_subdomain(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("must be 1 to 253 characters".into());
    }
    for part in name.split('.') {
        let ok = !part.is_empty()
            && part.chars().all(|c| is_alnum(c) || c == '-')
            && part.starts_with(is_alnum)
            && part.ends_with(is_alnum);
        if !ok {
            return Err(format!(
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (got {name:?})"
            ));
        }
    }
    Ok(())
}

/// A DNS-1123 label: namespace and Service names.
pub fn dns_label(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    if name.contains('.') {
        return Err(format!(
            "a DNS-1123 label must not contain '.' (got {name:?})"
        ));
    }
    dns_subdomain(name)
}

fn qualified_name_part(part: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !part.is_empty()
        && part.len() <= 63
        && part.starts_with(alnum)
        && part.ends_with(alnum)
        && part
            .chars()
            .all(|c| alnum(c) || matches!(c, '-' | '_' | '.'))
}

/// A label (or annotation) key: `[prefix/]name`.
pub fn label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        dns_subdomain(prefix).map_err(|e| format!("prefix of key {key:?}: {e}"))?;
    }
    if !qualified_name_part(name) {
        return Err(format!(
            "name part of key {key:?} must be 1 to 63 alphanumeric characters, '-', '_' or '.', starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// A label value: empty, or up to 63 characters like a qualified name.
pub fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || qualified_name_part(value) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?} must be at most 63 alphanumeric characters, '-', '_' or '.', starting and ending alphanumeric"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_rules() {
        assert!(dns_subdomain("worker-1.shard-0").is_ok());
        assert!(dns_subdomain("Worker").is_err());
        assert!(dns_subdomain("-a").is_err());
        assert!(dns_subdomain("a..b").is_err());
        assert!(dns_subdomain(&"a".repeat(254)).is_err());
        assert!(dns_label("a.b").is_err());
        assert!(dns_label("web").is_ok());
    }

    #[test]
    fn label_keys_and_values_follow_kubernetes_rules() {
        assert!(label_key("planproxy.dev/node").is_ok());
        assert!(label_key("app").is_ok());
        assert!(label_key("Bad_Prefix/x").is_err());
        assert!(label_key("a/").is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("v1.2_x-y").is_ok());
        assert!(label_value("-x").is_err());
        assert!(label_value(&"x".repeat(64)).is_err());
    }
}
