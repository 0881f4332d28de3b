{{/* Names, labels and shared snippets of the planproxy chart. */}}

{{- define "planproxy.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object name: the release name, unless it already contains the
chart name (so `helm install planproxy ...` gives `planproxy-controller`, not
`planproxy-planproxy-controller`).
*/}}
{{- define "planproxy.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "planproxy.controller.fullname" -}}
{{- printf "%s-controller" (include "planproxy.fullname" .) -}}
{{- end -}}

{{- define "planproxy.agent.fullname" -}}
{{- printf "%s-agent" (include "planproxy.fullname" .) -}}
{{- end -}}

{{- define "planproxy.cleanup.fullname" -}}
{{- printf "%s-cleanup" (include "planproxy.fullname" .) -}}
{{- end -}}

{{- define "planproxy.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create -}}
{{- default (include "planproxy.controller.fullname" .) .Values.controller.serviceAccount.name -}}
{{- else -}}
{{- required "controller.serviceAccount.name is required when controller.serviceAccount.create is false" .Values.controller.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "planproxy.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (include "planproxy.agent.fullname" .) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "planproxy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "planproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: planproxy
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component; call with (dict "root" $ "component" "controller"). */}}
{{- define "planproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "planproxy.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of one component's objects; same arguments as planproxy.selectorLabels. */}}
{{- define "planproxy.componentLabels" -}}
{{ include "planproxy.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The image reference: repository, then the digest or the tag (default: appVersion). */}}
{{- define "planproxy.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* `host:port`, with IPv6 hosts in brackets; call with (list host port). */}}
{{- define "planproxy.hostPort" -}}
{{- $host := index . 0 | toString -}}
{{- $port := index . 1 | toString -}}
{{- if contains ":" $host -}}
{{- printf "[%s]:%s" $host $port -}}
{{- else -}}
{{- printf "%s:%s" $host $port -}}
{{- end -}}
{{- end -}}

{{/* Whether an address is a loopback address (not reachable from other pods). */}}
{{- define "planproxy.isLoopback" -}}
{{- $host := . | toString -}}
{{- if or (hasPrefix "127." $host) (eq $host "::1") (eq $host "localhost") -}}
true
{{- end -}}
{{- end -}}

{{/*
The probe host for an agent endpoint: none (the pod IP, which is the node's IP on
the host network) when the endpoint listens on every address, else the address it
listens on.
*/}}
{{- define "planproxy.agent.probeHost" -}}
{{- $host := . | toString -}}
{{- if not (or (eq $host "0.0.0.0") (eq $host "::") (eq $host "")) -}}
host: {{ $host | quote }}
{{- end -}}
{{- end -}}

{{/*
Environment every planproxy pod gets: the API server address when set (see
k8sServiceHost in values.yaml). kube clients read these variables for their
in-cluster configuration.
*/}}
{{- define "planproxy.apiServerEnv" -}}
{{- if .Values.k8sServiceHost -}}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.k8sServiceHost | toString | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ required "k8sServicePort is required when k8sServiceHost is set" .Values.k8sServicePort | toString | quote }}
{{- end }}
{{- end -}}

{{/* Checks of value combinations the schema cannot express; fail with a clear message. */}}
{{- define "planproxy.validateValues" -}}
{{- if and (gt (int .Values.controller.replicas) 1) (not .Values.controller.leaderElection.enabled) -}}
{{- fail (printf "controller.leaderElection.enabled=false needs controller.replicas=1 (got %d): without leader election every replica would write ProxyPlans" (int .Values.controller.replicas)) -}}
{{- end -}}
{{- if and .Values.k8sServicePort (not .Values.k8sServiceHost) -}}
{{- fail "k8sServicePort is set but k8sServiceHost is empty: set both or neither" -}}
{{- end -}}
{{- $healthz := int .Values.agent.healthz.port -}}
{{- $metrics := int .Values.agent.metrics.port -}}
{{- if eq $healthz $metrics -}}
{{- fail (printf "agent.healthz.port and agent.metrics.port are both %d: the agent needs two ports" $healthz) -}}
{{- end -}}
{{- end -}}
