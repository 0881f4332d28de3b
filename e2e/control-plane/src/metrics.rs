//! kube-apiserver's own request counters (`apiserver_request_total`), read
//! from its `/metrics`: what the scenarios count API calls with.

use std::collections::BTreeMap;

/// Requests served, by (verb, resource[/subresource]); verbs lower-case as in
/// the metric (`list`, `watch`, `get`, `post`, `put`, `patch`, `apply`, `delete`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts(pub BTreeMap<(String, String), u64>);

impl RequestCounts {
    /// Parses the Prometheus text exposition.
    pub fn parse(text: &str) -> Self {
        let mut counts = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let labels = parse_labels(labels);
            let (Some(verb), Some(resource)) = (labels.get("verb"), labels.get("resource")) else {
                continue;
            };
            let group = labels.get("group").map(String::as_str).unwrap_or_default();
            let resource = match group {
                "" => resource.clone(),
                group => format!("{resource}.{group}"),
            };
            let resource = match labels.get("subresource").map(String::as_str) {
                None | Some("") => resource,
                Some(sub) => format!("{resource}/{sub}"),
            };
            let value = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
            *counts.entry((verb.to_lowercase(), resource)).or_insert(0) += value;
        }
        RequestCounts(counts)
    }

    /// Counts since `earlier`.
    pub fn since(&self, earlier: &RequestCounts) -> RequestCounts {
        RequestCounts(
            self.0
                .iter()
                .map(|(key, n)| {
                    (
                        key.clone(),
                        n.saturating_sub(*earlier.0.get(key).unwrap_or(&0)),
                    )
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
        )
    }

    /// Requests of `verb` on `resource` (`services`, `proxyplans.planproxy.dev`).
    pub fn count(&self, verb: &str, resource: &str) -> u64 {
        self.0
            .get(&(verb.to_owned(), resource.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Writes of any kind to `resource` and its subresources.
    pub fn writes(&self, resource: &str) -> u64 {
        self.0
            .iter()
            .filter(|((verb, res), _)| {
                matches!(
                    verb.as_str(),
                    "post"
                        | "create"
                        | "put"
                        | "update"
                        | "patch"
                        | "apply"
                        | "delete"
                        | "deletecollection"
                ) && (res == resource
                    || res
                        .strip_prefix(resource)
                        .is_some_and(|r| r.starts_with('/')))
            })
            .map(|(_, n)| n)
            .sum()
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let Some(end) = after.find('"') else { break };
        labels.insert(
            key.trim_start_matches(',').to_owned(),
            after[..end].to_owned(),
        );
        rest = &after[end + 1..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# HELP apiserver_request_total x
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="services",scope="cluster",subresource="",verb="LIST",version="v1"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="planproxy.dev",resource="proxyplans",scope="cluster",subresource="status",verb="PATCH",version="v1alpha1"} 2
apiserver_request_total{code="201",component="apiserver",dry_run="",group="planproxy.dev",resource="proxyplans",scope="cluster",subresource="",verb="APPLY",version="v1alpha1"} 4
apiserver_request_total{code="409",component="apiserver",dry_run="",group="planproxy.dev",resource="proxyplans",scope="cluster",subresource="",verb="APPLY",version="v1alpha1"} 1
"#;

    #[test]
    fn counts_verbs_by_resource_and_subresource() {
        let counts = RequestCounts::parse(SAMPLE);
        assert_eq!(counts.count("list", "services"), 3);
        assert_eq!(counts.count("apply", "proxyplans.planproxy.dev"), 5);
        assert_eq!(counts.writes("proxyplans.planproxy.dev"), 7);
        assert_eq!(counts.writes("proxyplans"), 0);
    }

    #[test]
    fn since_subtracts_an_earlier_reading() {
        let later = RequestCounts::parse(SAMPLE);
        let mut earlier = later.clone();
        earlier.0.insert(("list".into(), "services".into()), 1);
        let delta = later.since(&earlier);
        assert_eq!(delta.count("list", "services"), 2);
        assert_eq!(delta.count("apply", "proxyplans.planproxy.dev"), 0);
    }
}
