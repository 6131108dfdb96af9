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
{{- $s := ternary "s" "" $r.tls.enabled -}}
{{- if $r.bundled -}}redis{{ $s }}://{{ include "zimage.fullname" . }}-redis.{{ .Release.Namespace }}.svc:6379/0
{{- else if $r.cluster.nodes -}}redis{{ $s }}+cluster://{{ join "," $r.cluster.nodes }}/?wait_replicas={{ $r.cluster.waitReplicas }}
{{- else if $r.sentinel.nodes -}}redis{{ $s }}+sentinel://{{ join "," $r.sentinel.nodes }}/{{ required "redis.sentinel.master is required with redis.sentinel.nodes" $r.sentinel.master }}/{{ $r.sentinel.db }}
{{- else -}}
{{- $url := required "redis.externalUrl (or redis.cluster.nodes, redis.sentinel.nodes) is required when redis.bundled is false" $r.externalUrl -}}
{{- if and $r.tls.enabled (not (hasPrefix "rediss" $url)) }}{{ fail "redis.tls.enabled needs a rediss:// redis.externalUrl" }}{{ end -}}
{{ $url }}
{{- end -}}
{{- end -}}

{{/* The Secret holding the Redis password: redis.auth.existingSecret, else the chart's for the bundled Redis;
empty when Redis has no password. Its key is redis.auth.existingSecretKey. */}}
{{- define "zimage.redisPasswordSecret" -}}
{{- $a := .Values.redis.auth -}}
{{- if $a.enabled -}}
{{- if $a.existingSecret }}{{ $a.existingSecret }}{{ else if .Values.redis.bundled }}{{ include "zimage.fullname" . }}-redis-auth{{ end -}}
{{- end -}}
{{- end -}}

{{/* The bundled Redis's server certificate Secret (kubernetes.io/tls, with ca.crt). */}}
{{- define "zimage.redisTlsSecret" -}}
{{- .Values.redis.tls.existingSecret | default (printf "%s-redis-tls" (include "zimage.fullname" .)) -}}
{{- end -}}

{{/* The Secret holding the CA bundle clients check Redis's certificate with (key redis.tls.caKey); empty: none
(plain text, or an external Redis whose certificate the system's trust store accepts). */}}
{{- define "zimage.redisCaSecret" -}}
{{- $t := .Values.redis.tls -}}
{{- if $t.enabled -}}
{{- if $t.caSecret }}{{ $t.caSecret }}{{ else if .Values.redis.bundled }}{{ include "zimage.redisTlsSecret" . }}{{ end -}}
{{- end -}}
{{- end -}}

{{/* The Redis credentials of a process (.root; .operator: also what it hands the worker pods it renders), as
environment entries: secretKeyRefs, never values. */}}
{{- define "zimage.redisEnv" -}}
{{- $root := .root -}}
{{- $r := $root.Values.redis -}}
{{- with $r.auth.username }}
- {name: ZIMAGE_REDIS_USERNAME, value: {{ . | quote }}}
{{- end }}
{{- with include "zimage.redisPasswordSecret" $root }}
- name: ZIMAGE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $r.auth.existingSecretKey }}}
{{- if $.operator }}
- {name: ZIMAGE_WORKER_REDIS_SECRET, value: {{ . | quote }}}
- {name: ZIMAGE_WORKER_REDIS_SECRET_KEY, value: {{ $r.auth.existingSecretKey | quote }}}
{{- end }}
{{- end }}
{{- with include "zimage.redisCaSecret" $root }}
- name: ZIMAGE_REDIS_CA_CERT
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $r.tls.caKey }}}
{{- if $.operator }}
- {name: ZIMAGE_WORKER_REDIS_CA_SECRET, value: {{ . | quote }}}
- {name: ZIMAGE_WORKER_REDIS_CA_SECRET_KEY, value: {{ $r.tls.caKey | quote }}}
{{- end }}
{{- end }}
{{- end -}}

{{/* Whether the operator copies the Redis credentials into Secrets of pool namespaces other than the release's
(then it needs get/create/patch on Secrets there). */}}
{{- define "zimage.redisCopies" -}}
{{- if or (include "zimage.redisPasswordSecret" .) (include "zimage.redisCaSecret" .) }}true{{ end -}}
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

{{/* The image store as the API and the operator see it (storage.mode), unless api.storageUrl overrides it. */}}
{{- define "zimage.storageUrl" -}}
{{- $s := .Values.storage -}}
{{- if .Values.api.storageUrl -}}{{ .Values.api.storageUrl }}
{{- else if eq $s.mode "volume" -}}file://{{ $s.volume.mountPath }}
{{- else if eq $s.mode "s3" -}}{{ include "zimage.s3Url" . }}
{{- end -}}
{{- end -}}

{{- define "zimage.s3Url" -}}
{{- $s3 := .Values.storage.s3 -}}
{{- $q := list -}}
{{- with $s3.endpoint }}{{ $q = append $q (printf "endpoint=%s" (. | urlquery)) }}{{ end -}}
{{- with $s3.region }}{{ $q = append $q (printf "region=%s" (. | urlquery)) }}{{ end -}}
s3://{{ required "storage.s3.bucket is required with storage.mode=s3" $s3.bucket }}/{{ trimAll "/" $s3.prefix }}{{ if $q }}?{{ join "&" $q }}{{ end }}
{{- end -}}

