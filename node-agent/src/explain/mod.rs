//! `planproxy-agent explain <namespace>/<service>`: what this node does for one
//! service — its frontends, the endpoints the controller chose and why, and the
//! chains that carry it with the kernel's packet counters.
//!
//! The plan comes from a file or from the API server; the service's chain names
//! come from rendering that plan (the renderer is the one place that names
//! chains); the rules and counters come from `iptables-save -c` and
//! `ip6tables-save -c` in the current network namespace, so what is printed is
//! what the kernel holds, not what the agent meant to write.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use planproxy_crds::v1alpha1::{EndpointSelection, EndpointSet, ServicePortPlan, TrafficPolicy};
use planproxy_crds::{ProxyPlan, ProxyPlanSpec};
use planproxy_render::{Family, Layout, RenderOptions, Table};

pub use crate::dataplane::parse::{CountedRule, parse_save};
use crate::dataplane::{Netfilter as _, System};
use crate::run::plan_set::assemble;

/// The flags of `planproxy-agent explain`.
#[derive(clap::Args, Debug, Clone)]
pub struct ExplainArgs {
    /// The service, as `<namespace>/<name>`.
    pub service: String,
    /// Read the node's ProxyPlan shards from this file (YAML or JSON; one plan, a
    /// multi-document stream or a List) instead of the API server.
    #[arg(long)]
    pub plan_file: Option<PathBuf>,
    /// The node whose plan to read from the API server.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The rule layout the agent runs with.
    #[arg(long, value_enum, default_value_t = crate::run::Layout::Tree)]
    pub layout: crate::run::Layout,
    /// Do not read the kernel's rules (print the plan's view only).
    #[arg(long)]
    pub no_kernel: bool,
    /// The backend the agent runs with: `nftables` reads our nftables table,
    /// any iptables one the iptables chains with their counters.
    #[arg(long, default_value = "nftables")]
    pub backend: crate::dataplane::BackendChoice,
}

