"""Tests of the planproxy Helm chart.

The chart is linted and rendered offline with Helm's own Go SDK (helm-python-sdk
embeds it; no helm binary or cluster is needed), every rendered object is validated
against the Kubernetes 1.34 OpenAPI schemas (kubernetes-validate) or, for our own
kinds, against the chart's CRD schema, and the objects are checked for the
behaviour the chart promises: least-privilege RBAC derived from api_calls.yaml,
hardened pods, an uninstall that cleans every node, and values that fail early.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterable
from typing import Any

import celpy
import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

import values_schema

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHART = REPO / "charts" / "planproxy"
KUBE_VERSION = "1.34.0"
RELEASE = "planproxy"
NAMESPACE = "kube-system"

# Values a user changes most: every optional object on, ports moved off kube-proxy's,
# the API server address set, a real default policy.
CUSTOM_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/planproxy", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "k8sServiceHost": "172.18.0.2",
    "k8sServicePort": 6443,
    "commonLabels": {"team": "net"},
    "controller": {
        "replicas": 3,
        "coalesceWindow": "250ms",
        "maxWritesPerSecond": 20,
        "logFormat": "json",
        "logLevel": "info,planproxy_controller=debug",
        "podAnnotations": {"example.com/scrape": "true"},
        "extraArgs": ["--list-page-size=50"],
    },
    "agent": {
        "layout": "flat",
        "statusMinInterval": "2s",
        "healthz": {"bindAddress": "0.0.0.0", "port": 20256},
        "metrics": {"bindAddress": "0.0.0.0", "port": 20249},
        "logFormat": "json",
        "nodeSelector": {"kubernetes.io/os": "linux", "example.com/proxy": "planproxy"},
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
    },
    "admissionPolicy": {"validationActions": ["Deny", "Audit"]},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "defaultPolicy": {"spec": yaml.safe_load((REPO / "examples/policies/defaults.yaml").read_text())["spec"]},
}

# Everything optional switched off.
MINIMAL_VALUES: dict[str, Any] = {
    "controller": {"replicas": 1, "leaderElection": {"enabled": False}},
    "admissionPolicy": {"enabled": False},
    "cleanup": {"enabled": False},
    "defaultPolicy": {"enabled": False},
}

VALUE_SETS = {"default": {}, "custom": CUSTOM_VALUES, "minimal": MINIMAL_VALUES}


def render_manifests(values: dict[str, Any] | None = None, *, release: str = RELEASE) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=release, namespace=NAMESPACE, is_install=True)


def render(values: dict[str, Any] | None = None, *, release: str = RELEASE) -> list[dict[str, Any]]:
    """The objects the chart installs (templates only; crds/ is tested separately)."""
    objects = []
    for path, text in sorted(render_manifests(values, release=release).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def select(objects: Iterable[dict[str, Any]], kind: str, component: str | None = None) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and (component is None or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)
    ]


def one(objects: Iterable[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = select(objects, kind, component)
    assert len(found) == 1, f"expected one {kind} of component {component}, found {len(found)}"
    return found[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    spec = workload["spec"]["template"]["spec"]
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"{workload['metadata']['name']} has no container {name}")


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env") or []}


def flags_of(c: dict[str, Any]) -> dict[str, str]:
    """`--name=value` arguments as a dict."""
    flags = {}
    for arg in c["args"]:
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            flags[name] = value
    return flags


def hook(o: dict[str, Any]) -> dict[str, str]:
    annotations = o["metadata"].get("annotations", {})
    return {k.removeprefix("helm.sh/"): v for k, v in annotations.items() if k.startswith("helm.sh/hook")}


# --- lint and schema validation -------------------------------------------------


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_chart_lints_without_warnings(value_set: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[value_set], strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 1 is informational (e.g. "icon is recommended"); 2 and up are warnings and errors.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """JSON Schemas of our kinds, keyed by (apiVersion, kind), from the chart's CRDs."""
    schemas = {}
    for doc in yaml.safe_load_all((CHART / "crds" / "planproxy.dev.yaml").read_text()):
        if not doc:
            continue
        group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
        for version in doc["spec"]["versions"]:
            schema = values_schema.openapi_to_json_schema(version["schema"]["openAPIV3Schema"], closed=True)
            # The API server supplies these for every kind; the CRD schema omits them.
            schema["properties"].update(
                apiVersion={"const": f"{group}/{version['name']}"},
                kind={"const": kind},
                metadata={"type": "object", "required": ["name"]},
            )
            schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


