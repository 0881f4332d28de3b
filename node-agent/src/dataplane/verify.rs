//! Whether the kernel holds what the last sync wrote, rule by rule: each of
//! our chains is read back (`iptables-save`, `nft list table`) and its rules
//! are compared in order with the rendered ones, both in the canonical
//! spelling of [`super::parse`], so a rule edited in place is caught even when
//! every chain keeps its number of rules. Set elements are compared as sets;
//! the elements of dynamic sets are the kernel's own (affinity) and are not.

use std::collections::{BTreeMap, BTreeSet};

use planproxy_render::nft::{NftTable, TABLE};
use planproxy_render::{Family, RuleSet, Table, TableRules};

use super::netfilter::Netfilter;
use super::parse::{self, CountedRule, Listing};
use super::{Backend, Error, exec, nft};

/// The first rule where a chain in the kernel differs from what was written;
/// `None` on one side when the other has more rules.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleDifference {
    chain: String,
    /// 1-based, as `iptables -L --line-numbers` counts.
    position: usize,
    expected: Option<String>,
    found: Option<String>,
}

impl std::fmt::Display for RuleDifference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let quoted = |rule: &Option<String>| {
            rule.as_deref()
                .map_or_else(|| "no rule".to_owned(), |r| format!("{r:?}"))
        };
        write!(
            f,
            "chain {} rule {}: expected {}, found {}",
            self.chain,
            self.position,
            quoted(&self.expected),
            quoted(&self.found)
        )
    }
}

/// Compares `expected` with `found` in order, through `canonical`.
fn first_difference(
    chain: &str,
    expected: &[String],
    found: &[impl AsRef<str>],
    canonical: fn(&str) -> String,
) -> Option<RuleDifference> {
    let longest = expected.len().max(found.len());
    (0..longest).find_map(|i| {
        let ours = expected.get(i).map(String::as_str);
        let theirs = found.get(i).map(AsRef::as_ref);
        let same = match (ours, theirs) {
            (Some(a), Some(b)) => canonical(a) == canonical(b),
            _ => false,
        };
        (!same).then(|| RuleDifference {
            chain: chain.to_owned(),
            position: i + 1,
            expected: ours.map(str::to_owned),
            found: theirs.map(str::to_owned),
        })
    })
}

/// Checks every family and table of `rule_set` against one `iptables-save`
/// of each: every chain rule by rule, and every jump from a built-in chain.
pub(super) fn iptables(
    nf: &dyn Netfilter,
    backend: Backend,
    rule_set: &RuleSet,
) -> Result<(), Error> {
    for (family, rules) in &rule_set.families {
        let programs = backend.programs(*family);
        for table in Table::ALL {
            let found = parse::chains_of(&exec::save(nf, &programs, table)?);
            check_iptables_table(rules.table(table), &found).map_err(|detail| Error::Verify {
                family: *family,
                table,
                detail,
            })?;
        }
    }
    Ok(())
}

fn check_iptables_table(
    expected: &TableRules,
    found: &BTreeMap<String, Vec<CountedRule>>,
) -> Result<(), String> {
    for (name, chain) in &expected.chains {
        let rules = found
            .get(name)
            .ok_or_else(|| format!("chain {name} is missing"))?;
        let rules: Vec<&str> = rules.iter().map(|r| r.rule.as_str()).collect();
        let canonical = parse::canonical_iptables_rule;
        if let Some(difference) = first_difference(name, &chain.rules, &rules, canonical) {
            return Err(difference.to_string());
        }
    }
    for jump in &expected.jumps {
        let wanted = parse::canonical_iptables_rule(&jump.spec);
        let present = found.get(jump.builtin).is_some_and(|rules| {
            rules
                .iter()
                .any(|r| parse::canonical_iptables_rule(&r.rule) == wanted)
        });
        if !present {
            return Err(format!(
                "jump from {} to {} is missing (expected {:?})",
                jump.builtin, jump.target, jump.spec
            ));
        }
    }
    Ok(())
}

