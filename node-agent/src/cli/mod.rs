//! One-shot commands around the data plane: `render` (dry run), `apply` (program
//! the current network namespace once) and `cleanup` (remove everything planproxy
//! wrote).

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use planproxy_crds::ProxyPlanSpec;
use planproxy_render::{Family, Layout, RenderOptions};

use crate::dataplane::{Backend, BackendChoice, DataPlane, DataPlaneConfig};

/// `planproxy-agent render`: print the iptables-restore input for a plan.
#[derive(clap::Args, Debug)]
pub struct RenderArgs {
    /// A YAML or JSON file of one or more ProxyPlan objects or specs (a node's
    /// complete shard set); `-` reads standard input.
    #[arg(long)]
    pub plan: PathBuf,
    /// How frontends are dispatched: `tree` or `flat`.
    #[arg(long, default_value = "tree", value_parser = parse_layout)]
    pub layout: Layout,
    /// Only this family (`ipv4` or `ipv6`); both by default.
    #[arg(long, value_parser = parse_family)]
    pub family: Option<Family>,
    /// Whose input to print: `nftables` prints the `nft -f` transaction, any
    /// iptables backend the iptables-restore input.
    #[arg(long, default_value = "nftables")]
    pub backend: BackendChoice,
}

/// `planproxy-agent apply`: program a plan once into the current network namespace.
#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    /// A YAML or JSON file of one or more ProxyPlan objects or specs; `-` reads
    /// standard input.
    #[arg(long)]
    pub plan: PathBuf,
    /// How frontends are dispatched: `tree` or `flat`.
    #[arg(long, default_value = "tree", value_parser = parse_layout)]
    pub layout: Layout,
    /// The backend: `nftables`, `iptables` (the variant the host uses),
    /// `iptables-nft` or `iptables-legacy`.
    #[arg(long, default_value = "nftables")]
    pub backend: BackendChoice,
    /// Only this family (`ipv4` or `ipv6`); every supported one by default.
    #[arg(long, value_parser = parse_family)]
    pub family: Option<Family>,
}

/// `planproxy-agent cleanup`: remove every planproxy rule, chain and table, of
/// every backend.
#[derive(clap::Args, Debug)]
pub struct CleanupArgs {
    /// The backend: `nftables`, `iptables` (the variant the host uses),
    /// `iptables-nft` or `iptables-legacy`.
    #[arg(long, default_value = "nftables")]
    pub backend: BackendChoice,
}

fn parse_layout(s: &str) -> Result<Layout, String> {
    s.parse()
}