{{/* What workers of pools without spec.storage get (volume mode: the operator mounts the claim instead). */}}
{{- define "zimage.workerStorageUrl" -}}
{{- if .Values.operator.workerStorageUrl -}}{{ .Values.operator.workerStorageUrl }}
{{- else if eq .Values.storage.mode "s3" -}}{{ include "zimage.s3Url" . }}
{{- end -}}
{{- end -}}

{{- define "zimage.storageClaim" -}}
{{- .Values.storage.volume.existingClaim | default (printf "%s-images" (include "zimage.fullname" .)) -}}
{{- end -}}

{{/* The image volume, for pods that mount it (API, operator). */}}
{{- define "zimage.storageVolume" -}}
{{- if and (eq .Values.storage.mode "volume") (not .Values.api.storageUrl) }}
- name: images
  persistentVolumeClaim: {claimName: {{ include "zimage.storageClaim" . }}}
{{- end }}
{{- end -}}

{{- define "zimage.storageMount" -}}
{{- if and (eq .Values.storage.mode "volume") (not .Values.api.storageUrl) }}
- {name: images, mountPath: {{ .Values.storage.volume.mountPath }}}
{{- end }}
{{- end -}}

{{/* The store's credentials as environment (storage.s3.existingSecret). */}}
{{- define "zimage.storageEnvFrom" -}}
{{- if and (eq .Values.storage.mode "s3") .Values.storage.s3.existingSecret }}
envFrom:
  - secretRef: {name: {{ .Values.storage.s3.existingSecret }}}
{{- end }}
{{- end -}}

{{/* Workload-identity annotations (IRSA, GKE) for the pods that read and write the bucket. */}}
{{- define "zimage.storageAnnotations" -}}
{{- if and (eq .Values.storage.mode "s3") .Values.storage.s3.serviceAccountAnnotations }}
annotations: {{- toYaml .Values.storage.s3.serviceAccountAnnotations | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The history store (history.*): its URL (no password in it), empty when history is off. bundled: the chart's
PostgreSQL, user and database "zimage". */}}
{{- define "zimage.historyUrl" -}}
{{- $h := .Values.history -}}
{{- if $h.enabled -}}
{{- if $h.bundled.enabled -}}postgresql://zimage@{{ include "zimage.fullname" . }}-postgresql.{{ .Release.Namespace }}.svc:5432/zimage
{{- else -}}{{ required "history.url (or history.bundled.enabled) is required when history.enabled is true" $h.url }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the history store's password (key history.passwordKey): history.existingSecret, else the
chart's for the bundled PostgreSQL; empty when there is none. */}}
{{- define "zimage.historyPasswordSecret" -}}
{{- $h := .Values.history -}}
{{- if $h.enabled -}}
{{- if $h.existingSecret }}{{ $h.existingSecret }}{{ else if $h.bundled.enabled }}{{ include "zimage.fullname" . }}-postgresql-auth{{ end -}}
{{- end -}}
{{- end -}}

{{/* The history store and the tenants' GPU-second quotas as a process's environment entries (.root; .prefix:
ZIMAGE_ for the operator, ZIMAGE_API_ for the API; .retention: the operator's retention days too). The password
comes from a secretKeyRef, never a value. */}}
{{- define "zimage.historyEnv" -}}
{{- $root := .root -}}
{{- $h := $root.Values.history -}}
{{- with include "zimage.historyUrl" $root }}
- name: {{ $.prefix }}HISTORY_URL
  value: {{ . | quote }}
{{- with include "zimage.historyPasswordSecret" $root }}
- name: {{ $.prefix }}HISTORY_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $h.passwordKey }}}
{{- end }}
{{- if $.retention }}
- name: {{ $.prefix }}HISTORY_RETENTION_DAYS
  value: {{ if $h.retentionDays }}{{ $h.retentionDays | int64 | quote }}{{ else }}"null"{{ end }}
- name: {{ $.prefix }}HISTORY_USAGE_RETENTION_DAYS
  value: {{ if $h.usageRetentionDays }}{{ $h.usageRetentionDays | int64 | quote }}{{ else }}"null"{{ end }}
{{- end }}
{{- end }}
{{- with $root.Values.quotas.tenants }}
- name: {{ $.prefix }}TENANT_QUOTAS
  value: {{ toJson . | quote }}
{{- end }}
{{- end -}}

{{/* History values that cannot work are refused at render time. */}}
{{- define "zimage.checkHistory" -}}
{{- $h := .Values.history -}}
{{- if and $h.bundled.enabled (not $h.enabled) }}{{ fail "history.bundled.enabled needs history.enabled" }}{{ end -}}
{{- if and $h.enabled $h.bundled.enabled $h.url }}{{ fail "history.url and history.bundled.enabled exclude each other: the bundled PostgreSQL has its own URL" }}{{ end -}}
{{- end -}}
