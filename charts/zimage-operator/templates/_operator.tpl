{{/*
The operator's Deployment and metrics Service. With operator.shards: one pair per shard, the shard's name in
their names and labels (.shard: the shard's values; an empty dict for the one unsharded operator).
*/}}
{{- define "zimage.operatorSuffix" -}}
{{- with .name }}-{{ . }}{{ end -}}
{{- end -}}

{{- define "zimage.operatorSelector" -}}
{{ include "zimage.selector" (dict "root" .root "component" "operator") }}
{{- with .shard.name }}
zimage.dev/shard: {{ . }}
{{- end }}
{{- end -}}

{{- define "zimage.operator" -}}
{{- $root := .root }}
{{- $shard := .shard }}
{{- $fullname := include "zimage.fullname" $root }}
{{- $sfx := include "zimage.operatorSuffix" $shard }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullname }}-operator{{ $sfx }}
  labels: {{- include "zimage.labels" $root | nindent 4 }}
    app.kubernetes.io/component: operator
    {{- with $shard.name }}
    zimage.dev/shard: {{ . }}
    {{- end }}
spec:
  replicas: {{ $shard.replicas | default $root.Values.operator.replicas }}
  selector:
    matchLabels: {{- include "zimage.operatorSelector" . | nindent 6 }}
  template:
    metadata:
      labels: {{- include "zimage.operatorSelector" . | nindent 8 }}
    spec:
      serviceAccountName: {{ $fullname }}-operator{{ $sfx }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets: {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext: {{- include "zimage.podSecurity" dict | nindent 8 }}
      containers:
        - name: operator
          image: {{ include "zimage.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args:
            {{- if $shard.namespaces }}
            {{- range $shard.namespaces }}
            - --namespace={{ . }}
            {{- end }}
            {{- else if $root.Values.rbac.clusterWide }}
            - --all-namespaces
            {{- else }}
            - --namespace={{ $root.Release.Namespace }}
            {{- end }}
            {{- with $shard.name }}
            - --shard={{ . }}
            {{- end }}
            {{- with $shard.selector }}
            - --selector={{ . }}
            {{- end }}
            - --liveness=http://0.0.0.0:8080/healthz
            {{- if $shard.name }}
            # the shard's replicas meet in peering object {{ $fullname }}-{{ $shard.name }}
            {{- end }}
            - --peering={{ $fullname }}
            - --metrics-port={{ $root.Values.operator.metricsPort }}
          env:
            - name: ZIMAGE_REDIS_URL
              value: {{ include "zimage.redisUrl" $root | quote }}
            - name: ZIMAGE_WORKER_REDIS_URL
              value: {{ $root.Values.operator.workerRedisUrl | default (include "zimage.redisUrl" $root) | quote }}
            {{- with include "zimage.redisEnv" (dict "root" $root "operator" true) }}{{ . | trim | nindent 12 }}{{ end }}
            {{- with include "zimage.historyEnv" (dict "root" $root "prefix" "ZIMAGE_" "retention" true) }}{{ . | trim | nindent 12 }}{{ end }}
            # remote ModelDeployments' forwarder pods run this image (zimage-forwarder)
            - name: ZIMAGE_FORWARDER_IMAGE
              value: {{ include "zimage.image" $root | quote }}
            {{- with include "zimage.workerStorageUrl" $root }}
            - name: ZIMAGE_WORKER_STORAGE_URL
              value: {{ . | quote }}
            {{- end }}
            {{- with include "zimage.storageUrl" $root }}
            # the store the leader sweeps for images and uploads past their retention
            - name: ZIMAGE_STORAGE_URL
              value: {{ . | quote }}
            {{- end }}
            {{- if and (eq $root.Values.storage.mode "volume") (not $root.Values.api.storageUrl) }}
            - name: ZIMAGE_WORKER_STORAGE_CLAIM
              value: {{ include "zimage.storageClaim" $root | quote }}
            - name: ZIMAGE_WORKER_STORAGE_MOUNT_PATH
              value: {{ $root.Values.storage.volume.mountPath | quote }}
            {{- end }}
            {{- if and (eq $root.Values.storage.mode "s3") $root.Values.storage.s3.existingSecret }}
            - name: ZIMAGE_WORKER_STORAGE_SECRET
              value: {{ $root.Values.storage.s3.existingSecret | quote }}
            {{- end }}
            - name: ZIMAGE_IMAGE_RETENTION_SECONDS
              value: {{ if $root.Values.storage.retentionDays }}{{ mul $root.Values.storage.retentionDays 86400 | quote }}{{ else }}"null"{{ end }}
            - name: ZIMAGE_UPLOAD_RETENTION_SECONDS
              value: {{ if $root.Values.storage.uploadRetentionDays }}{{ mul $root.Values.storage.uploadRetentionDays 86400 | quote }}{{ else }}"null"{{ end }}
            - name: ZIMAGE_OPERATOR_NAMESPACE
              valueFrom:
                fieldRef: {fieldPath: metadata.namespace}
            - name: ZIMAGE_PEERING_LIFETIME_SECONDS
              value: {{ $root.Values.operator.peeringLifetimeSeconds | quote }}
            - name: ZIMAGE_DEFAULT_TTL_SECONDS_AFTER_FINISHED
              value: {{ if kindIs "invalid" $root.Values.operator.ttlSecondsAfterFinished }}"null"{{ else }}{{ $root.Values.operator.ttlSecondsAfterFinished | int64 | quote }}{{ end }}
            - name: ZIMAGE_JOB_RETENTION_SECONDS
              value: {{ $root.Values.operator.jobRetentionSeconds | int64 | quote }}
            - name: ZIMAGE_NORMAL_EVENTS
              value: {{ $root.Values.operator.normalEvents | quote }}
            - name: ZIMAGE_ADMISSION_CONCURRENCY
              value: {{ $root.Values.operator.admissionConcurrency | int64 | quote }}
            - name: ZIMAGE_EVENTS_CONCURRENCY
              value: {{ $root.Values.operator.eventsConcurrency | int64 | quote }}
            - name: ZIMAGE_CONSUMER_NAME
              valueFrom:
                fieldRef: {fieldPath: metadata.name}
          ports:
            - {name: metrics, containerPort: {{ $root.Values.operator.metricsPort }}, protocol: TCP}
            - {name: health, containerPort: 8080, protocol: TCP}
          livenessProbe:
            httpGet: {path: /healthz, port: health}
            initialDelaySeconds: 10
            periodSeconds: 20
          resources: {{- toYaml ($shard.resources | default $root.Values.operator.resources) | nindent 12 }}
          securityContext: {{- include "zimage.containerSecurity" $root | nindent 12 }}
          volumeMounts:
            - {name: tmp, mountPath: /tmp}
            {{- with include "zimage.storageMount" $root }}{{ . | trim | nindent 12 }}{{ end }}
          {{- with include "zimage.storageEnvFrom" $root }}{{ . | trim | nindent 10 }}{{ end }}
      volumes:
        - name: tmp
          emptyDir: {}
        {{- with include "zimage.storageVolume" $root }}{{ . | trim | nindent 8 }}{{ end }}
      {{- with $root.Values.operator.nodeSelector }}
      nodeSelector: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.operator.tolerations }}
      tolerations: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.operator.affinity }}
      affinity: {{- toYaml . | nindent 8 }}
      {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullname }}-operator{{ $sfx }}-metrics
  labels: {{- include "zimage.labels" $root | nindent 4 }}
    app.kubernetes.io/component: operator
    {{- with $shard.name }}
    zimage.dev/shard: {{ . }}
    {{- end }}
