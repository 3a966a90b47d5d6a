{{/*
The Ray Serve config (ServeDeploySchema) of the release: RayService.spec.serveConfigV2.
It is the single source of truth shared with local runs: helm/serve_config.py extracts it
from `helm template` output into a file that `serve run` accepts unchanged.
Scalars go through toJson so strings are quoted and escaped (JSON is valid YAML).
*/}}

{{/* Per-deployment Serve settings. Argument: dict "d" <stage-or-ingress values> "name" <name> "root" $ */}}
{{- define "offramp.deployment" -}}
{{- $d := .d -}}
{{- $v := .root.Values -}}
- name: {{ .name }}
  {{- if $d.autoscaling }}
  autoscaling_config:
    min_replicas: {{ $d.autoscaling.minReplicas | int }}
    max_replicas: {{ $d.autoscaling.maxReplicas | int }}
    {{- with $d.autoscaling.initialReplicas }}
    initial_replicas: {{ . | int }}
    {{- end }}
    target_ongoing_requests: {{ $d.autoscaling.targetOngoingRequests | default 2 }}
    {{- with $d.autoscaling.upscaleDelayS }}
    upscale_delay_s: {{ . }}
    {{- end }}
    {{- if not (kindIs "invalid" $d.autoscaling.downscaleDelayS) }}
    downscale_delay_s: {{ $d.autoscaling.downscaleDelayS }}
    {{- end }}
  {{- else }}
  num_replicas: {{ $d.numReplicas | int }}
  {{- end }}
  max_ongoing_requests: {{ $d.maxOngoingRequests | int }}
  max_queued_requests: {{ $d.maxQueuedRequests | int }}
  ray_actor_options:
    num_cpus: {{ $d.numCpus }}
    {{- if and (eq $d.pool "gpu") (gt (int $v.gpuWorkers.gpusPerPod) 0) }}
    num_gpus: {{ $d.numGpus | default 1 }}
    {{- end }}
    {{- if has $d.pool (list "gpu" "cpu") }}
    resources:
      {{ printf "pool_%s" $d.pool }}: 1
    {{- end }}
    {{- with $d.memoryBytes }}
    memory: {{ . | int64 }}
    {{- end }}
{{- end -}}

{{- define "offramp.serveConfig" -}}
{{- $v := .Values -}}
{{- $stages := include "offramp.stages" . | fromJsonArray -}}
proxy_location: {{ $v.serve.proxyLocation }}
http_options:
  # 0.0.0.0 inside the pod; the NetworkPolicy and the ClusterIP Service bound who reaches it.
  host: 0.0.0.0
  port: {{ $v.serve.httpPort }}
  {{- with $v.serve.httpRequestTimeoutS }}
  request_timeout_s: {{ . }}
  {{- end }}
grpc_options:
  port: {{ $v.serve.grpcPort }}
  grpc_servicer_functions: {{ toJson $v.serve.grpcServicerFunctions }}
logging_config:
  encoding: {{ $v.serve.logEncoding }}
  log_level: {{ $v.serve.logLevel }}
{{- if $v.otel.serveTracing.enabled }}
tracing_config:
  enabled: true
  sampling_ratio: {{ $v.otel.samplingRatio }}
  {{- with $v.otel.serveTracing.exporterImportPath }}
  exporter_import_path: {{ toJson . }}
  {{- end }}
{{- end }}
applications:
  - name: {{ toJson $v.serve.appName }}
    route_prefix: {{ toJson $v.serve.routePrefix }}
    import_path: {{ toJson $v.serve.importPath }}
    args:
      model: {{ toJson $v.model.path }}
      model_name: {{ toJson $v.model.name }}
      num_stages: {{ len $stages }}
      {{- if $v.split }}
      split: {{ toJson $v.split }}
      {{- end }}
      stages:
      {{- range $stages }}
        - pool: {{ .pool }}
          dtype: {{ .dtype }}
          max_batch_size: {{ .maxBatchSize | int }}
          batch_wait_timeout_s: {{ .batchWaitTimeoutS }}
          max_sequences: {{ .maxSequences | int }}
          compile: {{ .compile | default false }}
      {{- end }}
      exit:
        mode: {{ $v.exit.mode }}
        threshold: {{ toJson $v.exit.threshold }}
        kv_fill: {{ $v.exit.kvFill }}
        max_draft: {{ $v.exit.maxDraft | default 6 | int }}
        draft_max_active: {{ toJson $v.exit.draftMaxActive }}
        gate_max_active: {{ toJson $v.exit.gateMaxActive }}
      max_context: {{ toJson $v.model.maxContext }}
      max_tokens_cap: {{ $v.model.maxTokensCap }}
      api_key_env: {{ toJson $v.apiKey.envName }}
      request_timeout_s: {{ $v.model.requestTimeoutS }}
      kv_lease_s: {{ $v.model.kvLeaseS | default 30 }}
      chain_forwarding: {{ ne $v.channel.chainForwarding false }}
      {{- if $v.channel.tls.secretName }}
      {{- $dir := include "offramp.channelTlsDir" . }}
      channel_tls:
        cert_file: {{ printf "%s/%s" $dir $v.channel.tls.certKey }}
        key_file: {{ printf "%s/%s" $dir $v.channel.tls.keyKey }}
        ca_file: {{ printf "%s/%s" $dir $v.channel.tls.caKey }}
      {{- end }}
      {{- if $v.placement.enabled }}
      {{- $p := $v.placement }}
      {{- /* ControllerConfig fields; no `app`: the ingress sets it to this app's name. */}}
      placement:
        interval_s: {{ $p.intervalS }}
        max_knob: {{ $p.maxKnob }}
        tpot_slo_s: {{ if $p.tpotSloMs }}{{ divf $p.tpotSloMs 1000 }}{{ else }}null{{ end }}
        slo_headroom: {{ $p.sloHeadroom }}
        target_utilisation: {{ $p.targetUtilisation }}
        max_replicas_per_stage: {{ $p.maxReplicasPerStage | int }}
        policy:
          dry_run: {{ $p.dryRun }}
        cost_per_replica_hour: {{ toJson $p.costPerReplicaHour }}
      {{- end }}
    deployments:
{{ include "offramp.deployment" (dict "d" $v.ingress "name" "OfframpIngress" "root" .) | indent 6 }}
      {{- range $i, $s := $stages }}
{{ include "offramp.deployment" (dict "d" $s "name" (printf "Stage%d" $i) "root" $) | indent 6 }}
      {{- end }}
{{- end -}}
