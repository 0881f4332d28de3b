//! API-level operations on policies and plans, the same against the
//! namespace cluster and a real one.

use std::time::Duration;

use serde_json::Value;

use crate::error::{E2eError, Result};

/// A kube client and the names of the nodes that must have plans.
#[derive(Clone)]
pub struct Control {
    pub client: kube::Client,
    pub nodes: Vec<String>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// Creates or replaces a ProxyPolicy from its JSON form (server-side
    /// apply, so a test can write invalid values the typed struct would not
    /// allow).
    pub async fn apply_policy(&self, policy: Value) -> Result<()> {
        let name = policy
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .ok_or_else(|| E2eError::Invalid("a ProxyPolicy needs metadata.name".into()))?
            .to_owned();
        let api: kube::Api<planproxy_crds::ProxyPolicy> = kube::Api::all(self.client.clone());
        api.patch(
            &name,
            &kube::api::PatchParams::apply("e2e-test").force(),
            &kube::api::Patch::Apply(&policy),
        )
        .await?;
        Ok(())
    }

    /// Every ProxyPlan, as `kubectl get proxyplans` shows them.
    pub async fn plans(&self) -> Result<Vec<planproxy_crds::ProxyPlan>> {
        let api: kube::Api<planproxy_crds::ProxyPlan> = kube::Api::all(self.client.clone());
        Ok(api.list(&kube::api::ListParams::default()).await?.items)
    }

    /// A ProxyPolicy as the API server holds it (status included).
    pub async fn policy(&self, name: &str) -> Result<planproxy_crds::ProxyPolicy> {
        let api: kube::Api<planproxy_crds::ProxyPolicy> = kube::Api::all(self.client.clone());
        Ok(api.get(name).await?)
    }

    /// Deletes a ProxyPolicy.
    pub async fn delete_policy(&self, name: &str) -> Result<()> {
        let api: kube::Api<planproxy_crds::ProxyPolicy> = kube::Api::all(self.client.clone());
        api.delete(name, &kube::api::DeleteParams::default())
            .await?;
        Ok(())
    }

    /// Waits until the ProxyPlans pass `check` (given every plan), e.g. a
    /// service being in one node's plans and not in another's.
    pub async fn wait_plans(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[planproxy_crds::ProxyPlan]) -> Result<(), String>,
    ) -> Result<Vec<planproxy_crds::ProxyPlan>> {
        let nodes = self.nodes.clone();
        crate::wait::eventually(what, timeout, || async {
            let plans = self.plans().await.map_err(|e| e.to_string())?;
            crate::plans::all_programmed(&plans, &nodes)?;
            check(&plans)?;
            Ok(plans)
        })
        .await
    }

    /// Waits until the controller has judged the current generation of a
    /// ProxyPolicy and returns it with its `Accepted` condition.
    pub async fn wait_policy_judged(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<(
        planproxy_crds::ProxyPolicy,
        planproxy_crds::condition::Condition,
    )> {
        crate::wait::eventually(&format!("ProxyPolicy {name} judged"), timeout, || async {
            let policy = self.policy(name).await.map_err(|e| e.to_string())?;
            let status = policy.status.clone().unwrap_or_default();
            let accepted = planproxy_crds::condition::find(
                &status.conditions,
                planproxy_crds::condition::ACCEPTED,
            )
            .cloned()
            .ok_or_else(|| format!("{name} has no Accepted condition"))?;
            let current = policy.metadata.generation;
            if status.observed_generation != current {
                return Err(format!(
                    "{name} observed generation {:?}, current {current:?}",
                    status.observed_generation
                ));
            }
            Ok((policy, accepted))
        })
        .await
    }

    /// Waits until every node has a plan and every plan reports
    /// `Programmed=True` for its current generation with
    /// `status.appliedHash` equal to its `planproxy.dev/spec-hash`
    /// annotation; returns the plans. With `service`, also waits until that
    /// service (`namespace/name`) is in (`present`) or out of every node's
    /// plans.
    pub async fn wait_programmed(
        &self,
        service: Option<(&str, bool)>,
        timeout: Duration,
    ) -> Result<Vec<planproxy_crds::ProxyPlan>> {
        let nodes = self.nodes.clone();
        crate::wait::eventually("every node's plans programmed", timeout, || async {
            let plans = self.plans().await.map_err(|e| e.to_string())?;
            crate::plans::all_programmed(&plans, &nodes)?;
            if let Some((service, present)) = service {
                crate::plans::service_presence(&plans, &nodes, service, present)?;
            }
            Ok(plans)
        })
        .await
    }
}
