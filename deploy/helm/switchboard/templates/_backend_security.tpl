{{/*
Credentials and TLS of the external backends, for the pods of the one service that uses
each (presence: Redis; routing: Kafka; storage and the migration Job: CQL). Passwords,
CA bundles and client certificates are Secrets mounted as files under
/etc/switchboard/secrets/<backend>-password and <backend>-tls, and the settings that
point at them (and Kafka's security protocol and SASL user) are environment overrides
of those pods only: the other services never see the Secrets, and their copy of the
shared configuration stays valid without the files.

Each helper takes (dict "root" $ "backend" "redis"|"kafka"|"scylla") and renders
nothing when the owning service does not use that backend.
*/}}

{{- define "switchboard.secretsDir" -}}/etc/switchboard/secrets{{- end -}}

{{/* The values block of a backend: presence.redis, routing.kafka or storage.scylla. */}}
{{- define "switchboard.backendValues" -}}
{{- $v := .root.Values -}}
{{- if eq .backend "redis" -}}{{- toYaml $v.presence.redis -}}
{{- else if eq .backend "kafka" -}}{{- toYaml $v.routing.kafka -}}
{{- else -}}{{- toYaml $v.storage.scylla -}}
{{- end -}}
{{- end -}}

{{/* "true" when the owning service runs on this backend. */}}
{{- define "switchboard.backendUsed" -}}
{{- $c := .root.Values.config -}}
{{- if or (and (eq .backend "redis") (eq $c.presence.backend "redis")) (and (eq .backend "kafka") (eq $c.routing.backend "kafka")) (and (eq .backend "scylla") (eq $c.storage.backend "scylla")) -}}true{{- end -}}
{{- end -}}

{{/* Settings prefixes: the environment override prefix and the file settings. */}}
{{- define "switchboard.backendSettings" -}}
{{- if eq .backend "redis" -}}
env: SWITCHBOARD_PRESENCE__
password: REDIS_PASSWORD_FILE
ca: REDIS_CA_FILE
cert: REDIS_CERT_FILE
key: REDIS_KEY_FILE
{{- else if eq .backend "kafka" -}}
env: SWITCHBOARD_ROUTING__
password: KAFKA_SASL_PASSWORD_FILE
ca: KAFKA_SSL_CA_FILE
cert: KAFKA_SSL_CERT_FILE
key: KAFKA_SSL_KEY_FILE
{{- else -}}
env: SWITCHBOARD_STORAGE__
password: SCYLLA_PASSWORD_FILE
ca: SCYLLA_CA_FILE
cert: SCYLLA_CERT_FILE
key: SCYLLA_KEY_FILE
{{- end -}}
{{- end -}}

{{- define "switchboard.backendEnv" -}}
{{- if include "switchboard.backendUsed" . -}}
{{- $b := include "switchboard.backendValues" . | fromYaml -}}
{{- $s := include "switchboard.backendSettings" . | fromYaml -}}
{{- $dir := include "switchboard.secretsDir" .root -}}
{{- if and (eq .backend "kafka") (ne $b.securityProtocol "plaintext") }}
- name: SWITCHBOARD_ROUTING__KAFKA_SECURITY_PROTOCOL
  value: {{ $b.securityProtocol | quote }}
{{- if hasPrefix "sasl_" $b.securityProtocol }}
- name: SWITCHBOARD_ROUTING__KAFKA_SASL_MECHANISM
  value: {{ $b.saslMechanism | quote }}
- name: SWITCHBOARD_ROUTING__KAFKA_SASL_USERNAME
  value: {{ $b.saslUsername | quote }}
{{- end }}
{{- end }}
{{- if and (eq .backend "scylla") $b.tls.enabled }}
- name: SWITCHBOARD_STORAGE__SCYLLA_TLS
  value: "true"
{{- end }}
{{- if $b.passwordSecret.name }}
- name: {{ $s.env }}{{ $s.password }}
  value: {{ printf "%s/%s-password/%s" $dir .backend $b.passwordSecret.key | quote }}
{{- end }}
{{- if $b.tls.existingSecret }}
- name: {{ $s.env }}{{ $s.ca }}
  value: {{ printf "%s/%s-tls/%s" $dir .backend $b.tls.caKey | quote }}
{{- if $b.tls.clientCert }}
- name: {{ $s.env }}{{ $s.cert }}
  value: {{ printf "%s/%s-tls/%s" $dir .backend $b.tls.certKey | quote }}
