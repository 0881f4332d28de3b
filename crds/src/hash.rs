//! The content hash of a ProxyPlan spec, shared by the controller (which writes it
//! as an annotation and skips writes that would not change it) and the agent (which
//! reports the hash it programmed).

use sha2::{Digest, Sha256};

use crate::ProxyPlanSpec;

/// A short, stable hash of the spec's JSON form (16 lowercase hex characters).
///
/// Field order in the JSON form is fixed by the type and every list in the spec is
/// kept sorted by the controller, so equal content always hashes equally.
pub fn spec_hash(spec: &ProxyPlanSpec) -> String {
    // Serialising plain data with string keys cannot fail.
    let json = serde_json::to_vec(spec).unwrap_or_default();
    let digest = Sha256::digest(&json);
    data_encoding::HEXLOWER.encode(&digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1alpha1::ServicePortPlan;

    #[test]
    fn equal_specs_hash_equally_and_changes_show() {
        let a = ProxyPlanSpec {
            node_name: "n1".into(),
            ..Default::default()
        };
        let mut b = a.clone();
        assert_eq!(spec_hash(&a), spec_hash(&b));
        assert_eq!(spec_hash(&a).len(), 16);
        b.service_ports.push(ServicePortPlan::default());
        assert_ne!(spec_hash(&a), spec_hash(&b));
    }
}
