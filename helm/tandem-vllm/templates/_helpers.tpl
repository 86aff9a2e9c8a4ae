{{/* Names and labels. */}}
{{- define "tandem-vllm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix. KubeRay appends suffixes to the RayService name for its clusters and
pods, so it is kept to 40 characters. */}}
{{- define "tandem-vllm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tandem-vllm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem-vllm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tandem-vllm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tandem-vllm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Hardware profiles: worker resources, node selector, and the Ray resources of one replica. */}}
{{- define "tandem-vllm.profiles" -}}
cpu:
  gpu: false
  resources: {requests: {cpu: "2", memory: 8Gi}, limits: {cpu: "4", memory: 16Gi}}
  nodeSelector: {}
  replicaCpus: 1
  replicaGpus: 0
nvidia-l4:
  gpu: true
  resources: {requests: {cpu: "6", memory: 28Gi, nvidia.com/gpu: "1"}, limits: {cpu: "8", memory: 32Gi, nvidia.com/gpu: "1"}}
  nodeSelector: {nvidia.com/gpu.product: NVIDIA-L4}
  replicaCpus: 4
  replicaGpus: 1
nvidia-a10g:
  gpu: true
  resources: {requests: {cpu: "6", memory: 28Gi, nvidia.com/gpu: "1"}, limits: {cpu: "8", memory: 32Gi, nvidia.com/gpu: "1"}}
  nodeSelector: {nvidia.com/gpu.product: NVIDIA-A10G}
  replicaCpus: 4
  replicaGpus: 1
nvidia-a100-40gb:
  gpu: true
  resources: {requests: {cpu: "10", memory: 80Gi, nvidia.com/gpu: "1"}, limits: {cpu: "12", memory: 85Gi, nvidia.com/gpu: "1"}}
  nodeSelector: {nvidia.com/gpu.product: NVIDIA-A100-SXM4-40GB}
  replicaCpus: 4
  replicaGpus: 1
nvidia-a100-80gb:
  gpu: true
  resources: {requests: {cpu: "10", memory: 120Gi, nvidia.com/gpu: "1"}, limits: {cpu: "12", memory: 160Gi, nvidia.com/gpu: "1"}}
  nodeSelector: {nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB}
  replicaCpus: 4
  replicaGpus: 1
nvidia-h100-80gb:
  gpu: true
  resources: {requests: {cpu: "14", memory: 160Gi, nvidia.com/gpu: "1"}, limits: {cpu: "16", memory: 200Gi, nvidia.com/gpu: "1"}}
  nodeSelector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
  replicaCpus: 4
  replicaGpus: 1
{{- end }}

{{- define "tandem-vllm.profile" -}}
{{- $all := include "tandem-vllm.profiles" . | fromYaml }}
{{- $p := get $all .Values.profile }}
{{- if not $p }}
{{- fail (printf "profile %q is unknown; use one of: %s" .Values.profile (keys $all | sortAlpha | join ", ")) }}
{{- end }}
{{- toYaml $p }}
{{- end }}

{{- define "tandem-vllm.image" -}}
{{- $p := include "tandem-vllm.profile" . | fromYaml }}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion (ternary "gpu" "cpu" $p.gpu)) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "tandem-vllm.apiKeySecret" -}}
{{- .Values.serve.apiKey.existingSecret | default (printf "%s-api-key" (include "tandem-vllm.fullname" .)) }}
{{- end }}

{{/* The cache directory the demo pair is built into, on the model volume. */}}
{{- define "tandem-vllm.demoCache" -}}
{{- printf "%s/tandem-vllm-cache" .Values.model.storage.mountPath }}
{{- end }}