/// Why `explain` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The service argument is not `namespace/name`.
    #[error("expected <namespace>/<service>, got {0:?}")]
    ServiceArgument(String),
    /// Neither a plan file nor a node name.
    #[error("give --plan-file, or --node-name (or NODE_NAME) with a kubeconfig")]
    NoSource,
    /// The plan file could not be read.
    #[error("failed to read {path}")]
    ReadPlan {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The plan file holds no ProxyPlan.
    #[error("{path} holds no ProxyPlan: {detail}")]
    ParsePlan {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The API server could not be asked.
    #[error("failed to list ProxyPlans from the API server")]
    Kube(#[source] kube::Error),
    /// The service is not in the node's plan.
    #[error("service {0} is not in this node's plan")]
    NotInPlan(String),
    /// The plan does not render.
    #[error("the plan does not render: {0}")]
    Render(String),
}

/// Rules the kernel holds: family → table → chain → (packets, bytes, rule).
pub type KernelRules = BTreeMap<Family, BTreeMap<String, BTreeMap<String, Vec<CountedRule>>>>;

/// Reads the kernel's rules of every family with `iptables-save -c` /
/// `ip6tables-save -c`; a family whose tool fails is reported and left out.
pub fn read_kernel() -> (KernelRules, Vec<String>) {
    let mut rules = KernelRules::new();
    let mut problems = Vec::new();
    for (family, program) in [
        (Family::V4, "iptables-save"),
        (Family::V6, "ip6tables-save"),
    ] {
        match System.run(program, &["-c"], None) {
            Ok(ran) if ran.success => {
                rules.insert(family, parse_save(&ran.stdout));
            }
            Ok(ran) => problems.push(format!("{program} -c failed: {}", ran.stderr)),
            Err(error) => problems.push(format!("cannot run {program}: {error}")),
        }
    }
    (rules, problems)
}

/// The objects of our nftables table that belong to service `namespace/name`:
/// its chains (named after its ports' hashes) and the set and map elements that
/// lead to them or hold its frontends. The dispatch maps count per element the
/// connections each frontend took (rules carry no counters: they would cost on
/// every packet), and the listing shows them beside the frontend.
pub fn nft_objects(listing: &str, specs: &[ProxyPlanSpec], namespace: &str, name: &str) -> String {
    let mut needles: Vec<String> = Vec::new();
    for port in specs
        .iter()
        .flat_map(|s| &s.service_ports)
        .filter(|p| p.namespace == namespace && p.name == name)
    {
        let spn = if port.port_name.is_empty() {
            format!("{namespace}/{name}")
        } else {
            format!("{namespace}/{name}:{}", port.port_name)
        };
        needles.push(format!(
            "-{}",
            planproxy_render::hash::service_port_hash(&spn, port.protocol.as_lower_str())
        ));
        for ip in &port.cluster_ips {
            needles.push(format!("{ip} . {} ", port.port));
            needles.push(format!("{ip} . {} . ", port.protocol.as_lower_str()));
        }
    }
    let mut out =
        String::from("nftables table planproxy (dispatch elements count new connections):\n");
    let listing = crate::dataplane::parse::parse_listing(listing);
    for (chain, rules) in &listing.chains {
        if needles.iter().any(|n| chain.contains(n.trim_end())) {
            let _ = writeln!(out, "  chain {chain} {{");
            for rule in rules {
                let _ = writeln!(out, "  {rule}");
            }
            let _ = writeln!(out, "  }}");
        }
    }
    for element in listing.sets.values().flatten() {
        if needles
            .iter()
            .any(|n| element.contains(n.as_str()) || format!("{element} ").contains(n.as_str()))
        {
            let _ = writeln!(out, "  element {element}");
        }
    }
    out
}

/// Parses a plan file with the one plan-file reader the other commands use
/// ([`crate::cli::parse_plan`]: objects, bare specs, several documents or a
/// List), naming each shard `<node>-<index>` as the controller does.
pub fn parse_plans(text: &str) -> Result<Vec<ProxyPlan>, String> {
    let specs = crate::cli::parse_plan(text).map_err(|e| format!("{e:#}"))?;
    Ok(specs
        .into_iter()
        .map(|spec| {
            let name = format!("{}-{}", spec.node_name, spec.shard.index);
            ProxyPlan::new(&name, spec)
        })
        .collect())
}

/// Runs `explain` and returns its text.
pub async fn run(args: ExplainArgs) -> Result<String, Error> {
    let (namespace, name) = args
        .service
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .ok_or_else(|| Error::ServiceArgument(args.service.clone()))?;
    let plans = match (&args.plan_file, &args.node_name) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).map_err(|source| Error::ReadPlan {
                path: path.clone(),
                source,
            })?;
            parse_plans(&text).map_err(|detail| Error::ParsePlan {
                path: path.clone(),
                detail,
            })?
        }
        (None, Some(node)) => {
            let client = kube::Client::try_default().await.map_err(Error::Kube)?;
            let api: kube::Api<ProxyPlan> = kube::Api::all(client);
            let params =
                kube::api::ListParams::default().labels(&crate::run::watch::node_selector(node));
            api.list(&params).await.map_err(Error::Kube)?.items
        }
        (None, None) => return Err(Error::NoSource),
    };
    let node = args
        .node_name
        .clone()
        .or_else(|| plans.first().map(|plan| plan.spec.node_name.clone()))
        .unwrap_or_default();
    let objects: Vec<Arc<ProxyPlan>> = plans.into_iter().map(Arc::new).collect();
    let plan = assemble(&node, &objects);
    let specs: Vec<ProxyPlanSpec> = plan.shards.iter().map(|shard| shard.spec.clone()).collect();
    let layout = match args.layout {
        crate::run::Layout::Tree => Layout::Tree,
        crate::run::Layout::Flat => Layout::Flat,
    };
    let nftables = args.backend
        == crate::dataplane::BackendChoice::Exactly(crate::dataplane::Backend::Nftables);
    if nftables {
        let mut text = explain(&node, &specs, namespace, name, layout, None, &[])?;
        if !args.no_kernel {
            let listing = tokio::task::spawn_blocking(crate::dataplane::nft_table_text)
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            text.push_str(&match listing {
                Ok(listing) => nft_objects(&listing, &specs, namespace, name),
                Err(error) => format!("nftables table not read: {error}\n"),
            });
        }
        return Ok(text);
    }
    let (kernel, mut notes) = if args.no_kernel {
        (None, Vec::new())
    } else {
        let (rules, problems) = tokio::task::spawn_blocking(read_kernel)
            .await
            .unwrap_or_default();
        (Some(rules), problems)
    };
    if let Some(why) = &plan.incomplete {
        notes.push(format!(
            "the node's plan is incomplete ({why}); showing the shards present"
        ));
    }
    explain(
        &node,
        &specs,
        namespace,
        name,
        layout,
        kernel.as_ref(),
        &notes,
    )
}

