{{/* Names. The RayService name feeds KubeRay's generated names: at most 47 characters. */}}
{{- define "offramp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 47 | trimSuffix "-" -}}
{{- end -}}

{{- define "offramp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "offramp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "offramp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "offramp.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "offramp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: offramp
{{- end -}}

{{- define "offramp.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "offramp.fullname" .)) .Values.apiKey.existingSecret -}}
{{- end -}}

{{- define "offramp.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "offramp.gpuImage" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-gpu" .Chart.AppVersion) .Values.image.gpuTag) -}}
{{- end -}}

{{/* Environment of every Ray container: API key, OTEL wiring, offline caches under /tmp. */}}
{{- define "offramp.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: {{ .Values.apiKey.envName }}
  valueFrom:
    secretKeyRef:
      name: {{ include "offramp.apiKeySecretName" . }}
      key: {{ .Values.apiKey.secretKey }}
{{- if .Values.serve.haproxy }}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
{{- end }}
- name: OTEL_SERVICE_NAME
  value: {{ .Values.otel.serviceName | quote }}
{{- if .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .Values.otel.protocol | quote }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
{{- else }}
- name: OTEL_TRACES_EXPORTER
  value: none
{{- end }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .Values.otel.samplingRatio | toString | quote }}
- name: OTEL_METRICS_EXPORTER
  value: none
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ include "offramp.otelResourceAttributes" . | quote }}
{{- if .Values.otel.serveTracing.enabled }}
- name: RAY_SERVE_TRACING_SAMPLING_RATIO
  value: {{ .Values.otel.samplingRatio | toString | quote }}
{{- end }}
# The root filesystem is read-only: caches go to the writable /tmp, nothing is downloaded.
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: HF_HOME
  value: /tmp/.cache/huggingface
- name: HF_HUB_OFFLINE
  value: "1"
- name: MPLCONFIGDIR
  value: /tmp/.config/matplotlib
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "offramp.otelResourceAttributes" -}}
{{- /* $(POD_NAME) and $(POD_NAMESPACE) are expanded by the kubelet from the variables above. */ -}}
{{- $attrs := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" (printf "service.instance.id=$(POD_NAME)") -}}
{{- range $k, $v := .Values.otel.resourceAttributes -}}
{{- $attrs = append $attrs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $attrs -}}
{{- end -}}

{{/*
Writable paths on a read-only root: /tmp (scratch), /tmp/ray (Ray session dir and logs; named
"ray-logs" because KubeRay's autoscaler sidecar mounts a volume of that name) and /dev/shm
(object store, memory medium). Argument: dict "shm" <size>.
*/}}
{{- define "offramp.volumes" -}}
- name: tmp
  emptyDir: {}
- name: ray-logs
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- with .tlsSecret }}
- name: channel-tls
  secret:
    secretName: {{ . }}
    defaultMode: 0400
{{- end }}
{{- end -}}

{{- define "offramp.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: ray-logs
  mountPath: /tmp/ray
- name: dshm
  mountPath: /dev/shm
{{- if .Values.channel.tls.secretName }}
- name: channel-tls
  mountPath: {{ include "offramp.channelTlsDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Where the stage channel's TLS Secret is mounted in every Ray container. */}}
{{- define "offramp.channelTlsDir" -}}/etc/offramp/channel-tls{{- end -}}

{{/* Pod metadata labels shared by every Ray pod of the release (NetworkPolicy selects on them). */}}
{{- define "offramp.podLabels" -}}
{{ include "offramp.selectorLabels" . }}
app.kubernetes.io/part-of: offramp
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The stages with stageDefaults merged in, as a JSON list (use: include ... | fromJsonArray). */}}
{{- define "offramp.stages" -}}
{{- $out := list -}}
{{- range .Values.stages -}}
{{- $out = append $out (mergeOverwrite (deepCopy $.Values.stageDefaults) (deepCopy .)) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
Cross-field checks that a JSON schema cannot express; each message names the values to fix.
*/}}
{{- define "offramp.validate" -}}
{{- $n := len .Values.stages -}}
{{- if not (or .Values.gpuWorkers.enabled .Values.cpuWorkers.enabled) -}}
{{- fail "gpuWorkers.enabled and cpuWorkers.enabled are both false: the head takes no work, enable at least one worker group" -}}
{{- end -}}
{{- if and .Values.split (ne (len .Values.split) (sub $n 1)) -}}
{{- fail (printf "split has %d entries but stages has %d: split needs len(stages) - 1 = %d split points" (len .Values.split) $n (sub $n 1)) -}}
{{- end -}}
{{- range $i, $s := include "offramp.stages" . | fromJsonArray -}}
{{- if and (eq $s.pool "gpu") (not $.Values.gpuWorkers.enabled) -}}
{{- fail (printf "stages[%d].pool is \"gpu\" but gpuWorkers.enabled is false: enable the GPU worker group or move the stage to pool \"cpu\"" $i) -}}
{{- end -}}
{{- if and (eq $s.pool "cpu") (not $.Values.cpuWorkers.enabled) -}}
{{- fail (printf "stages[%d].pool is \"cpu\" but cpuWorkers.enabled is false: enable the CPU worker group or move the stage to pool \"gpu\"" $i) -}}
{{- end -}}
{{- with $s.autoscaling -}}
{{- if gt (int .minReplicas) (int .maxReplicas) -}}
{{- fail (printf "stages[%d].autoscaling.minReplicas=%v is greater than maxReplicas=%v" $i .minReplicas .maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.ingress.pool "gpu") (not .Values.gpuWorkers.enabled) -}}
{{- fail "ingress.pool is \"gpu\" but gpuWorkers.enabled is false" -}}
{{- end -}}
{{- if and (eq .Values.ingress.pool "cpu") (not .Values.cpuWorkers.enabled) -}}
{{- fail "ingress.pool is \"cpu\" but cpuWorkers.enabled is false: set ingress.pool to \"gpu\" or \"any\"" -}}
{{- end -}}
{{- if and (eq .Values.exit.mode "threshold") (kindIs "invalid" .Values.exit.threshold) -}}
{{- fail "exit.mode is \"threshold\" but exit.threshold is not set; set exit.threshold (0..1)" -}}
{{- end -}}
{{- if and (eq .Values.exit.mode "speculative") (eq .Values.exit.kvFill "propagate") -}}
{{- fail "exit.mode is \"speculative\" but exit.kvFill is \"propagate\" (approximate K/V; speculative output is exact): set exit.kvFill to \"exact\" or exit.mode to \"calibrated\"" -}}
{{- end -}}
{{- range $g := list "gpuWorkers" "cpuWorkers" -}}
{{- $w := index $.Values $g -}}
{{- if and $w.enabled (gt (int $w.minReplicas) (int $w.maxReplicas)) -}}
{{- fail (printf "%s.minReplicas=%v is greater than %s.maxReplicas=%v" $g $w.minReplicas $g $w.maxReplicas) -}}
{{- end -}}
{{- if and $w.enabled (or (lt (int $w.replicas) (int $w.minReplicas)) (gt (int $w.replicas) (int $w.maxReplicas))) -}}
{{- fail (printf "%s.replicas=%v must lie between minReplicas=%v and maxReplicas=%v" $g $w.replicas $w.minReplicas $w.maxReplicas) -}}
{{- end -}}
{{- range $k, $_ := $w.rayStartParams -}}
{{- if has $k (list "num-cpus" "num-gpus" "memory" "resources" "labels") -}}
{{- fail (printf "%s.rayStartParams.%s is managed by the chart (pool resources and labels); remove it" $g $k) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $k, $_ := .Values.head.rayStartParams -}}
{{- if has $k (list "num-cpus" "resources" "labels") -}}
{{- fail (printf "head.rayStartParams.%s is managed by the chart (the head takes no work); remove it" $k) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Pod-level settings shared by head and worker groups. Argument: dict "root" $ "group" <group values> "isHead" <bool>. */}}
{{- /* Only the head's autoscaler sidecar talks to the Kubernetes API: no token elsewhere. */ -}}
{{- define "offramp.podSpecCommon" -}}
{{- $root := .root -}}
{{- $g := .group -}}
automountServiceAccountToken: {{ and $root.Values.rayAutoscaler.enabled (default false .isHead) }}
enableServiceLinks: false
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