{{/* The `args` of the application: a tandem_vllm.serve.config.ServeConfig. */}}
{{- define "tandem-vllm.serveArgs" -}}
{{- $v := .Values }}
{{- $p := include "tandem-vllm.profile" . | fromYaml }}
{{- $a := dict "num_speculative_tokens" (int $v.speculation.numSpeculativeTokens) "draft_sample_method" $v.speculation.draftSampleMethod "per_request_spec_metrics" $v.speculation.perRequestMetrics "dtype" $v.engine.dtype
      "max_ongoing_requests" (int $v.serve.maxOngoingRequests) "max_queued_requests" (int $v.serve.maxQueuedRequests)
      "max_request_bytes" (int $v.serve.maxRequestBytes) "max_n" (int $v.serve.maxN)
      "graceful_shutdown_timeout_s" $v.serve.gracefulShutdownTimeoutS
      "num_cpus" (ternary $p.replicaCpus $v.serve.replicaCpus (kindIs "invalid" $v.serve.replicaCpus))
      "num_gpus" (ternary $p.replicaGpus $v.serve.replicaGpus (kindIs "invalid" $v.serve.replicaGpus))
      "ray_metrics" true }}
{{- if $v.model.demo }}
{{- $_ := set $a "demo" $v.model.demoPair }}
{{- else }}
{{- $_ := set $a "model" (required "model.target is required: the path of the target model's Hugging Face directory inside the pods (or set model.demo=true)" $v.model.target) }}
{{- end }}
{{- if $v.speculation.disabled }}
{{- $_ := set $a "no_speculation" true }}
{{- else if $v.speculation.config }}
{{- $_ := set $a "speculative_config" $v.speculation.config }}
{{- else if or $v.model.drafter $v.model.demo }}
{{- with $v.model.drafter }}{{ $_ := set $a "drafter" . }}{{ end }}
{{- with $v.speculation.schedule }}{{ $_ := set $a "k_schedule" . }}{{ end }}
{{- end }}
{{- with $v.model.servedModelName }}{{ $_ := set $a "served_model_name" . }}{{ end }}
{{- if not (kindIs "invalid" $v.engine.maxModelLen) }}{{ $_ := set $a "max_model_len" (int $v.engine.maxModelLen) }}{{ end }}
{{- if not (kindIs "invalid" $v.engine.kvCacheMemoryBytes) }}{{ $_ := set $a "kv_cache_memory_bytes" (int64 $v.engine.kvCacheMemoryBytes) }}{{ end }}
{{- with $v.engine.chatTemplate }}{{ $_ := set $a "chat_template" . }}{{ end }}
{{- with $v.serve.extraChatRoles }}{{ $_ := set $a "extra_chat_roles" . }}{{ end }}
{{- with $v.engine.extraArgs }}{{ $_ := set $a "vllm_args" . }}{{ end }}
{{- if $v.serve.apiKey.enabled }}{{ $_ := set $a "api_key_env" "TANDEM_API_KEY" }}{{ end }}
{{- if $v.serve.autoscaling.enabled }}
{{- $_ := set $a "autoscaling" (dict "min_replicas" (int $v.serve.autoscaling.minReplicas) "max_replicas" (int $v.serve.autoscaling.maxReplicas) "target_ongoing_requests" $v.serve.autoscaling.targetOngoingRequests) }}
{{- else }}
{{- $_ := set $a "num_replicas" (int $v.serve.numReplicas) }}
{{- end }}
{{- toYaml $a }}
{{- end }}

{{/* Ray Serve's config (serveConfigV2), the same shape as deploy/serve.yaml. */}}
{{- define "tandem-vllm.serveConfig" -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ .Values.service.httpPort }}
grpc_options:
  port: {{ .Values.service.grpcPort }}
  grpc_servicer_functions:
    - tandem_vllm.serve.pb.tandem_pb2_grpc.add_TandemGenerationServicer_to_server
    - grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server
{{- if .Values.serve.jsonLogs }}
logging_config:
  encoding: JSON
{{- end }}
applications:
  - name: tandem
    route_prefix: /
    import_path: tandem_vllm.serve.app:build_app
    args:
      {{- include "tandem-vllm.serveArgs" . | nindent 6 }}
{{- end }}