fn parse_family(s: &str) -> Result<Family, String> {
    match s {
        "ipv4" | "4" => Ok(Family::V4),
        "ipv6" | "6" => Ok(Family::V6),
        other => Err(format!("unknown family {other:?} (expected ipv4 or ipv6)")),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("planproxy-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `render`.
pub fn render(args: RenderArgs) -> ExitCode {
    init_logging();
    finish((|| {
        let shards = read_plan(&args.plan)?;
        let options = RenderOptions {
            layout: args.layout,
            families: args.family.into_iter().collect(),
        };
        if args.backend == BackendChoice::Exactly(Backend::Nftables) {
            let rendered = planproxy_render::nft::render_nft(&shards, &options.families)?;
            for skipped in &rendered.skipped {
                eprintln!("skipped: {skipped}");
            }
            print!("{}", planproxy_render::nft::full_text(&rendered.rules));
            return Ok(());
        }
        let rendered = planproxy_render::render(&shards, &options)?;
        for skipped in &rendered.skipped {
            eprintln!("skipped: {skipped}");
        }
        let out = planproxy_render::full_text(&rendered.rule_set);
        print!("{out}");
        Ok(())
    })())
}

/// Runs `apply`: one full sync, then a read-back; exits 0 only when the kernel
/// holds the plan.
pub fn apply(args: ApplyArgs) -> ExitCode {
    init_logging();
    finish((|| {
        let shards = read_plan(&args.plan)?;
        let mut dataplane = DataPlane::new(DataPlaneConfig {
            layout: args.layout,
            backend: args.backend,
            families: args.family.into_iter().collect(),
        })?;
        let shards: Vec<std::sync::Arc<_>> = shards.into_iter().map(std::sync::Arc::new).collect();
        let report = dataplane.sync(&shards, true)?;
        dataplane.verify()?;
        for skipped in &report.skipped {
            eprintln!("skipped: {skipped}");
        }
        println!(
            "applied ({} backend, {}): {} rules in {} chains, {} chains deleted, {} stale UDP flows deleted, in {:.3}s (lock wait {:.3}s)",
            dataplane.backend(),
            dataplane
                .families()
                .iter()
                .map(|f| f.as_str())
                .collect::<Vec<_>>()
                .join("+"),
            report.rules_written,
            report.chains_written,
            report.chains_deleted,
            report.conntrack_entries_deleted,
            report.duration.as_secs_f64(),
            report.lock_wait.as_secs_f64(),
        );
        Ok(())
    })())
}

/// Runs `cleanup`.
pub fn cleanup(args: CleanupArgs) -> ExitCode {
    init_logging();
    finish((|| {
        let mut dataplane = DataPlane::new(DataPlaneConfig {
            backend: args.backend,
            ..Default::default()
        })?;
        dataplane.cleanup()?;
        println!(
            "removed planproxy's rules ({} backend)",
            dataplane.backend()
        );
        Ok(())
    })())
}

/// Reads a node's shards from a YAML or JSON file (or stdin for `-`): one or more
/// documents, each a ProxyPlan object, a bare ProxyPlanSpec, a list of either, or
/// a Kubernetes `List` with `items`.
pub fn read_plan(path: &std::path::Path) -> anyhow::Result<Vec<ProxyPlanSpec>> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the plan from stdin")?;
        s
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    parse_plan(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Parses the documents of a plan file (see [`read_plan`]).
pub fn parse_plan(text: &str) -> anyhow::Result<Vec<ProxyPlanSpec>> {
    let mut specs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            serde_yaml::Value::deserialize(doc).with_context(|| format!("document {}", i + 1))?;
        collect(value, &mut specs).with_context(|| format!("document {}", i + 1))?;
    }
    if specs.is_empty() {
        bail!("no ProxyPlan found");
    }
    Ok(specs)
}

use serde::Deserialize as _;

fn collect(value: serde_yaml::Value, specs: &mut Vec<ProxyPlanSpec>) -> anyhow::Result<()> {
    match value {
        serde_yaml::Value::Null => Ok(()),
        serde_yaml::Value::Sequence(items) => items.into_iter().try_for_each(|v| collect(v, specs)),
        serde_yaml::Value::Mapping(mut map) => {
            if let Some(items) = map.remove("items") {
                return collect(items, specs);
            }
            let spec = match map.remove("spec") {
                Some(spec) => spec,
                None => serde_yaml::Value::Mapping(map),
            };
            specs.push(serde_yaml::from_value(spec)?);
            Ok(())
        }
        other => bail!("expected a ProxyPlan object or spec, found {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = "nodeName: n1\nshard: {index: 0, count: 2, generation: 1}\nsettings: {masqueradeBit: 14, localTrafficDetector: {mode: None}, minSyncPeriod: 1s, syncPeriod: 30s}\n";

    #[test]
    fn plan_files_hold_objects_specs_lists_or_several_documents() {
        let object = format!(
            "apiVersion: planproxy.dev/v1alpha1\nkind: ProxyPlan\nmetadata: {{name: n1-0}}\nspec:\n{}",
            SPEC.lines().map(|l| format!("  {l}\n")).collect::<String>()
        );
        assert_eq!(parse_plan(SPEC).expect("a bare spec").len(), 1);
        assert_eq!(parse_plan(&object).expect("an object").len(), 1);
        assert_eq!(
            parse_plan(&format!("{object}---\n{SPEC}"))
                .expect("two documents")
                .len(),
            2
        );
        let list = format!(
            "kind: List\nitems:\n- spec:\n{}",
            SPEC.lines()
                .map(|l| format!("    {l}\n"))
                .collect::<String>()
        );
        assert_eq!(parse_plan(&list).expect("a List").len(), 1);
        let json = serde_json::to_string(&parse_plan(SPEC).expect("spec")).expect("json");
        assert_eq!(parse_plan(&json).expect("a JSON array").len(), 1);
    }

    #[test]
    fn a_plan_file_without_plans_or_with_bad_fields_is_an_error() {
        assert!(parse_plan("").is_err());
        let err = parse_plan("nodeName: n1\nshard: nope\n").expect_err("a bad shard");
        assert!(format!("{err:#}").contains("document 1"), "{err:#}");
    }
}
