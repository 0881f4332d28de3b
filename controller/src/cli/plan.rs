//! `planproxy-controller plan`: resolve Kubernetes YAML into one node's ProxyPlans,
//! offline.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use planproxy_crds::{ProxyPlan, labels};
use planproxy_resolve::{PlanShard, Problem, ProblemKind, ResolveOptions, Snapshot};

use super::load::{self, LoadError};

/// Arguments of `plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A YAML file (multi-document) or a directory, read recursively (`*.yaml`,
    /// `*.yml`), holding Services, EndpointSlices, Nodes and ProxyPolicies.
    #[arg(long)]
    pub from: PathBuf,
    /// The node whose ProxyPlan to print (a Node object of that name must exist).
    #[arg(long)]
    pub node: String,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Yaml)]
    pub output: Format,
    /// The JSON size a shard aims for.
    #[arg(long, default_value_t = ResolveOptions::default().shard_target_bytes)]
    pub shard_target_bytes: usize,
}

/// Output formats.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One YAML document per shard.
    Yaml,
    /// The object, or a `List` of them when the plan has several shards.
    Json,
}

/// Why `plan` printed no plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The input could not be read.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The input holds values the resolver had to skip.
    #[error("invalid input:\n{}", list(.0))]
    Invalid(Vec<Problem>),
    /// No Node object has the requested name.
    #[error("unknown node {node:?}: no Node object of that name (nodes: {known})")]
    UnknownNode {
        /// The requested node.
        node: String,
        /// The nodes the input has.
        known: String,
    },
    /// The output could not be written or serialised.
    #[error("writing the plan: {0}")]
    Output(String),
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `plan`, writing the plan to `out` and warnings to `warn`.
pub fn run(args: &PlanArgs, out: &mut dyn Write, warn: &mut dyn Write) -> Result<(), PlanError> {
    let objects = load::load(&args.from)?;
    for skipped in &objects.skipped {
        // Warnings are best effort: a closed stderr must not hide the plan.
        let _ = writeln!(
            warn,
            "warning: skipped {skipped}: not a kind the resolver reads"
        );
    }
    let known: Vec<String> = objects
        .nodes
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let snapshot = Snapshot {
        services: objects.services,
        endpoint_slices: objects.endpoint_slices,
        nodes: objects.nodes,
        policies: objects.policies,
        layouts: BTreeMap::new(),
        options: ResolveOptions {
            shard_target_bytes: args.shard_target_bytes,
            ..ResolveOptions::default()
        },
    };
    let mut resolution = planproxy_resolve::resolve(&snapshot);

    // Offline, input that had to be skipped is an error: the user is looking at
    // exactly that input. Policy and size problems still leave a correct plan.
    let (fatal, warnings): (Vec<Problem>, Vec<Problem>) = resolution
        .problems
        .into_iter()
        .partition(|p| matches!(p.kind, ProblemKind::InvalidValue | ProblemKind::Dangling));
    if !fatal.is_empty() {
        return Err(PlanError::Invalid(fatal));
    }
    for problem in &warnings {
        let _ = writeln!(warn, "warning: {problem}");
    }
    let Some(shards) = resolution.plans.remove(&args.node) else {
        return Err(PlanError::UnknownNode {
            node: args.node.clone(),
            known: if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            },
        });
    };
    let objects: Vec<ProxyPlan> = shards.into_iter().map(plan_object).collect();
    let text = match args.output {
        Format::Yaml => {
            let mut text = String::new();
            for object in &objects {
                text.push_str("---\n");
                text.push_str(
                    &serde_yaml::to_string(object).map_err(|e| PlanError::Output(e.to_string()))?,
                );
            }
            text
        }
        Format::Json => {
            let value = match objects.as_slice() {
                [one] => serde_json::to_value(one),
                many => serde_json::to_value(many).map(
                    |items| serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}),
                ),
            }
            .map_err(|e| PlanError::Output(e.to_string()))?;
            let mut text = serde_json::to_string_pretty(&value)
                .map_err(|e| PlanError::Output(e.to_string()))?;
            text.push('\n');
            text
        }
    };
    out.write_all(text.as_bytes())
        .map_err(|e| PlanError::Output(e.to_string()))
}

/// The ProxyPlan object the controller would write for a shard.
pub fn plan_object(shard: PlanShard) -> ProxyPlan {
    let mut object = ProxyPlan::new(&shard.name, shard.spec);
    object.metadata.labels = Some(
        [
            (labels::NODE_LABEL.to_owned(), object.spec.node_name.clone()),
            (
                labels::SHARD_LABEL.to_owned(),
                object.spec.shard.index.to_string(),
            ),
        ]
        .into(),
    );
    object.metadata.annotations =
        Some([(labels::SPEC_HASH_ANNOTATION.to_owned(), shard.hash)].into());
    object
}