/// The text of `explain` for service `namespace/name` in `specs`, with the
/// kernel's rules when given.
pub fn explain(
    node: &str,
    specs: &[ProxyPlanSpec],
    namespace: &str,
    name: &str,
    layout: Layout,
    kernel: Option<&KernelRules>,
    notes: &[String],
) -> Result<String, Error> {
    let ports: Vec<&ServicePortPlan> = specs
        .iter()
        .flat_map(|spec| &spec.service_ports)
        .filter(|port| port.namespace == namespace && port.name == name)
        .collect();
    if ports.is_empty() {
        return Err(Error::NotInPlan(format!("{namespace}/{name}")));
    }
    let rendered = planproxy_render::render(
        specs,
        &RenderOptions {
            layout,
            families: Vec::new(),
        },
    )
    .map_err(|error| Error::Render(error.to_string()))?;

    let mut out = String::new();
    let _ = writeln!(out, "Service {namespace}/{name} on node {node}");
    for note in notes {
        let _ = writeln!(out, "note: {note}");
    }
    for port in &ports {
        let spn = service_port_name(port);
        let protocol = port.protocol.as_lower_str();
        let _ = writeln!(out, "\nPort {spn} ({})", protocol.to_uppercase());
        write_frontends(&mut out, port);
        let _ = writeln!(out, "  Endpoints:");
        if !port.has_endpoints {
            let _ = writeln!(
                out,
                "    none usable anywhere in the cluster: new connections get {:?}",
                port.no_endpoints_action
            );
        }
        if let Some(set) = &port.cluster_endpoints {
            write_endpoint_set(&mut out, "cluster-wide set", set);
        }
        if let Some(set) = &port.local_endpoints {
            write_endpoint_set(&mut out, "node-local set (Local traffic policy)", set);
        }

        let hash = planproxy_render::hash::service_port_hash(&spn, protocol);
        let _ = writeln!(out, "  Chains:");
        for (family, rules) in &rendered.rule_set.families {
            for table in Table::ALL {
                let table_rules = rules.table(table);
                let owned = service_chains(table_rules, &hash, &spn);
                let mentioned = table_rules
                    .chains
                    .values()
                    .any(|chain| chain.rules.iter().any(|rule| mentions(rule, &spn)));
                if owned.is_empty() && !mentioned {
                    continue;
                }
                let dump = kernel
                    .and_then(|k| k.get(family))
                    .and_then(|t| t.get(table.as_str()));
                write_chains(
                    &mut out,
                    *family,
                    table,
                    &spn,
                    &owned,
                    dump,
                    kernel.is_some(),
                );
            }
        }
    }
    Ok(out)
}

fn service_port_name(port: &ServicePortPlan) -> String {
    if port.port_name.is_empty() {
        format!("{}/{}", port.namespace, port.name)
    } else {
        format!("{}/{}:{}", port.namespace, port.name, port.port_name)
    }
}

fn write_frontends(out: &mut String, port: &ServicePortPlan) {
    let _ = writeln!(out, "  Frontends:");
    let proto = port.protocol.as_lower_str();
    for ip in &port.cluster_ips {
        let _ = writeln!(
            out,
            "    cluster IP        {}:{}/{proto}",
            bracket(ip),
            port.port
        );
    }
    if let Some(node_port) = port.node_port {
        let _ = writeln!(out, "    node port         *:{node_port}/{proto}");
    }
    for ip in &port.external_ips {
        let _ = writeln!(
            out,
            "    external IP       {}:{}/{proto}",
            bracket(ip),
            port.port
        );
    }
    for ip in &port.load_balancer_ips {
        let _ = writeln!(
            out,
            "    load balancer IP  {}:{}/{proto}",
            bracket(ip),
            port.port
        );
    }
    if !port.load_balancer_source_ranges.is_empty() {
        let _ = writeln!(
            out,
            "    source ranges     {}",
            port.load_balancer_source_ranges.join(", ")
        );
    }
    if let Some(hc) = port.health_check_node_port {
        let _ = writeln!(
            out,
            "    health check      *:{hc}/tcp (answered by the agent)"
        );
    }
    let policy = |p: TrafficPolicy| match p {
        TrafficPolicy::Cluster => "Cluster",
        TrafficPolicy::Local => "Local",
    };
    let _ = writeln!(
        out,
        "    traffic policy    internal {}, external {}{}",
        policy(port.internal_traffic_policy),
        policy(port.external_traffic_policy),
        port.session_affinity
            .as_ref()
            .map(|a| format!(", ClientIP affinity {}s", a.timeout_seconds))
            .unwrap_or_default()
    );
}

