//! Golden files: the restore input rendered for each `tests/golden/<name>.yaml`
//! plan must equal `tests/golden/<name>.<layout>.rules` byte for byte, so every
//! rule change shows up in review. `UPDATE_GOLDEN=1 cargo test -p
//! planproxy-render --test golden` rewrites the expected files.

use std::path::{Path, PathBuf};

use planproxy_crds::ProxyPlanSpec;
use planproxy_render::{Layout, RenderOptions, full_text, render};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn check(name: &str, layout: Layout) {
    let dir = golden_dir();
    let plan = std::fs::read_to_string(dir.join(format!("{name}.yaml")))
        .expect("the golden plan must exist");
    let spec: ProxyPlanSpec = serde_yaml::from_str(&plan).expect("the golden plan must parse");
    let rendered = render(
        &[spec],
        &RenderOptions {
            layout,
            families: Vec::new(),
        },
    )
    .expect("the golden plan must render");
    assert!(rendered.skipped.is_empty(), "{:?}", rendered.skipped);
    let got = full_text(&rendered.rule_set);
    let layout_name = match layout {
        Layout::Tree => "tree",
        Layout::Flat => "flat",
    };
    let path = dir.join(format!("{name}.{layout_name}.rules"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).expect("the golden file must be writable");
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} is missing; run with UPDATE_GOLDEN=1", path.display()));
    if got != want {
        let first = got
            .lines()
            .zip(want.lines())
            .position(|(g, w)| g != w)
            .unwrap_or(got.lines().count().min(want.lines().count()));
        panic!(
            "{} differs from the rendered rules at line {}:\n  rendered: {:?}\n  expected: {:?}\n(run with UPDATE_GOLDEN=1 to accept)",
            path.display(),
            first + 1,
            got.lines().nth(first),
            want.lines().nth(first)
        );
    }
}

#[test]
fn basic_plan_renders_as_recorded() {
    check("basic", Layout::Tree);
}

#[test]
fn basic_plan_flat_layout_renders_as_recorded() {
    check("basic", Layout::Flat);
}

#[test]
fn many_services_dispatch_through_a_tree_as_recorded() {
    check("tree", Layout::Tree);
}

#[test]
fn many_services_flat_layout_renders_as_recorded() {
    check("tree", Layout::Flat);
}