spec:
  selector: {{- include "zimage.operatorSelector" . | nindent 4 }}
  ports:
    - {name: metrics, port: {{ $root.Values.operator.metricsPort }}, targetPort: metrics, protocol: TCP}
{{- end -}}

{{/* Shards that cannot work are refused at render time (the schema checks each entry's shape). */}}
{{- define "zimage.checkShards" -}}
{{- $names := dict }}
{{- $whole := dict }}
{{- $serving := dict }}
{{- range .Values.operator.shards }}
{{- if hasKey $names .name }}{{ fail (printf "operator.shards: shard name %q is used twice" .name) }}{{ end }}
{{- $_ := set $names .name true }}
{{- if and (gt (len $.Values.operator.shards) 1) (not .namespaces) (not .selector) }}
{{- fail (printf "operator.shards: shard %q needs namespaces or a selector, or it owns what the others own" .name) }}
{{- end }}
{{- $shard := . }}
{{- range .namespaces }}
{{- if and (not $.Values.rbac.clusterWide) (regexMatch "[*?!,]" .) }}
{{- fail (printf "operator.shards: namespace pattern %q of shard %q needs rbac.clusterWide (a Role needs a namespace)" . $shard.name) }}
{{- end }}
{{- if not $shard.selector }}{{ $_ := set $whole . $shard.name }}{{ end }}
{{- $_ := set $serving . (append (get $serving . | default list) $shard.name) }}
{{- end }}
{{- end }}
{{- range $ns, $owner := $whole }}
{{- if gt (len (get $serving $ns)) 1 }}
{{- fail (printf "operator.shards: shard %q owns all of namespace %q, which shards %v also serve (give each a selector)" $owner $ns (get $serving $ns)) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* namespace -> the names of the shards serving it (namespaced RBAC and peering objects). */}}
{{- define "zimage.shardNamespaces" -}}
{{- $out := dict }}
{{- range .Values.operator.shards }}
{{- $name := .name }}
{{- range (.namespaces | default (list $.Release.Namespace)) }}
{{- $_ := set $out . (append (get $out . | default list) $name) }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end -}}

{{/* The operator's RBAC rules (.peerings: the kopf peering resources it meets its replicas in). */}}
{{- define "zimage.operatorRules" -}}
- apiGroups: [zimage.dev]
  resources: [imagejobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [zimage.dev]
  resources: [modeldeployments]
  verbs: [get, list, watch]
- apiGroups: [zimage.dev]
  resources: [imageworkflows]
  verbs: [get, list, watch, delete]
- apiGroups: [zimage.dev]
  resources: [imagejobs/status, modeldeployments/status, imageworkflows/status]
  verbs: [get, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [services, persistentvolumeclaims]
  verbs: [get, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, patch]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create]
# kopf peering: which replica runs the handlers
- apiGroups: [kopf.dev]
  resources: [{{ .peerings }}]
  verbs: [get, list, watch, patch]
{{- if .secrets }}
# pools outside the release namespace: the Redis password (and CA) copied into <name>-redis, owned by the pool
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, patch]
{{- end }}
{{- end -}}