/// Checks our table against one `nft list table`: every chain rule by rule,
/// every set present, and the elements of every set the kernel does not fill.
pub(super) fn nftables(nf: &dyn Netfilter, table: &NftTable) -> Result<(), Error> {
    // One inet table holds both families and both hooks.
    let bad = |detail: String| Error::Verify {
        family: Family::V4,
        table: Table::Nat,
        detail: format!("nftables table {TABLE}: {detail}"),
    };
    let listing = nft::list_table(nf)?.ok_or_else(|| bad("missing".to_owned()))?;
    check_nft_table(table, &listing).map_err(bad)
}

fn check_nft_table(table: &NftTable, listing: &Listing) -> Result<(), String> {
    for (name, chain) in table.chains() {
        let rules = listing
            .chains
            .get(name)
            .ok_or_else(|| format!("chain {name} is missing"))?;
        let canonical = parse::canonical_nft_rule;
        if let Some(difference) = first_difference(name, &chain.rules, rules, canonical) {
            return Err(difference.to_string());
        }
    }
    for (name, decl, _) in table.sets() {
        let found = listing
            .sets
            .get(name)
            .ok_or_else(|| format!("set {name} is missing"))?;
        if !decl.dynamic {
            check_elements(name, table.elements_of(name), found)?;
        }
    }
    Ok(())
}