fn bracket(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    }
}

/// Why a set holds what it holds, in words.
pub fn selection_reason(selection: EndpointSelection) -> &'static str {
    match selection {
        EndpointSelection::Ready => "every ready endpoint",
        EndpointSelection::TopologyZone => {
            "ready endpoints hinted for this node's zone (topology-aware routing)"
        }
        EndpointSelection::TopologyNode => "ready endpoints hinted for this node (PreferSameNode)",
        EndpointSelection::TerminatingFallback => {
            "no endpoint was ready, so the serving-but-terminating ones are used"
        }
        EndpointSelection::None => "no usable endpoint",
    }
}

fn write_endpoint_set(out: &mut String, scope: &str, set: &EndpointSet) {
    let _ = writeln!(
        out,
        "    {scope}: {:?} — {}",
        set.selection,
        selection_reason(set.selection)
    );
    for endpoint in &set.endpoints {
        let mut flags = Vec::new();
        flags.push(if endpoint.ready { "ready" } else { "not ready" });
        if endpoint.serving && !endpoint.ready {
            flags.push("serving");
        }
        if endpoint.terminating {
            flags.push("terminating");
        }
        flags.push(if endpoint.local { "local" } else { "remote" });
        let _ = writeln!(
            out,
            "      {}:{}  ({})",
            bracket(&endpoint.ip),
            endpoint.port,
            flags.join(", ")
        );
    }
}

/// The chains rendered for a service port: those named after its hash, and the
/// endpoint chains they, or any rule carrying the port's comment (a single
/// endpoint may be reached straight from the dispatch chain), jump to.
fn service_chains(rules: &planproxy_render::TableRules, hash: &str, spn: &str) -> Vec<String> {
    let mut owned: BTreeSet<String> = rules
        .chains
        .keys()
        .filter(|name| name.ends_with(hash))
        .cloned()
        .collect();
    for chain in rules.chains.values() {
        for rule in chain.rules.iter().filter(|rule| mentions(rule, spn)) {
            if let Some(target) = jump_target(rule)
                && target.starts_with("PPX-SEP-")
                && rules.chains.contains_key(target)
            {
                owned.insert(target.to_owned());
            }
        }
    }
    let mut frontier: Vec<String> = owned.iter().cloned().collect();
    while let Some(chain) = frontier.pop() {
        let Some(content) = rules.chains.get(&chain) else {
            continue;
        };
        for rule in &content.rules {
            if let Some(target) = jump_target(rule)
                && target.starts_with("PPX-SEP-")
                && rules.chains.contains_key(target)
                && owned.insert(target.to_owned())
            {
                frontier.push(target.to_owned());
            }
        }
    }
    // Service chains first, then endpoint chains.
    let mut ordered: Vec<String> = owned
        .iter()
        .filter(|c| !c.starts_with("PPX-SEP-"))
        .cloned()
        .collect();
    ordered.extend(owned.iter().filter(|c| c.starts_with("PPX-SEP-")).cloned());
    ordered
}

fn jump_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(word) = words.next() {
        if word == "-j" || word == "-g" {
            return words.next();
        }
    }
    None
}

/// The comment of a rule as iptables-save prints it (quoted or bare).
fn comment(rule: &str) -> Option<&str> {
    let start = rule.find("--comment ")? + "--comment ".len();
    let rest = &rule[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next()
    } else {
        rest.split_whitespace().next()
    }
}

fn mentions(rule: &str, spn: &str) -> bool {
    comment(rule).is_some_and(|c| {
        c.strip_prefix(spn)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
    })
}