- name: {{ $s.env }}{{ $s.key }}
  value: {{ printf "%s/%s-tls/%s" $dir .backend $b.tls.keyKey | quote }}
{{- end }}
{{- end }}
{{- end -}}
{{- end -}}

{{- define "switchboard.backendMounts" -}}
{{- if include "switchboard.backendUsed" . -}}
{{- $b := include "switchboard.backendValues" . | fromYaml -}}
{{- $dir := include "switchboard.secretsDir" .root -}}
{{- if $b.passwordSecret.name }}
- name: {{ .backend }}-password
  mountPath: {{ $dir }}/{{ .backend }}-password
  readOnly: true
{{- end }}
{{- if $b.tls.existingSecret }}
- name: {{ .backend }}-tls
  mountPath: {{ $dir }}/{{ .backend }}-tls
  readOnly: true
{{- end }}
{{- end -}}
{{- end -}}

{{- define "switchboard.backendVolumes" -}}
{{- if include "switchboard.backendUsed" . -}}
{{- $b := include "switchboard.backendValues" . | fromYaml -}}
{{- if $b.passwordSecret.name }}
- name: {{ .backend }}-password
  secret:
    secretName: {{ $b.passwordSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ $b.passwordSecret.key }}
        path: {{ $b.passwordSecret.key }}
{{- end }}
{{- if $b.tls.existingSecret }}
- name: {{ .backend }}-tls
  secret:
    secretName: {{ $b.tls.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $b.tls.caKey }}
        path: {{ $b.tls.caKey }}
      {{- if $b.tls.clientCert }}
      - key: {{ $b.tls.certKey }}
        path: {{ $b.tls.certKey }}
      - key: {{ $b.tls.keyKey }}
        path: {{ $b.tls.keyKey }}
      {{- end }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* Checks of the backend values that the schema cannot express. */}}
{{- define "switchboard.validateBackendSecurity" -}}
{{- $v := .Values -}}
{{- range $backend := list "redis" "kafka" "scylla" -}}
{{- $b := include "switchboard.backendValues" (dict "root" $ "backend" $backend) | fromYaml -}}
{{- if and $b.tls.clientCert (not $b.tls.existingSecret) -}}
{{- fail (printf "switchboard: the %s client certificate (tls.clientCert) comes from tls.existingSecret, which is empty" $backend) -}}
{{- end -}}
{{- end -}}
{{- if and $v.presence.redis.tls.existingSecret (not (hasPrefix "rediss://" $v.config.presence.redis_url)) -}}
{{- fail "switchboard: presence.redis.tls needs a rediss:// config.presence.redis_url" -}}
{{- end -}}
{{- $k := $v.routing.kafka -}}
{{- if and $k.tls.existingSecret (not (hasSuffix "ssl" $k.securityProtocol)) -}}
{{- fail "switchboard: routing.kafka.tls needs routing.kafka.securityProtocol ssl or sasl_ssl" -}}
{{- end -}}
{{- if hasPrefix "sasl_" $k.securityProtocol -}}
{{- if not (and $k.saslMechanism $k.saslUsername $k.passwordSecret.name) -}}
{{- fail (printf "switchboard: routing.kafka.securityProtocol=%s needs routing.kafka.saslMechanism, saslUsername and passwordSecret.name" $k.securityProtocol) -}}
{{- end -}}
{{- else if $k.passwordSecret.name -}}
{{- fail "switchboard: routing.kafka.passwordSecret is the SASL password: set routing.kafka.securityProtocol to sasl_plaintext or sasl_ssl" -}}
{{- end -}}
{{- if and $v.storage.scylla.tls.existingSecret (not $v.storage.scylla.tls.enabled) -}}
{{- fail "switchboard: storage.scylla.tls.existingSecret needs storage.scylla.tls.enabled" -}}
{{- end -}}
{{- if and $v.storage.scylla.passwordSecret.name (not $v.config.storage.scylla_username) -}}
{{- fail "switchboard: storage.scylla.passwordSecret needs config.storage.scylla_username" -}}
{{- end -}}
{{- end -}}
