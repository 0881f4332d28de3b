//! planproxy installed the way users install it: the real `helm install` of
//! `charts/planproxy` (CRDs, RBAC, the admission policy, the default
//! ProxyPolicy, the workloads). No kubelet runs the chart's Deployment and
//! DaemonSet, so the harness plays kubelet for them: it reads each workload's
//! pod template back from the API server, creates the Pod object on its node,
//! marks it running, asks for a service-account token bound to that Pod, and
//! runs the binary with exactly the template's arguments and environment.

use std::path::{Path, PathBuf};

use planproxy_control_plane::ControlPlane;
use planproxy_netns::Netns;
use serde_json::{Value, json};

use crate::error::{E2eError, Result};

/// The Helm release name.
pub const RELEASE: &str = "planproxy";
/// The namespace the chart is installed into.
pub const NAMESPACE: &str = "kube-system";
/// The chart's controller Deployment.
pub const CONTROLLER_DEPLOYMENT: &str = "planproxy-controller";
/// The chart's agent DaemonSet.
pub const AGENT_DAEMONSET: &str = "planproxy-agent";

/// The chart's directory.
pub fn chart_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/planproxy")
}

/// Runs the pinned `helm` in `ns` as the cluster administrator; its output.
pub fn helm(ns: &Netns, plane: &ControlPlane, args: &[String]) -> Result<String> {
    let bin = planproxy_control_plane::binaries_dir()
        .map_err(|e| E2eError::ApiServer(e.to_string()))?
        .join("helm");
    let cache = plane.dir().join("helm");
    let mut command = ns.command(&[bin.display().to_string()]);
    command
        .args(args)
        .env("KUBECONFIG", plane.admin_kubeconfig_path())
        .env("HELM_CACHE_HOME", cache.join("cache"))
        .env("HELM_CONFIG_HOME", cache.join("config"))
        .env("HELM_DATA_HOME", cache.join("data"));
    let output = command
        .output()
        .map_err(|e| E2eError::io("running helm", e))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(E2eError::Invalid(format!(
            "helm {} failed ({}):\n{text}",
            args.join(" "),
            output.status
        )))
    }
}

/// `helm install planproxy charts/planproxy -n kube-system` with `values`
/// (`--set`-style `key=value`) and `json_values` (`--set-json`).
pub fn install(
    ns: &Netns,
    plane: &ControlPlane,
    values: &[String],
    json_values: &[String],
) -> Result<()> {
    let mut args = vec![
        "install".to_owned(),
        RELEASE.to_owned(),
        chart_path().display().to_string(),
        "--namespace".to_owned(),
        NAMESPACE.to_owned(),
    ];
    for value in values {
        args.push("--set".into());
        args.push(value.clone());
    }
    for value in json_values {
        args.push("--set-json".into());
        args.push(value.clone());
    }
    helm(ns, plane, &args).map(|_| ())
}

/// How the chart runs one workload's container.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The pod template as the API server holds it.
    pub template: Value,
    pub service_account: String,
    /// `command` then `args` of the first container.
    pub argv: Vec<String>,
    /// The container's `env`, as given (values or downward-API references).
    pub env: Vec<Value>,
}

impl Launch {
    /// Reads `kind`/`name` (Deployment or DaemonSet) in the release namespace.
    pub fn read(plane: &ControlPlane, kind: &str, name: &str) -> Result<Launch> {
        let workload = plane
            .get("apps/v1", kind, Some(NAMESPACE), name)
            .ok_or_else(|| E2eError::Invalid(format!("the chart installed no {kind} {name}")))?;
        let template = workload["spec"]["template"].clone();
        let container = &template["spec"]["containers"][0];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        let mut argv = strings(&container["command"]);
        argv.extend(strings(&container["args"]));
        if argv.is_empty() {
            return Err(E2eError::Invalid(format!("{kind} {name} has no command")));
        }
        Ok(Launch {
            service_account: template["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                .to_owned(),
            env: container["env"].as_array().cloned().unwrap_or_default(),
            argv,
            template,
        })
    }

    /// The environment of the container in `pod` on `node`, downward-API
    /// references resolved as the kubelet would.
    pub fn environment(&self, pod: &str, node: &str) -> Result<Vec<(String, String)>> {
        self.env
            .iter()
            .map(|var| {
                let name = var["name"].as_str().unwrap_or_default().to_owned();
                if let Some(value) = var["value"].as_str() {
                    return Ok((name, value.to_owned()));
                }
                let field = var
                    .pointer("/valueFrom/fieldRef/fieldPath")
                    .and_then(Value::as_str);
                let value = match field {
                    Some("spec.nodeName") => node,
                    Some("metadata.name") => pod,
                    Some("metadata.namespace") => NAMESPACE,
                    _ => {
                        return Err(E2eError::Invalid(format!(
                            "the harness cannot resolve env {var} of the chart's pods"
                        )));
                    }
                };
                Ok((name, value.to_owned()))
            })
            .collect()
    }

    /// The Pod object the workload's controller and the scheduler would have
    /// made, bound to `node`, and marked running (as its kubelet would) with
    /// `pod_ip`. Returns its (name, uid).
    pub fn create_pod(
        &self,
        plane: &ControlPlane,
        pod: &str,
        node: &str,
        pod_ip: &str,
        host_ip: &str,
    ) -> Result<(String, String)> {
        let mut spec = self.template["spec"].clone();
        spec["nodeName"] = json!(node);
        let object = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod,
                "namespace": NAMESPACE,
                "labels": self.template["metadata"]["labels"],
            },
            "spec": spec,
        });
        let created = plane
            .create(object)
            .map_err(|e| E2eError::ApiServer(format!("creating pod {pod}: {e}")))?;
        let uid = created["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        crate::objects::mark_pod_running(plane, NAMESPACE, pod, &[pod_ip], host_ip, true)?;
        Ok((pod.to_owned(), uid))
    }
}

/// Writes a kubeconfig for the service account of `launch`, with a token
/// bound to `pod`, to `dir/<pod>.kubeconfig`.
pub fn pod_kubeconfig(
    plane: &ControlPlane,
    launch: &Launch,
    pod: (&str, &str),
    dir: &Path,
) -> Result<PathBuf> {
    let token = plane
        .service_account_token(NAMESPACE, &launch.service_account, Some(pod))
        .map_err(|e| E2eError::ApiServer(format!("a token for {}: {e}", pod.0)))?;
    let user = format!(
        "system:serviceaccount:{NAMESPACE}:{}",
        launch.service_account
    );
    let path = dir.join(format!("{}.kubeconfig", pod.0));
    std::fs::write(&path, plane.kubeconfig_with_token(&user, &token))
        .map_err(|e| E2eError::io(format!("writing {}", path.display()), e))?;
    Ok(path)
}