fn write_chains(
    out: &mut String,
    family: Family,
    table: Table,
    spn: &str,
    owned: &[String],
    dump: Option<&BTreeMap<String, Vec<CountedRule>>>,
    kernel_read: bool,
) {
    let _ = writeln!(out, "    {family} {table}:");
    let Some(dump) = dump else {
        let why = if kernel_read {
            "the kernel's rules for this family could not be read"
        } else {
            "kernel not read"
        };
        for chain in owned {
            let _ = writeln!(out, "      {chain} ({why})");
        }
        return;
    };
    // Frontend rules: rules outside the service's chains that jump into them or
    // carry its comment (dispatch, node ports, filter REJECT/DROP).
    let owned_set: BTreeSet<&str> = owned.iter().map(String::as_str).collect();
    let mut frontends = Vec::new();
    for (chain, rules) in dump {
        if owned_set.contains(chain.as_str()) || !chain.starts_with("PPX-") {
            continue;
        }
        for rule in rules {
            let into_service = jump_target(&rule.rule).is_some_and(|t| owned_set.contains(t));
            if into_service || mentions(&rule.rule, spn) {
                frontends.push((chain, rule));
            }
        }
    }
    if !frontends.is_empty() {
        let _ = writeln!(out, "      entry rules:");
        for (chain, rule) in frontends {
            let _ = writeln!(
                out,
                "        {:>8} pkts {:>10} bytes  -A {chain} {}",
                rule.packets, rule.bytes, rule.rule
            );
        }
    }
    for chain in owned {
        match dump.get(chain) {
            Some(rules) => {
                let _ = writeln!(out, "      {chain}:");
                for rule in rules {
                    let _ = writeln!(
                        out,
                        "        {:>8} pkts {:>10} bytes  {}",
                        rule.packets, rule.bytes, rule.rule
                    );
                }
            }
            None => {
                let _ = writeln!(
                    out,
                    "      {chain}: not in the kernel (the agent has not programmed it)"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = include_str!("testdata/worker-1.yaml");

    fn demo_specs() -> Vec<ProxyPlanSpec> {
        parse_plans(DEMO)
            .expect("the demo plan must parse")
            .into_iter()
            .map(|plan| plan.spec)
            .collect()
    }

    #[test]
    fn save_dump_parses_counters_chains_and_tables() {
        let dump = "# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n:PPX-SVC-ABC - [0:0]\n[7:420] -A PPX-SVC-ABC -m comment --comment \"default/api:http -> 10.244.2.30:9000\" -j PPX-SEP-XYZ\nCOMMIT\n*filter\n:PPX-FORWARD - [0:0]\nCOMMIT\n";
        let tables = parse_save(dump);
        let rules = &tables["nat"]["PPX-SVC-ABC"];
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].packets, 7);
        assert_eq!(rules[0].bytes, 420);
        assert!(rules[0].rule.ends_with("-j PPX-SEP-XYZ"));
        assert!(tables["filter"]["PPX-FORWARD"].is_empty());
        assert!(tables["nat"]["PREROUTING"].is_empty());
    }

    #[test]
    fn comments_match_the_service_port_exactly() {
        assert!(mentions(
            "-m comment --comment \"default/api:http cluster IP\" -j X",
            "default/api:http"
        ));
        assert!(mentions(
            "-m comment --comment default/api -j X",
            "default/api"
        ));
        assert!(!mentions(
            "-m comment --comment \"default/api:http cluster IP\" -j X",
            "default/api"
        ));
        assert!(!mentions(
            "-m comment --comment \"default/apiserver\" -j X",
            "default/api"
        ));
    }

    #[test]
    fn explains_frontends_endpoints_with_reasons_and_chains_from_the_plan() {
        let text = explain(
            "worker-1",
            &demo_specs(),
            "default",
            "api",
            Layout::Tree,
            None,
            &[],
        )
        .expect("api is in the demo plan");
        assert!(text.contains("Port default/api:http (TCP)"), "{text}");
        assert!(
            text.contains("cluster IP        10.96.0.30:80/tcp"),
            "{text}"
        );
        assert!(text.contains("node port         *:30080/tcp"), "{text}");
        assert!(
            text.contains("cluster-wide set: Ready — every ready endpoint"),
            "{text}"
        );
        assert!(text.contains("10.244.2.30:9000  (ready, remote)"), "{text}");
        let hash = planproxy_render::hash::service_port_hash("default/api:http", "tcp");
        assert!(
            text.contains(&format!("PPX-SVC-{hash} (kernel not read)")),
            "{text}"
        );
        assert!(
            text.contains(&format!("PPX-EXT-{hash} (kernel not read)")),
            "{text}"
        );
    }

    #[test]
    fn kernel_counters_are_shown_and_missing_chains_called_out() {
        let hash = planproxy_render::hash::service_port_hash("default/api:http", "tcp");
        let dump = format!(
            "*nat\n:PPX-SERVICES - [0:0]\n:PPX-SVC-{hash} - [0:0]\n[3:180] -A PPX-SERVICES -m comment --comment \"default/api:http cluster IP\" -m tcp -p tcp -d 10.96.0.30/32 --dport 80 -j PPX-SVC-{hash}\n[3:180] -A PPX-SVC-{hash} -m comment --comment \"default/api:http -> 10.244.2.30:9000\" -j PPX-SEP-ZZZ\nCOMMIT\n"
        );
        let kernel = KernelRules::from([(Family::V4, parse_save(&dump))]);
        let text = explain(
            "worker-1",
            &demo_specs(),
            "default",
            "api",
            Layout::Tree,
            Some(&kernel),
            &[],
        )
        .expect("api is in the demo plan");
        assert!(text.contains("entry rules:"), "{text}");
        assert!(
            text.contains("       3 pkts        180 bytes  -A PPX-SERVICES"),
            "{text}"
        );
        assert!(text.contains("       3 pkts        180 bytes  -m comment --comment \"default/api:http -> 10.244.2.30:9000\""), "{text}");
        assert!(
            text.contains(&format!("PPX-EXT-{hash}: not in the kernel")),
            "the EXT chain was not in the dump: {text}"
        );
    }

    #[test]
    fn service_chain_of_a_cluster_ip_only_service_with_a_local_endpoint_is_listed() {
        let spec = r#"
nodeName: node1
shard: {index: 0, count: 1, generation: 1}
settings:
  masqueradeBit: 14
  localTrafficDetector: {mode: ClusterCIDR, cidrs: [10.244.0.0/16]}
  minSyncPeriod: 1s
  syncPeriod: 30s
servicePorts:
- namespace: default
  name: web
  protocol: TCP
  clusterIPs: [10.96.0.10]
  port: 80
  externalTrafficPolicy: Cluster
  internalTrafficPolicy: Cluster
  noEndpointsAction: Reject
  hasEndpoints: true
  clusterEndpoints:
    selection: Ready
    endpoints: [{ip: 10.244.1.2, port: 8080, local: true, ready: true, serving: true, terminating: false}]
"#;
        let spec: ProxyPlanSpec = serde_yaml::from_str(spec).expect("the test spec must parse");
        let text = explain("node1", &[spec], "default", "web", Layout::Tree, None, &[])
            .expect("web is in the plan");
        // Hairpin masquerade is node-wide now; the service keeps its own chain.
        let svc = format!(
            "PPX-SVC-{}",
            planproxy_render::hash::service_port_hash("default/web", "tcp")
        );
        assert!(text.contains(&format!("{svc} (kernel not read)")), "{text}");
    }

    #[test]
    fn nftables_objects_of_the_service_are_listed() {
        let spec: ProxyPlanSpec = serde_yaml::from_str(
            "nodeName: n1\nshard: {index: 0, count: 1, generation: 1}\nsettings: {masqueradeBit: 14, localTrafficDetector: {mode: None}, minSyncPeriod: 1s, syncPeriod: 30s}\nservicePorts:\n- {namespace: default, name: web, protocol: TCP, clusterIPs: [10.96.0.10], port: 80, externalTrafficPolicy: Cluster, internalTrafficPolicy: Cluster, noEndpointsAction: Reject, hasEndpoints: true}\n",
        )
        .expect("the test spec must parse");
        let hash = planproxy_render::hash::service_port_hash("default/web", "tcp");
        let listing = format!(
            "table inet planproxy {{\n\tmap services4 {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\tcounter\n\t\telements = {{ 10.96.0.10 . tcp . 80 counter packets 3 bytes 180 : goto svc4-{hash},\n\t\t\t     10.96.0.11 . tcp . 80 : goto other }}\n\t}}\n\tchain svc4-{hash} {{\n\t\tmeta l4proto tcp dnat ip to 10.244.1.2:8080\n\t}}\n\tchain other {{\n\t\tdrop\n\t}}\n}}\n"
        );
        let text = nft_objects(&listing, &[spec], "default", "web");
        assert!(
            text.contains(&format!(
                "element 10.96.0.10 . tcp . 80 counter packets 3 bytes 180 : goto svc4-{hash}"
            )),
            "{text}"
        );
        assert!(text.contains("dnat ip to 10.244.1.2:8080"), "{text}");
        assert!(
            !text.contains("10.96.0.11") && !text.contains("drop"),
            "{text}"
        );
    }

    #[test]
    fn unknown_service_is_a_clear_error() {
        let error = explain(
            "worker-1",
            &demo_specs(),
            "default",
            "nope",
            Layout::Tree,
            None,
            &[],
        )
        .expect_err("nope is not in the plan");
        assert_eq!(
            error.to_string(),
            "service default/nope is not in this node's plan"
        );
    }

    #[test]
    fn terminating_fallback_is_explained() {
        assert_eq!(
            selection_reason(EndpointSelection::TerminatingFallback),
            "no endpoint was ready, so the serving-but-terminating ones are used"
        );
    }
}
