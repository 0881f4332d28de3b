"""The chart's values.schema.json, generated.

`python3 charts/tests/values_schema.py` rewrites charts/planproxy/values.schema.json;
test_chart.py checks that the checked-in file equals what this produces, so the
schema of `defaultPolicy.spec` can never drift from the ProxyPolicy CRD.
"""

from __future__ import annotations

import copy
import json
import pathlib
import sys
from typing import Any

import yaml

CHART = pathlib.Path(__file__).resolve().parent.parent / "planproxy"
SCHEMA_PATH = CHART / "values.schema.json"
CRD_PATH = CHART / "crds" / "planproxy.dev.yaml"


def crd_version_schema(plural: str, version: str = "v1alpha1") -> dict[str, Any]:
    """The openAPIV3Schema of one version of one of the chart's CRDs."""
    for doc in yaml.safe_load_all(CRD_PATH.read_text()):
        if doc and doc["spec"]["names"]["plural"] == plural:
            for v in doc["spec"]["versions"]:
                if v["name"] == version:
                    return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"no CRD {plural}/{version} in {CRD_PATH}")


def openapi_to_json_schema(node: Any, *, closed: bool) -> Any:
    """Turns a CRD's structural OpenAPI schema into JSON Schema.

    `nullable` becomes a null member of `type`, the `x-kubernetes-*` extensions (CEL
    rules the API server checks) are dropped, and with `closed` objects with known
    properties reject unknown ones: the API server would silently prune a misspelt
    field, the chart rejects it at install instead.
    """
    if isinstance(node, list):
        return [openapi_to_json_schema(item, closed=closed) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties",):
            out[key] = {name: openapi_to_json_schema(sub, closed=closed) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = openapi_to_json_schema(value, closed=closed)
        else:
            out[key] = copy.deepcopy(value)
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if closed and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def proxy_policy_spec_schema() -> dict[str, Any]:
    """JSON Schema of a ProxyPolicy spec, from the chart's CRD."""
    spec = crd_version_schema("proxypolicies")["properties"]["spec"]
    return openapi_to_json_schema(spec, closed=True)


DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$",
            "description": "A duration such as 500ms, 2s or 1m30s."}
OBJ = {"type": "object"}
ARR = {"type": "array"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
HOST = {"type": "string", "minLength": 1,
        "description": "An IP address to listen on (0.0.0.0 or :: for every address)."}
PULL = {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]}
LOG_FORMAT = {"type": "string", "enum": ["text", "json"]}
LOG_LEVEL = {"type": "string", "minLength": 1, "description": "A filter in RUST_LOG syntax."}
ENV = {"type": "array", "items": {"type": "object", "required": ["name"]}}
ARGS = {"type": "array", "items": {"type": "string", "pattern": "^--"}}
PROBE = {"type": "object", "additionalProperties": False, "properties": {
    k: {"type": "integer", "minimum": 0} for k in
    ["initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold"]}}


def closed(properties, required=None, **extra):
    out = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = required
    out.update(extra)
    return out


def service_account(component):
    return closed({
        "create": {"type": "boolean"},
        "name": {"type": "string", "description": f"Defaults to <fullname>-{component}."},
        "annotations": STR_MAP,
    })


def values_schema() -> dict[str, Any]:
    """The whole values schema."""
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Values of the planproxy chart",
        **closed({
            "image": closed({
                "repository": {"type": "string", "minLength": 1},
                "tag": {"type": "string", "description": "Defaults to the chart's appVersion."},
                "digest": {"type": "string", "pattern": "^(sha256:[0-9a-f]{64})?$"},
                "pullPolicy": PULL,
            }, required=["repository"]),
            # Parent charts pass `global` to every subchart.
            "global": {"type": "object"},
            "imagePullSecrets": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            "k8sServiceHost": {"type": "string"},
            "k8sServicePort": {"type": ["integer", "string"], "pattern": "^([0-9]{1,5})?$",
                               "minimum": 1, "maximum": 65535},
            "commonLabels": STR_MAP,
            "rbac": closed({"create": {"type": "boolean"}}),
            "controller": closed({
                "replicas": {"type": "integer", "minimum": 1, "maximum": 10},
                "leaderElection": closed({
                    "enabled": {"type": "boolean"},
                    "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                    "leaseDuration": DURATION,
                    "renewDeadline": DURATION,
                    "retryPeriod": DURATION,
                }),
                "coalesceWindow": DURATION,
                "maxWritesPerSecond": {"type": "integer", "minimum": 1},
                "shardTargetBytes": {"type": "integer", "minimum": 1024},
                "adminPort": PORT,
                "logFormat": LOG_FORMAT,
                "logLevel": LOG_LEVEL,
                "extraArgs": ARGS,
                "extraEnv": ENV,
                "serviceAccount": service_account("controller"),
                "podDisruptionBudget": closed({
                    "enabled": {"type": "boolean"},
                    "maxUnavailable": {"type": ["integer", "string"], "minimum": 0,
                                       "pattern": "^[0-9]+%?$"},
                }),
                "resources": OBJ,
                "podAnnotations": STR_MAP,
                "podLabels": STR_MAP,
                "nodeSelector": STR_MAP,
                "tolerations": ARR,
                "affinity": OBJ,
                "topologySpreadConstraints": ARR,
                "priorityClassName": {"type": "string"},
                "podSecurityContext": OBJ,
                "securityContext": OBJ,
                "livenessProbe": PROBE,
                "readinessProbe": PROBE,
            }),
            "agent": closed({
                "layout": {"type": "string", "enum": ["tree", "flat"],
                           "description": "iptables layout: tree (per-service chains) or flat."},
                "statusMinInterval": {"anyOf": [{"const": ""}, DURATION]},
                "healthz": closed({"bindAddress": HOST, "port": PORT}, required=["bindAddress", "port"]),
                "metrics": closed({"bindAddress": HOST, "port": PORT}, required=["bindAddress", "port"]),
                "logFormat": LOG_FORMAT,
                "logLevel": LOG_LEVEL,
                "extraArgs": ARGS,
                "extraEnv": ENV,
                "serviceAccount": service_account("agent"),
                "updateStrategy": closed({
                    "type": {"type": "string", "enum": ["RollingUpdate", "OnDelete"]},
                    "rollingUpdate": closed({
                        "maxUnavailable": {"type": ["integer", "string"], "minimum": 1,
                                           "pattern": "^[0-9]+%?$"},
                        "maxSurge": {"type": ["integer", "string"], "minimum": 0,
                                     "pattern": "^[0-9]+%?$"},
                    }),
                }),
                "resources": OBJ,
                "podAnnotations": STR_MAP,
                "podLabels": STR_MAP,
                "nodeSelector": STR_MAP,
                "tolerations": ARR,
                "affinity": OBJ,
                "priorityClassName": {"type": "string"},
                "securityContext": OBJ,
                "livenessProbe": PROBE,
                "readinessProbe": PROBE,
                "xtablesLockPath": {"type": "string", "pattern": "^/"},
            }),
            "admissionPolicy": closed({
                "enabled": {"type": "boolean"},
                "validationActions": {"type": "array", "minItems": 1, "uniqueItems": True,
                                      "items": {"type": "string", "enum": ["Deny", "Warn", "Audit"]}},
            }),
            "cleanup": closed({
                "enabled": {"type": "boolean"},
                "timeout": DURATION,
                "kubectlImage": closed({
                    "repository": {"type": "string", "minLength": 1},
                    "tag": {"type": "string", "minLength": 1},
                    "pullPolicy": PULL,
                }, required=["repository", "tag"]),
                "resources": OBJ,
            }),
            "defaultPolicy": closed({
                "enabled": {"type": "boolean"},
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                "spec": proxy_policy_spec_schema(),
            }),
            "serviceMonitor": closed({
                "enabled": {"type": "boolean"},
                "interval": DURATION,
                "scrapeTimeout": DURATION,
                "labels": STR_MAP,
            }),
        }),
    }


def render() -> str:
    """The values.schema.json text."""
    return json.dumps(values_schema(), indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA_PATH.write_text(render())
    sys.stdout.write(f"wrote {SCHEMA_PATH}\n")