{{/* Env of every Ray container. */}}
{{- define "tandem-vllm.env" -}}
- name: RAY_SERVE_ENABLE_DIRECT_INGRESS
  value: {{ ternary "1" "0" .Values.serve.directIngress | quote }}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: {{ ternary "1" "0" .Values.serve.haproxy | quote }}
{{- if .Values.model.demo }}
- name: TANDEM_VLLM_CACHE
  value: {{ include "tandem-vllm.demoCache" . | quote }}
{{- end }}
{{- if .Values.serve.apiKey.enabled }}
- name: TANDEM_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem-vllm.apiKeySecret" . }}
      key: {{ .Values.serve.apiKey.secretKey }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The model volume, its mount, and the init container that fills it. */}}
{{- define "tandem-vllm.modelVolume" -}}
{{- $s := .Values.model.storage }}
- name: models
{{- if eq $s.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.storage.pvc.claimName is required with model.storage.type=pvc" $s.pvc.claimName }}
    readOnly: {{ not .Values.model.demo }}
{{- else if eq $s.type "hostPath" }}
  hostPath:
    path: {{ required "model.storage.hostPath.path is required with model.storage.type=hostPath" $s.hostPath.path }}
    type: {{ ternary "DirectoryOrCreate" "Directory" .Values.model.demo }}
{{- else }}
  emptyDir:
    sizeLimit: {{ $s.initContainer.sizeLimit }}
{{- end }}
{{- end }}

{{- define "tandem-vllm.modelMount" -}}
- name: models
  mountPath: {{ .Values.model.storage.mountPath }}
{{- with .Values.model.storage.pvc.subPath }}
{{- if eq $.Values.model.storage.type "pvc" }}
  subPath: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tandem-vllm.initContainers" -}}
{{- $s := .Values.model.storage }}
{{- if .Values.model.demo }}
- name: build-demo-pair
  image: {{ include "tandem-vllm.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["tandem-vllm", "demo", "build", "--size", {{ .Values.model.demoPair | quote }}]
  env:
    - name: TANDEM_VLLM_CACHE
      value: {{ include "tandem-vllm.demoCache" . | quote }}
  volumeMounts:
    {{- include "tandem-vllm.modelMount" . | trim | nindent 4 }}
{{- else if eq $s.type "initContainer" }}
- name: fetch-models
  image: {{ $s.initContainer.image | default (include "tandem-vllm.image" .) }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: {{ required "model.storage.initContainer.command is required with model.storage.type=initContainer" $s.initContainer.command | toJson }}
  {{- with $s.initContainer.args }}
  args: {{ toJson . }}
  {{- end }}
  {{- with $s.initContainer.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.initContainer.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    {{- include "tandem-vllm.modelMount" . | trim | nindent 4 }}
{{- end }}
{{- end }}

{{/* Pod-level settings shared by head and workers. */}}
{{- define "tandem-vllm.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (include "tandem-vllm.initContainers" . | trim) }}
initContainers:
  {{- . | nindent 2 }}
{{- end }}
volumes:
  {{- include "tandem-vllm.modelVolume" . | trim | nindent 2 }}
{{- end }}

{{- define "tandem-vllm.podMetadata" -}}
metadata:
  labels:
    {{- include "tandem-vllm.selectorLabels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with .root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .root.Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
Container ports of the Ray head. KubeRay builds its Serve Service only from head-container ports
named "serve" (1.1+) or "serve-*" (1.5+), and adds no default ports once the head lists its own:
without "serve" a RayService never becomes ready. Workers use the same names (the Services and the
readiness probe target them by name).
*/}}
{{- define "tandem-vllm.containerPorts" -}}
- {containerPort: 6379, name: gcs}
- {containerPort: 8265, name: dashboard}
- {containerPort: 10001, name: client}
{{ include "tandem-vllm.servePorts" . }}
{{- end }}

{{- define "tandem-vllm.servePorts" -}}
{{- include "tandem-vllm.checkPorts" . }}
- {containerPort: {{ .Values.service.httpPort }}, name: serve}
- {containerPort: {{ .Values.service.grpcPort }}, name: serve-grpc}
- {containerPort: {{ .Values.serviceMonitor.port }}, name: metrics}
{{- end }}

{{/*
Container ports must be unique (the API server refuses duplicates): fail at template time naming the value.
*/}}
{{- define "tandem-vllm.checkPorts" -}}
{{- $fixed := dict "6379" "Ray's GCS port" "8265" "Ray's dashboard port" "10001" "Ray's client port" }}
{{- $seen := dict }}
{{- range $pair := list (list "service.httpPort" .Values.service.httpPort) (list "service.grpcPort" .Values.service.grpcPort) (list "serviceMonitor.port" .Values.serviceMonitor.port) }}
{{- $name := index $pair 0 }}
{{- $port := toString (index $pair 1) }}
{{- if hasKey $fixed $port }}
{{- fail (printf "%s %s collides with %s; choose another port" $name $port (get $fixed $port)) }}
{{- end }}
{{- if hasKey $seen $port }}
{{- fail (printf "%s %s collides with %s; every port must differ" $name $port (get $seen $port)) }}
{{- end }}
{{- $_ := set $seen $port $name }}
{{- end }}
{{- end }}