/// Compares a set's elements regardless of order (nft lists them in its own);
/// reports the first written element the kernel lacks and the first it holds
/// that was not written.
fn check_elements<'a>(
    set: &str,
    expected: impl Iterator<Item = (&'a str, &'a str)>,
    found: &[String],
) -> Result<(), String> {
    let mut unexpected: BTreeMap<String, &str> = found
        .iter()
        .map(|e| (parse::canonical_nft_element(e), e.as_str()))
        .collect();
    let mut missing = BTreeSet::new();
    for (key, value) in expected {
        let element = if value.is_empty() {
            key.to_owned()
        } else {
            format!("{key} : {value}")
        };
        if unexpected
            .remove(&parse::canonical_nft_element(&element))
            .is_none()
        {
            missing.insert(element);
        }
    }
    let expected = missing.first().map(|e| format!("element {e:?}"));
    let found = unexpected.values().next().map(|e| format!("element {e:?}"));
    if expected.is_none() && found.is_none() {
        return Ok(());
    }
    let none = || "none".to_owned();
    Err(format!(
        "set {set}: expected {}, found {}",
        expected.unwrap_or_else(none),
        found.unwrap_or_else(none)
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::netfilter::Ran;
    use super::super::netfilter::fake::FakeNetfilter;
    use super::super::tests::{data_plane, web};
    use super::super::{AppliedRules, Backend};
    use super::*;

    fn rules(text: &[&str]) -> Vec<String> {
        text.iter().map(|r| (*r).to_owned()).collect()
    }

    #[test]
    fn the_first_differing_rule_is_named_with_both_texts() {
        let written = rules(&[
            "-j PPX-A",
            "-m tcp -p tcp -j DNAT --to-destination 10.0.0.1:80",
        ]);
        let canonical = parse::canonical_iptables_rule;
        let same = [
            "-j PPX-A",
            "-p tcp -m tcp -j DNAT --to-destination 10.0.0.1:80",
        ];
        assert_eq!(first_difference("PPX-X", &written, &same, canonical), None);

        let edited = [
            "-j PPX-A",
            "-p tcp -m tcp -j DNAT --to-destination 10.0.0.1:81",
        ];
        let difference = first_difference("PPX-X", &written, &edited, canonical)
            .expect("an edited rule differs");
        assert_eq!(difference.position, 2);
        assert_eq!(
            difference.to_string(),
            "chain PPX-X rule 2: expected \"-m tcp -p tcp -j DNAT --to-destination 10.0.0.1:80\", \
             found \"-p tcp -m tcp -j DNAT --to-destination 10.0.0.1:81\""
        );

        let shorter = ["-j PPX-A"];
        let difference = first_difference("PPX-X", &written, &shorter, canonical)
            .expect("a missing rule differs");
        assert_eq!(difference.found, None);
        assert!(difference.to_string().ends_with("found no rule"));
    }

    #[test]
    fn elements_compare_regardless_of_order_and_name_what_differs() {
        let written = [
            ("10.0.0.1 . tcp . 80", "goto a"),
            ("10.0.0.2 . tcp . 80", "goto b"),
        ];
        let listed = [
            "10.0.0.2 . tcp . 80 counter packets 1 bytes 60 : goto b".to_owned(),
            "10.0.0.1 . tcp . 80 counter packets 0 bytes 0 : goto a".to_owned(),
        ];
        assert_eq!(
            check_elements("services4", written.into_iter(), &listed),
            Ok(())
        );

        let changed = [listed[0].clone(), "10.0.0.1 . tcp . 80 : goto c".to_owned()];
        let error = check_elements("services4", written.into_iter(), &changed)
            .expect_err("a changed verdict differs");
        assert_eq!(
            error,
            "set services4: expected element \"10.0.0.1 . tcp . 80 : goto a\", found element \"10.0.0.1 . tcp . 80 : goto c\""
        );
    }

    /// `iptables-save -t <table>` of a kernel holding `rules` with `edit`
    /// applied to each rule, in iptables-save's own spelling of our rules.
    fn save_dump(
        table: Table,
        rules: &planproxy_render::TableRules,
        edit: &dyn Fn(&str) -> String,
    ) -> String {
        let mut dump = format!("*{table}\n");
        for jump in &rules.jumps {
            dump.push_str(&format!(":{} ACCEPT [0:0]\n", jump.builtin));
        }
        for name in rules.chains.keys() {
            dump.push_str(&format!(":{name} - [0:0]\n"));
        }
        for jump in &rules.jumps {
            dump.push_str(&format!("-A {} {}\n", jump.builtin, edit(&jump.spec)));
        }
        for (name, chain) in &rules.chains {
            for rule in &chain.rules {
                let saved = edit(rule).replace("-m tcp -p tcp", "-p tcp -m tcp");
                dump.push_str(&format!("-A {name} {saved}\n"));
            }
        }
        dump.push_str("COMMIT\n");
        dump
    }

    /// Makes the fake kernel report `rule_set` with `edit` applied.
    fn kernel_holds(
        nf: &FakeNetfilter,
        rule_set: &RuleSet,
        edit: impl Fn(&str) -> String + Send + Sync + 'static,
    ) {
        let rules = rule_set.families[&Family::V4].clone();
        nf.reply(move |call| {
            let table = match call.args.as_slice() {
                [t, name] if call.program == "iptables-nft-save" && t == "-t" => Table::ALL
                    .into_iter()
                    .find(|table| table.as_str() == name)?,
                _ => return None,
            };
            Some(Ran {
                success: true,
                code: Some(0),
                stdout: save_dump(table, rules.table(table), &edit),
                stderr: String::new(),
            })
        });
    }

    #[test]
    fn an_iptables_rule_edited_in_place_fails_verify_naming_its_chain_and_both_texts() {
        let nf = Arc::new(FakeNetfilter::default());
        let mut dp = data_plane(Backend::IptablesNft, &nf);
        dp.sync(&web(&["10.244.1.5", "10.244.1.6"]), false)
            .expect("the sync");
        let Some(AppliedRules::Iptables(rule_set)) = dp.applied() else {
            panic!("an iptables sync keeps its rule set");
        };
        let rule_set = rule_set.clone();
        kernel_holds(&nf, &rule_set, str::to_owned);
        dp.verify()
            .expect("the kernel holds every rule, in its own spelling");

        // One DNAT port changed: every chain keeps its number of rules.
        kernel_holds(&nf, &rule_set, |rule| {
            rule.replace("10.244.1.6:8080", "10.244.1.6:9090")
        });
        let err = dp.verify().expect_err("the edited rule is caught");
        let Error::Verify { table, detail, .. } = &err else {
            panic!("expected a verify error, got {err}");
        };
        assert_eq!(*table, Table::Nat);
        let chain = rule_set.families[&Family::V4]
            .nat
            .chains
            .iter()
            .find(|(_, c)| c.rules.iter().any(|r| r.contains("10.244.1.6:8080")))
            .map(|(name, _)| name.clone())
            .expect("a chain DNATs to the endpoint");
        assert!(
            detail.starts_with(&format!("chain {chain} rule ")),
            "{detail}"
        );
        assert!(
            detail.contains("10.244.1.6:8080") && detail.contains("10.244.1.6:9090"),
            "{detail}"
        );

        // A jump whose comment someone changed is not ours any more.
        kernel_holds(&nf, &rule_set, |rule| {
            rule.replace("planproxy service portals", "portals")
        });
        let err = dp.verify().expect_err("our jump is gone");
        assert!(
            err.to_string()
                .contains("jump from FORWARD to PPX-SERVICES is missing"),
            "{err}"
        );
    }

    /// `nft list table inet planproxy` of a kernel holding `table` with `edit`
    /// applied to each rule and element line.
    fn nft_listing(table: &NftTable, edit: &dyn Fn(&str) -> String) -> String {
        let mut out = format!("table inet {} {{\n", planproxy_render::nft::TABLE);
        for (name, decl, _) in table.sets() {
            out.push_str(&format!(
                "\t{} {name} {{\n\t\ttype whatever\n",
                decl.keyword
            ));
            let elements: Vec<String> = table
                .elements_of(name)
                .map(|(k, v)| {
                    edit(&if v.is_empty() {
                        k.to_owned()
                    } else {
                        format!("{k} : {v}")
                    })
                })
                .collect();
            if !elements.is_empty() {
                out.push_str(&format!(
                    "\t\telements = {{ {} }}\n",
                    elements.join(",\n\t\t\t     ")
                ));
            }
            out.push_str("\t}\n");
        }
        for (name, chain) in table.chains() {
            out.push_str(&format!("\tchain {name} {{\n"));
            if let Some(hook) = &chain.hook {
                out.push_str(&format!("\t\t{hook}\n"));
            }
            for rule in &chain.rules {
                out.push_str(&format!("\t\t{}\n", edit(rule)));
            }
            out.push_str("\t}\n");
        }
        out.push_str("}\n");
        out
    }

    fn nft_kernel_holds(
        nf: &FakeNetfilter,
        table: &NftTable,
        edit: impl Fn(&str) -> String + Send + Sync + 'static,
    ) {
        let listing = nft_listing(table, &edit);
        nf.reply(move |call| {
            (call.program == "nft" && call.args == ["list", "table", "inet", "planproxy"]).then(
                || Ran {
                    success: true,
                    code: Some(0),
                    stdout: listing.clone(),
                    stderr: String::new(),
                },
            )
        });
    }

    #[test]
    fn an_nftables_rule_or_element_edited_in_place_fails_verify_naming_it() {
        let nf = Arc::new(FakeNetfilter::default());
        let mut dp = data_plane(Backend::Nftables, &nf);
        // A node port takes the service off the shared fast path: it gets
        // chains of its own, with one DNAT rule per endpoint.
        let mut plan = (*web(&["10.244.1.5", "10.244.1.6"])[0]).clone();
        plan.service_ports[0].node_port = Some(30080);
        dp.sync(&[Arc::new(plan)], false).expect("the sync");
        let Some(AppliedRules::Nftables(program)) = dp.applied() else {
            panic!("an nftables sync keeps its program");
        };
        let table = program.table().clone();
        // nft's own spelling: `tcp dport` for `meta l4proto tcp th dport`, hex marks.
        let as_listed = |line: &str| {
            line.replace("meta l4proto tcp th dport", "tcp dport")
                .replace("| 0x4000", "| 0x00004000")
        };
        nft_kernel_holds(&nf, &table, as_listed);
        dp.verify()
            .expect("the kernel holds every rule and element");

        nft_kernel_holds(&nf, &table, move |line| {
            as_listed(line).replace("10.244.1.6:8080", "10.244.1.6:9090")
        });
        let err = dp.verify().expect_err("the edited rule is caught");
        let chain = table
            .chains()
            .find(|(_, c)| c.rules.iter().any(|r| r.contains("10.244.1.6:8080")))
            .map(|(name, _)| name.to_owned())
            .expect("a chain DNATs to the endpoint");
        let detail = err.to_string();
        assert!(detail.contains(&format!("chain {chain} rule ")), "{detail}");
        assert!(
            detail.contains("10.244.1.6:8080") && detail.contains("10.244.1.6:9090"),
            "{detail}"
        );

        // The dispatch element of the node port now leads elsewhere.
        nft_kernel_holds(&nf, &table, move |line| {
            as_listed(line).replace("tcp . 30080 : goto", "tcp . 30081 : goto")
        });
        let err = dp.verify().expect_err("the edited element is caught");
        assert!(
            err.to_string()
                .contains("set nodeports4: expected element \"tcp . 30080"),
            "{err}"
        );
    }
}
