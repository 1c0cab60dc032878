{{/*
Names, labels, ports, the rendered configuration file and the checks that refuse a
misconfigured release.
*/}}

{{- define "switchboard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "switchboard.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "switchboard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The services and their fixed ports (the binary's documented defaults). */}}
{{- define "switchboard.ports" -}}
gateway: {grpc: 50051, admin: 9191, http: 8080}
presence: {grpc: 50052, admin: 9192}
routing: {grpc: 50053, admin: 9193}
storage: {grpc: 50054, admin: 9194}
{{- end -}}

{{/* (dict "root" $ "component" "gateway" "port" "grpc") -> the port number */}}
{{- define "switchboard.port" -}}
{{- $ports := include "switchboard.ports" .root | fromYaml -}}
{{- index (index $ports .component) .port -}}
{{- end -}}

{{/* (dict "root" $ "component" "x") -> selector labels */}}
{{- define "switchboard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchboard.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* (dict "root" $ "component" "x") -> all labels */}}
{{- define "switchboard.labels" -}}
helm.sh/chart: {{ include "switchboard.chart" .root }}
{{ include "switchboard.selectorLabels" . }}
app.kubernetes.io/part-of: switchboard
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{/* (dict "root" $ "component" "x") -> the Service name of a component */}}
{{- define "switchboard.serviceName" -}}
{{- printf "%s-%s" (include "switchboard.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "switchboard.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "switchboard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "switchboard.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
(dict "root" $ "component" "x") -> "true" when the component runs an embedded backend
(state in the process or on its own disk: one replica, no autoscaling).
*/}}
{{- define "switchboard.embedded" -}}
{{- $c := .root.Values.config -}}
{{- if and (eq .component "presence") (eq $c.presence.backend "memory") -}}true
{{- else if and (eq .component "routing") (eq $c.routing.backend "embedded") -}}true
{{- else if and (eq .component "storage") (eq $c.storage.backend "sqlite") -}}true
{{- end -}}
{{- end -}}

{{/* "true" when the migration hook Job is rendered. */}}
{{- define "switchboard.migrationJob" -}}
{{- if and .Values.migrations.enabled (eq .Values.config.storage.backend "scylla") -}}true{{- end -}}
{{- end -}}

{{/* The gateway's drain deadline in whole seconds (rounded up). */}}
{{- define "switchboard.drainSeconds" -}}
{{- $ms := int64 .Values.config.gateway.drain_deadline_ms -}}
{{- div (add $ms 999) 1000 -}}
{{- end -}}

{{/* The gateway's terminationGracePeriodSeconds: given, or computed from the drain. */}}
{{- define "switchboard.gatewayGraceSeconds" -}}
{{- $g := .Values.gateway -}}
{{- if kindIs "invalid" $g.terminationGracePeriodSeconds -}}
{{- add (int64 $g.preStopSleepSeconds) (include "switchboard.drainSeconds" . | int64) (int64 $g.shutdownMarginSeconds) -}}
{{- else -}}
{{- int64 $g.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* Auth: the Secret's name, the key inside it, and the setting that points at it. */}}
{{- define "switchboard.authSecretName" -}}
{{- default (printf "%s-auth" (include "switchboard.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "switchboard.authDefaultKey" -}}
{{- $keys := dict "hs256" "hs256-secret" "publicKey" "public-key.pem" "jwks" "jwks.json" -}}
{{- index $keys .Values.auth.mode -}}
{{- end -}}

{{- define "switchboard.authKey" -}}
{{- if .Values.auth.existingSecret -}}
{{- default (include "switchboard.authDefaultKey" .) .Values.auth.existingSecretKey -}}
{{- else -}}
{{- include "switchboard.authDefaultKey" . -}}
{{- end -}}
{{- end -}}

{{- define "switchboard.authSetting" -}}
{{- $settings := dict "hs256" "hs256_secret_file" "publicKey" "public_key_file" "jwks" "jwks_file" -}}
{{- index $settings .Values.auth.mode -}}
{{- end -}}

{{/* The cluster credential: its Secret, the key inside it and where pods read it. */}}
{{- define "switchboard.clusterSecretName" -}}
{{- default (printf "%s-cluster" (include "switchboard.fullname" .)) .Values.clusterCredential.existingSecret -}}
{{- end -}}

{{- define "switchboard.clusterSecretKey" -}}
{{- if .Values.clusterCredential.existingSecret -}}
{{- default "credential" .Values.clusterCredential.existingSecretKey -}}
{{- else -}}
credential
{{- end -}}
{{- end -}}

{{- define "switchboard.clusterCredentialDir" -}}/etc/switchboard/secrets/cluster{{- end -}}

{{- define "switchboard.authDir" -}}/etc/switchboard/auth{{- end -}}
{{- define "switchboard.configDir" -}}/etc/switchboard/config{{- end -}}
{{- define "switchboard.dataDir" -}}/var/lib/switchboard{{- end -}}

{{/* One TOML value: strings as JSON strings (valid TOML basic strings), whole numbers as integers. */}}
{{- define "switchboard.tomlValue" -}}
{{- if kindIs "string" . -}}
{{- toJson . -}}
{{- else if kindIs "bool" . -}}
{{- ternary "true" "false" . -}}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) -}}
{{- if eq (float64 .) (float64 (int64 .)) -}}{{- int64 . -}}{{- else -}}{{- . -}}{{- end -}}
{{- else if or (kindIs "int" .) (kindIs "int64" .) -}}
{{- . -}}
{{- else -}}
{{- fail (printf "switchboard: cannot render %v as a TOML value" .) -}}
{{- end -}}
{{- end -}}

{{/* The complete configuration as a dict: values.config plus what the chart owns. */}}
{{- define "switchboard.configDict" -}}
{{- $c := deepCopy .Values.config -}}
{{- $ns := .Release.Namespace -}}
{{- $_ := set $c "data_dir" (include "switchboard.dataDir" .) -}}
{{- $auth := $c.auth -}}
{{- $_ := set $auth (include "switchboard.authSetting" .) (printf "%s/%s" (include "switchboard.authDir" .) (include "switchboard.authKey" .)) -}}
{{- $cluster := $c.cluster -}}
{{- range $comp := list "presence" "routing" "storage" -}}
{{- $_ := set $cluster (printf "%s_url" $comp) (printf "http://%s.%s.svc:%s" (include "switchboard.serviceName" (dict "root" $ "component" $comp)) $ns (include "switchboard.port" (dict "root" $ "component" $comp "port" "grpc"))) -}}
{{- end -}}
{{- range $comp := list "gateway" "presence" "routing" "storage" -}}
{{- $section := index $c $comp -}}
{{- $_ := set $section "grpc_listen" (printf "0.0.0.0:%s" (include "switchboard.port" (dict "root" $ "component" $comp "port" "grpc"))) -}}
{{- $_ := set $section "admin_listen" (printf "0.0.0.0:%s" (include "switchboard.port" (dict "root" $ "component" $comp "port" "admin"))) -}}
{{- end -}}
{{- $_ := set $c.gateway "listen" (printf "0.0.0.0:%s" (include "switchboard.port" (dict "root" $ "component" "gateway" "port" "http"))) -}}
{{- $_ := set $c.storage "migrate_on_start" (not (include "switchboard.migrationJob" .)) -}}
{{- toYaml $c -}}
{{- end -}}

{{/* switchboard.toml */}}
{{- define "switchboard.configToml" -}}
{{- $c := include "switchboard.configDict" . | fromYaml -}}
# Switchboard configuration rendered by the Helm chart from values.config.
# Overridden in the pods by: SWITCHBOARD_GATEWAY__ADVERTISE_URL (pod IP), the gRPC
# listener (pod IP), the cluster credential file (a mounted Secret), and in the pods of
# the service owning a backend by its credential and TLS settings (files of mounted
# Secrets, Kafka's security protocol and SASL user).
{{- range $k, $v := $c }}
{{- if not (kindIs "map" $v) }}
{{ $k }} = {{ include "switchboard.tomlValue" $v }}
{{- end }}
{{- end }}
{{- range $section, $table := $c }}
{{- if kindIs "map" $table }}

[{{ $section }}]
{{- range $k, $v := $table }}
{{ $k }} = {{ include "switchboard.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end }}
{{ end -}}

{{/* The checksum that rolls every workload when the configuration changes. */}}
{{- define "switchboard.configChecksum" -}}
{{- include "switchboard.configToml" . | sha256sum -}}
{{- end -}}

{{/*
Checks that the schema cannot express. Included by every workload template so a bad
release fails to render instead of half-working.
*/}}
{{- define "switchboard.validate" -}}
{{- $v := .Values -}}
{{- range $comp := list "presence" "routing" "storage" -}}
{{- $w := index $v $comp -}}
{{- if include "switchboard.embedded" (dict "root" $ "component" $comp) -}}
{{- $backend := index (index $v.config $comp) "backend" -}}
{{- if ne (int64 $w.replicas) 1 -}}
{{- fail (printf "switchboard: %s.replicas must be 1 with config.%s.backend=%s (its state lives in one process); use the shared backend to run more" $comp $comp $backend) -}}
{{- end -}}
{{- if $w.autoscaling.enabled -}}
{{- fail (printf "switchboard: %s.autoscaling.enabled must be false with config.%s.backend=%s (its state lives in one process)" $comp $comp $backend) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $drain := include "switchboard.drainSeconds" . | int64 -}}
{{- $grace := include "switchboard.gatewayGraceSeconds" . | int64 -}}
{{- $needed := add (int64 $v.gateway.preStopSleepSeconds) $drain -}}
{{- if le $grace $needed -}}
{{- fail (printf "switchboard: gateway.terminationGracePeriodSeconds (%d) must be greater than gateway.preStopSleepSeconds (%d) + config.gateway.drain_deadline_ms in seconds (%d), or the kubelet kills gateways before their clients have moved" $grace (int64 $v.gateway.preStopSleepSeconds) $drain) -}}
{{- end -}}
{{- if and (ne $v.auth.mode "hs256") (not $v.auth.existingSecret) -}}
{{- if and (eq $v.auth.mode "publicKey") (not $v.auth.publicKey) -}}
{{- fail "switchboard: auth.mode=publicKey needs auth.publicKey (PEM) or auth.existingSecret" -}}
{{- end -}}
{{- if and (eq $v.auth.mode "jwks") (not $v.auth.jwks) -}}
{{- fail "switchboard: auth.mode=jwks needs auth.jwks (JSON) or auth.existingSecret" -}}
{{- end -}}
{{- end -}}
{{- include "switchboard.validateBackendSecurity" . -}}
{{- include "switchboard.validateTelemetry" . -}}
{{- if and $v.tests.smoke.enabled (ne $v.auth.mode "hs256") -}}
{{- fail "switchboard: tests.smoke needs auth.mode=hs256 (the harness signs its own tokens with the mounted secret)" -}}
{{- end -}}
{{- end -}}
