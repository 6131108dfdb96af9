{{- define "zimage.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "zimage.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "zimage.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "zimage.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "zimage.redisUrl" -}}
{{- $r := .Values.redis -}}
{{- if $r.bundled -}}redis://{{ include "zimage.fullname" . }}-redis.{{ .Release.Namespace }}.svc:6379/0
{{- else if $r.cluster.nodes -}}redis+cluster://{{ join "," $r.cluster.nodes }}/?wait_replicas={{ $r.cluster.waitReplicas }}
{{- else if $r.sentinel.nodes -}}redis+sentinel://{{ join "," $r.sentinel.nodes }}/{{ required "redis.sentinel.master is required with redis.sentinel.nodes" $r.sentinel.master }}/{{ $r.sentinel.db }}
{{- else -}}{{ required "redis.externalUrl (or redis.cluster.nodes, redis.sentinel.nodes) is required when redis.bundled is false" $r.externalUrl }}{{- end -}}
{{- end -}}

{{/* Every pod: non-root, read-only root filesystem, no capabilities, the runtime's seccomp profile. */}}
{{- define "zimage.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 10001 }}
runAsGroup: {{ .uid | default 10001 }}
fsGroup: {{ .uid | default 10001 }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "zimage.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}