# Kinds whose schema neither kubernetes-validate nor our CRDs hold. Only these may
# go unvalidated; their shape is checked by dedicated tests below.
OPERATOR_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_rendered_object_validates_against_kubernetes_1_34(value_set: str) -> None:
    objects = render(VALUE_SETS[value_set])
    ours = crd_schemas()
    validated = 0
    for o in objects:
        key = (o["apiVersion"], o["kind"])
        name = f"{o['kind']}/{o['metadata']['name']}"
        if key in ours:
            jsonschema.validate(o, ours[key])
        elif key in OPERATOR_KINDS:
            continue
        else:
            try:
                kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name} is invalid at {'.'.join(map(str, e.path))}: {e.message}")
        validated += 1
    assert validated >= 10, f"only {validated} objects validated"


def test_the_crds_are_valid_custom_resource_definitions() -> None:
    docs = [d for d in yaml.safe_load_all((CHART / "crds" / "planproxy.dev.yaml").read_text()) if d]
    assert {d["spec"]["names"]["kind"] for d in docs} == {"ProxyPolicy", "ProxyPlan"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_values_schema_is_generated_from_the_proxypolicy_crd() -> None:
    assert (CHART / "values.schema.json").read_text() == values_schema.render(), (
        "values.schema.json is stale: run `python3 charts/tests/values_schema.py`"
    )


def test_duration_values_take_the_binaries_duration_syntax() -> None:
    rust = (REPO / "crds" / "src" / "duration.rs").read_text()
    pattern = re.search(r'pub const PATTERN: &str = r"([^"]+)";', rust)
    assert pattern, "crds/src/duration.rs no longer declares PATTERN"
    assert values_schema.DURATION["pattern"] == pattern.group(1)


def test_default_values_satisfy_the_schema() -> None:
    with helm.Chart.load(CHART) as chart:
        for values in VALUE_SETS.values():
            chart.validate_schema(chart.merge_values(values))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"controller": {"replicas": "two"}}, "/controller/replicas"),
        ({"controller": {"replicas": 0}}, "/controller/replicas"),
        ({"agent": {"layout": "nftables"}}, "/agent/layout"),
        ({"agent": {"healthz": {"port": 70000}}}, "/agent/healthz/port"),
        ({"controller": {"coalesceWindow": "1 second"}}, "/controller/coalesceWindow"),
        ({"controller": {"logFormat": "yaml"}}, "/controller/logFormat"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"contoller": {"replicas": 2}}, "contoller"),
        ({"agent": {"extraArgs": ["layout=flat"]}}, "/agent/extraArgs/0"),
        ({"admissionPolicy": {"validationActions": ["Allow"]}}, "/admissionPolicy/validationActions/0"),
        ({"defaultPolicy": {"spec": {"priority": 5000}}}, "/defaultPolicy/spec/priority"),
        ({"defaultPolicy": {"spec": {"noEndpointsAction": "Ignore"}}}, "/defaultPolicy/spec/noEndpointsAction"),
        ({"defaultPolicy": {"spec": {"masquerade": {"masqueradeBits": 14}}}}, "masqueradeBits"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(values: dict[str, Any], message: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
            chart.validate_schema(values)
    # An install renders with the same check.
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render_manifests(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"controller": {"leaderElection": {"enabled": False}}}, "needs controller.replicas=1 (got 2)"),
        ({"k8sServicePort": 6443}, "k8sServiceHost is empty"),
        ({"k8sServiceHost": "10.0.0.1"}, "k8sServicePort is required"),
        ({"agent": {"metrics": {"bindAddress": "0.0.0.0", "port": 10256}}}, "both 10256"),
        ({"agent": {"serviceAccount": {"create": False}}}, "agent.serviceAccount.name is required"),
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render_manifests(values)


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_example_policies_are_accepted_as_the_default_policy(path: pathlib.Path) -> None:
    spec = yaml.safe_load(path.read_text())["spec"]
    objects = render({"defaultPolicy": {"name": "from-example", "spec": spec}})
    policy = one(objects, "ProxyPolicy")
    assert policy["metadata"]["name"] == "from-example"
    assert policy["spec"] == spec


# --- RBAC ------------------------------------------------------------------------


def api_calls() -> list[dict[str, Any]]:
    return yaml.safe_load((HERE / "api_calls.yaml").read_text())["calls"]


def granted_permissions(objects: list[dict[str, Any]]) -> set[tuple[str, ...]]:
    """(component, scope, group, resource[/subresource], resourceName, verb) for every
    permission a component's service account gets from the rendered RBAC."""
    components = {}
    for kind in ("Deployment", "DaemonSet", "Job"):
        for w in select(objects, kind):
            sa = w["spec"]["template"]["spec"]["serviceAccountName"]
            components[sa] = w["metadata"]["labels"]["app.kubernetes.io/component"]
    roles = {(r["kind"], r["metadata"]["name"]): r for r in objects if r["kind"] in ("ClusterRole", "Role")}
    granted = set()
    for binding in (b for b in objects if b["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        role = roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]
        scope = "cluster" if role["kind"] == "ClusterRole" else "namespace"
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NAMESPACE
            component = components[subject["name"]]
            for rule in role["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for name in rule.get("resourceNames", [""]):
                            for verb in rule["verbs"]:
                                granted.add((component, scope, group, resource, name, verb))
    return granted


def expected_permissions(objects: list[dict[str, Any]]) -> set[tuple[str, ...]]:
    # resourceName `agent` in api_calls.yaml names the agent's DaemonSet.
    names = {"agent": one(objects, "DaemonSet", "agent")["metadata"]["name"]}
    expected = set()
    for call in api_calls():
        resource = call["resource"] + (f"/{call['subresource']}" if call.get("subresource") else "")
        name = names.get(call.get("resourceName", ""), "")
        for verb in call["verbs"]:
            expected.add((call["component"], call["scope"], call["group"], resource, name, verb))
    return expected


@pytest.mark.parametrize("value_set", ["default", "custom"])
def test_rbac_allows_every_api_call_the_binaries_make_and_nothing_more(value_set: str) -> None:
    objects = render(VALUE_SETS[value_set])
    granted, expected = granted_permissions(objects), expected_permissions(objects)
    assert sorted(expected - granted) == [], "API calls the RBAC does not allow"
    assert sorted(granted - expected) == [], "permissions no API call uses"


def test_no_rbac_rule_uses_wildcards() -> None:
    for role in (o for o in render(CUSTOM_VALUES) if o["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{role['metadata']['name']}: wildcard in {field}"


def test_agent_may_only_read_plans_and_write_their_status() -> None:
    agent = {p for p in granted_permissions(render()) if p[0] == "agent"}
    assert {(group, resource) for _, _, group, resource, _, _ in agent} == {
        ("planproxy.dev", "proxyplans"),
        ("planproxy.dev", "proxyplans/status"),
    }
    writes = {(resource, verb) for _, _, _, resource, _, verb in agent if verb not in ("get", "list", "watch")}
    assert writes and all(resource == "proxyplans/status" for resource, _ in writes)


def test_leases_are_granted_in_the_release_namespace_only() -> None:
    objects = render()
    leases = [p for p in granted_permissions(objects) if p[3] == "leases"]
    assert leases and all(scope == "namespace" for _, scope, *_ in leases)
    role = next(r for r in select(objects, "Role") if r["rules"][0]["resources"] == ["leases"])
    assert role["metadata"]["namespace"] == NAMESPACE


def test_rbac_create_false_renders_no_roles() -> None:
    objects = render({"rbac": {"create": False}})
    assert [o["kind"] for o in objects if o["kind"].endswith(("Role", "RoleBinding"))] == []
    # The service accounts stay, for the permissions granted by other means.
    assert len(select(objects, "ServiceAccount")) == 3


def source_flags(crate: str) -> set[str]:
    """Long flags the clap structs under a crate's src/ declare (`#[arg(long ...)]`)."""
    flags = set()
    pattern = re.compile(r"#\[arg\(([^\]]*?)\)\]\s*(?:#\[[^\]]*\]\s*|///[^\n]*\n\s*)*pub\s+(\w+)\s*:", re.S)
    for path in (REPO / crate / "src").rglob("*.rs"):
        for attrs, field in pattern.findall(path.read_text()):
            if not re.search(r"\blong\b", attrs):
                continue
            explicit = re.search(r'\blong\s*=\s*"([^"]+)"', attrs)
            flags.add("--" + (explicit.group(1) if explicit else field.replace("_", "-")))
    return flags


def source_subcommands(crate: str) -> set[str]:
    """Subcommands of a binary: the variants of `enum Command` in its main.rs."""
    main = (REPO / crate / "src" / "main.rs").read_text()
    body = re.search(r"enum Command \{(.*?)\n\}", main, re.S)
    assert body, f"no `enum Command` in {crate}/src/main.rs"
    variants = re.findall(r"^    ([A-Z]\w*)\b", body.group(1), re.M)
    return {re.sub(r"(?<!^)([A-Z])", r"-\1", v).lower() for v in variants}


@pytest.mark.parametrize(("component", "crate"), [("controller", "controller"), ("agent", "node-agent")])
def test_every_flag_the_chart_passes_exists_in_the_binary(component: str, crate: str) -> None:
    known = source_flags(crate)
    assert "--log-format" in known, f"found no clap flags under {crate}/src"
    objects = render(CUSTOM_VALUES)
    workload = one(objects, "Deployment" if component == "controller" else "DaemonSet", component)
    c = container(workload, component)
    assert c["args"][0] in source_subcommands(crate)
    passed = set(flags_of(c))
    assert sorted(passed - known) == []


def test_the_uninstall_hook_runs_an_existing_agent_subcommand() -> None:
    init = container(one(render(), "DaemonSet", "cleanup"), "cleanup")
    assert init["args"][0] in source_subcommands("node-agent")


# --- workloads -------------------------------------------------------------------


def test_controller_runs_two_leader_elected_hardened_replicas() -> None:
    objects = render()
    deployment = one(objects, "Deployment", "controller")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = container(deployment, "controller")
    assert c["command"] == ["planproxy-controller"] and c["args"][0] == "run"
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]

    flags = flags_of(c)
    assert flags["--leader-elect"] == "true"
    assert flags["--leader-election-namespace"] == NAMESPACE
    assert flags["--leader-election-name"] == "planproxy-controller"
    assert flags["--admin-bind-address"] == "0.0.0.0:9090"
    env = env_of(c)
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}

    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ports[c["livenessProbe"]["httpGet"]["port"]] == 9090
    assert ports[c["readinessProbe"]["httpGet"]["port"]] == 9090

    pdb = one(objects, "PodDisruptionBudget", "controller")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_a_single_controller_without_leader_election_has_no_disruption_budget() -> None:
    objects = render(MINIMAL_VALUES)
    deployment = one(objects, "Deployment", "controller")
    assert deployment["spec"]["replicas"] == 1
    assert flags_of(container(deployment, "controller"))["--leader-elect"] == "false"
    assert select(objects, "PodDisruptionBudget") == []


def test_agent_runs_on_every_node_with_only_net_admin_and_net_raw() -> None:
    daemonset = one(render(), "DaemonSet", "agent")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert daemonset["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}

    c = container(daemonset, "agent")
    assert c["command"] == ["planproxy-agent"] and c["args"][0] == "run"
    security = c["securityContext"]
    assert security.get("privileged") is not True
    assert security["allowPrivilegeEscalation"] is False
    assert sorted(security["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert env_of(c)["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    lock = volumes[mounts["/run/xtables.lock"]["name"]]
    assert lock["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert mounts["/run/xtables.lock"].get("readOnly") is not True
    modules = volumes[mounts["/lib/modules"]["name"]]
    assert modules["hostPath"]["path"] == "/lib/modules" and mounts["/lib/modules"]["readOnly"] is True

    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert (c["livenessProbe"]["httpGet"]["path"], ports[c["livenessProbe"]["httpGet"]["port"]]) == ("/livez", 10256)
    assert (c["readinessProbe"]["httpGet"]["path"], ports[c["readinessProbe"]["httpGet"]["port"]]) == ("/healthz", 10256)


def test_agent_ports_move_off_kube_proxys_and_probes_follow() -> None:
    objects = render(CUSTOM_VALUES)
    c = container(one(objects, "DaemonSet", "agent"), "agent")
    flags = flags_of(c)
    assert flags["--healthz-bind-address"] == "0.0.0.0:20256"
    assert flags["--metrics-bind-address"] == "0.0.0.0:20249"
    assert flags["--layout"] == "flat"
    assert flags["--status-min-interval"] == "2s"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports[c["livenessProbe"]["httpGet"]["port"]] == 20256
    service = one(objects, "Service", "agent")
    assert service["spec"]["ports"][0]["port"] == 20249


def test_agent_endpoints_on_one_address_are_probed_there() -> None:
    values = {"agent": {"healthz": {"bindAddress": "fd00::1", "port": 10256}}}
    c = container(one(render(values), "DaemonSet", "agent"), "agent")
    assert flags_of(c)["--healthz-bind-address"] == "[fd00::1]:10256"
    assert c["livenessProbe"]["httpGet"]["host"] == "fd00::1"
    assert c["readinessProbe"]["httpGet"]["host"] == "fd00::1"


def test_agent_metrics_on_loopback_get_no_service_or_service_monitor() -> None:
    objects = render({"serviceMonitor": {"enabled": True}})
    assert select(objects, "Service", "agent") == []
    assert [m["metadata"]["labels"]["app.kubernetes.io/component"] for m in select(objects, "ServiceMonitor")] == [
        "controller"
    ]


def test_service_monitors_select_the_metrics_services() -> None:
    objects = render(CUSTOM_VALUES)
    monitors = select(objects, "ServiceMonitor")
    assert len(monitors) == 2
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [s for s in select(objects, "Service") if selector.items() <= s["metadata"]["labels"].items()]
        assert len(services) == 1
        port_names = {p["name"] for p in services[0]["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert select(render(), "ServiceMonitor") == []


def test_image_tag_defaults_to_the_app_version() -> None:
    with helm.Chart.load(CHART) as chart:
        app_version = chart.metadata["appVersion"]
    images = {c["image"] for c in pod_containers(render()) if c["name"] != "kubectl"}
    assert images == {f"planproxy:{app_version}"}
    digest = "sha256:" + "ab" * 32
    images = {c["image"] for c in pod_containers(render({"image": {"digest": digest}})) if c["name"] != "kubectl"}
    assert images == {f"planproxy@{digest}"}


def pod_containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for kind in ("Deployment", "DaemonSet", "Job"):
        for w in select(objects, kind):
            spec = w["spec"]["template"]["spec"]
            out.extend(spec.get("initContainers", []) + spec["containers"])
    return out


def test_api_server_address_reaches_every_pod_that_talks_to_it() -> None:
    for c in pod_containers(render(CUSTOM_VALUES)):
        if c["name"] in ("cleanup", "done"):
            continue  # the node cleanup uses no API
        env = env_of(c)
        assert env["KUBERNETES_SERVICE_HOST"] == "172.18.0.2", c["name"]
        assert env["KUBERNETES_SERVICE_PORT"] == "6443", c["name"]
    assert all("KUBERNETES_SERVICE_HOST" not in env_of(c) for c in pod_containers(render()))


def test_pod_scheduling_values_reach_the_pods() -> None:
    objects = render(CUSTOM_VALUES)
    controller = one(objects, "Deployment", "controller")["spec"]["template"]
    assert controller["metadata"]["annotations"] == {"example.com/scrape": "true"}
    assert controller["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    agent = one(objects, "DaemonSet", "agent")["spec"]["template"]["spec"]
    assert agent["nodeSelector"] == {"kubernetes.io/os": "linux", "example.com/proxy": "planproxy"}
    assert all(o["metadata"]["labels"]["team"] == "net" for o in objects)


# --- uninstall -------------------------------------------------------------------


def test_uninstall_stops_the_agent_then_cleans_every_node_and_waits() -> None:
    objects = render()
    hooks = [o for o in objects if hook(o)]
    assert hooks and all(hook(o)["hook"] == "pre-delete" for o in hooks)
    assert all("hook-succeeded" in hook(o)["hook-delete-policy"].split(",") for o in hooks)
    weight = {(o["kind"], o["metadata"]["name"]): int(hook(o)["hook-weight"]) for o in hooks}

    agent = one(objects, "DaemonSet", "agent")
    agent_name = agent["metadata"]["name"]
    stop = next(j for j in select(hooks, "Job") if "delete" in container(j, "kubectl")["args"])
    assert f"daemonset/{agent_name}" in container(stop, "kubectl")["args"]
    assert "--wait" in container(stop, "kubectl")["args"]

    cleanup = one(hooks, "DaemonSet", "cleanup")
    cleanup_pod = cleanup["spec"]["template"]["spec"]
    agent_pod = agent["spec"]["template"]["spec"]
    init = cleanup_pod["initContainers"][0]
    assert init["command"] == ["planproxy-agent"] and init["args"] == ["cleanup"]
    # The same nodes and the same privileges as the agent.
    assert cleanup_pod["hostNetwork"] is True
    for field in ("tolerations", "nodeSelector", "priorityClassName"):
        assert cleanup_pod.get(field) == agent_pod.get(field), field
    assert init["securityContext"] == container(agent, "agent")["securityContext"]
    assert {m["mountPath"] for m in init["volumeMounts"]} >= {"/run/xtables.lock", "/lib/modules"}

    wait = next(j for j in select(hooks, "Job") if "rollout" in container(j, "kubectl")["args"])
    assert f"daemonset/{cleanup['metadata']['name']}" in container(wait, "kubectl")["args"]

    rbac = [k for k in weight if k[0] in ("ServiceAccount", "Role", "RoleBinding")]
    assert max(weight[k] for k in rbac) < weight[("Job", stop["metadata"]["name"])]
    assert weight[("Job", stop["metadata"]["name"])] < weight[("DaemonSet", cleanup["metadata"]["name"])]
    assert weight[("DaemonSet", cleanup["metadata"]["name"])] < weight[("Job", wait["metadata"]["name"])]


def test_uninstall_cleanup_can_be_switched_off() -> None:
    assert [o for o in render(MINIMAL_VALUES) if hook(o)] == []


# --- admission policy --------------------------------------------------------------


def evaluate(expression: str, activation: dict[str, Any]) -> Any:
    env = celpy.Environment()
    program = env.program(env.compile(expression))
    return program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})


def admit(policy: dict[str, Any], username: str, extra: dict[str, list[str]] | None, plan_node: str) -> str | None:
    """Runs the policy's CEL over a status update of `plan_node`'s plan by `username`
    (with cel-python, which shares the CEL core Kubernetes uses); returns None when
    admitted (or not matched), else the denial message."""
    user: dict[str, Any] = {"username": username}
    if extra is not None:
        user["extra"] = extra
    plan = {"apiVersion": "planproxy.dev/v1alpha1", "kind": "ProxyPlan", "spec": {"nodeName": plan_node}}
    activation: dict[str, Any] = {"request": {"userInfo": user}, "object": plan, "oldObject": plan}
    spec = policy["spec"]
    if not all(evaluate(c["expression"], activation) for c in spec["matchConditions"]):
        return None
    activation["variables"] = {v["name"]: evaluate(v["expression"], activation) for v in spec["variables"]}
    for validation in spec["validations"]:
        if not evaluate(validation["expression"], activation):
            return str(evaluate(validation["messageExpression"], activation))
    return None


def test_admission_policy_lets_an_agent_write_only_its_own_nodes_plans() -> None:
    objects = render()
    policy = one(objects, "ValidatingAdmissionPolicy")
    binding = one(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rules == [
        {"apiGroups": ["planproxy.dev"], "apiVersions": ["*"], "operations": ["UPDATE"], "resources": ["proxyplans/status"]}
    ]

    agent = f"system:serviceaccount:{NAMESPACE}:{one(objects, 'ServiceAccount', 'agent')['metadata']['name']}"
    node_key = "authentication.kubernetes.io/node-name"
    assert admit(policy, agent, {node_key: ["worker-1"]}, "worker-1") is None
    denied = admit(policy, agent, {node_key: ["worker-2"]}, "worker-1")
    assert denied is not None and "bound to node worker-2" in denied and "belongs to node worker-1" in denied
    assert "not bound to one node" in (admit(policy, agent, None, "worker-1") or "")
    assert admit(policy, agent, {node_key: []}, "worker-1") is not None
    # Anyone else (the controller, an administrator) is not matched.
    controller = f"system:serviceaccount:{NAMESPACE}:{one(objects, 'ServiceAccount', 'controller')['metadata']['name']}"
    assert admit(policy, controller, None, "worker-1") is None
    assert admit(policy, "kubernetes-admin", {node_key: ["worker-2"]}, "worker-1") is None


def test_admission_policy_follows_a_custom_agent_service_account() -> None:
    values = {"agent": {"serviceAccount": {"name": "proxy-agent"}}}
    policy = one(render(values), "ValidatingAdmissionPolicy")
    user = f"system:serviceaccount:{NAMESPACE}:proxy-agent"
    assert admit(policy, user, {"authentication.kubernetes.io/node-name": ["a"]}, "b") is not None


# --- default policy and notes -------------------------------------------------------


def test_default_policy_is_created_with_the_lowest_priority() -> None:
    policy = one(render(), "ProxyPolicy")
    assert policy["metadata"]["name"] == "cluster-defaults"
    assert policy["spec"] == {"priority": -1000}
    assert select(render(MINIMAL_VALUES), "ProxyPolicy") == []


def test_notes_explain_how_to_check_the_proxyplans() -> None:
    notes = render_manifests()[f"{CHART.name}/templates/NOTES.txt"]
    assert "kubectl get proxyplans" in notes
    assert "condition=Programmed" in notes
    assert "k8sServiceHost is not set" in notes
    assert "k8sServiceHost is not set" not in render_manifests(CUSTOM_VALUES)[f"{CHART.name}/templates/NOTES.txt"]


def test_release_names_shape_object_names() -> None:
    names = {o["metadata"]["name"] for o in render(release="edge")}
    assert {"edge-planproxy-controller", "edge-planproxy-agent"} <= names
    names = {o["metadata"]["name"] for o in render(release="planproxy")}
    assert {"planproxy-controller", "planproxy-agent"} <= names


def readme_helm_commands() -> list[str]:
    """The `helm install` / `helm upgrade` commands of the README, continuation lines joined."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return re.findall(r"helm (?:install|upgrade) [^\n`]*", text)


def test_the_readmes_helm_commands_use_values_the_chart_accepts() -> None:
    commands = readme_helm_commands()
    assert len(commands) >= 3
    for command in commands:
        values: dict[str, Any] = {}
        for expression in re.findall(r"--set\s+(\S+)", command):
            key, _, value = expression.partition("=")
            values = merge(values, helm.parse_set_string(f"{key}={value.strip(chr(34))}"))
        if "k8sServiceHost" in values:
            values["k8sServiceHost"] = "172.18.0.2"  # the README fills it in from `docker inspect`
        assert render(values), command


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# The Rust type (or, for the hooks, the kubectl resource name) each resource of
# api_calls.yaml is called through; its `source` must mention it.
CALLED_AS = {
    "services": "Service",
    "endpointslices": "EndpointSlice",
    "nodes": "Node",
    "proxypolicies": "ProxyPolicy",
    "proxyplans": "ProxyPlan",
    "events": "Recorder",
    "leases": "Lease",
    "daemonsets": "daemonset/",
}


@pytest.mark.parametrize("call", api_calls(), ids=lambda c: f"{c['component']}-{c['resource']}-{'-'.join(c['verbs'])}")
def test_every_api_call_names_the_code_that_makes_it(call: dict[str, Any]) -> None:
    source = REPO / call["source"]
    assert source.is_file(), f"{call['source']} does not exist: update api_calls.yaml"
    assert CALLED_AS[call["resource"]] in source.read_text(), f"{call['source']} no longer uses {call['resource']}"
