{{/*
Trace export of every pod (config.telemetry): the TLS material of an https:// collector
and the export headers come from Secrets you manage, mounted under
/etc/switchboard/secrets/otlp-tls and otlp-headers, and the settings that point at
them are environment overrides (telemetry.otlp_ca_file, otlp_cert_file, otlp_key_file,
otlp_headers_file). Each helper takes the root context.
*/}}

{{- define "switchboard.telemetryEnv" -}}
{{- $t := .Values.telemetry.otlp -}}
{{- $dir := include "switchboard.secretsDir" . -}}
{{- if $t.tls.existingSecret }}
- name: SWITCHBOARD_TELEMETRY__OTLP_CA_FILE
  value: {{ printf "%s/otlp-tls/%s" $dir $t.tls.caKey | quote }}
{{- if $t.tls.clientCert }}
- name: SWITCHBOARD_TELEMETRY__OTLP_CERT_FILE
  value: {{ printf "%s/otlp-tls/%s" $dir $t.tls.certKey | quote }}
- name: SWITCHBOARD_TELEMETRY__OTLP_KEY_FILE
  value: {{ printf "%s/otlp-tls/%s" $dir $t.tls.keyKey | quote }}
{{- end }}
{{- end }}
{{- if $t.headersSecret.name }}
- name: SWITCHBOARD_TELEMETRY__OTLP_HEADERS_FILE
  value: {{ printf "%s/otlp-headers/%s" $dir $t.headersSecret.key | quote }}
{{- end }}
{{- end -}}

{{- define "switchboard.telemetryMounts" -}}
{{- $t := .Values.telemetry.otlp -}}
{{- $dir := include "switchboard.secretsDir" . -}}
{{- if $t.tls.existingSecret }}
- name: otlp-tls
  mountPath: {{ $dir }}/otlp-tls
  readOnly: true
{{- end }}
{{- if $t.headersSecret.name }}
- name: otlp-headers
  mountPath: {{ $dir }}/otlp-headers
  readOnly: true
{{- end }}
{{- end -}}

{{- define "switchboard.telemetryVolumes" -}}
{{- $t := .Values.telemetry.otlp -}}
{{- if $t.tls.existingSecret }}
- name: otlp-tls
  secret:
    secretName: {{ $t.tls.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $t.tls.caKey }}
        path: {{ $t.tls.caKey }}
      {{- if $t.tls.clientCert }}
      - key: {{ $t.tls.certKey }}
        path: {{ $t.tls.certKey }}
      - key: {{ $t.tls.keyKey }}
        path: {{ $t.tls.keyKey }}
      {{- end }}
{{- end }}
{{- if $t.headersSecret.name }}
- name: otlp-headers
  secret:
    secretName: {{ $t.headersSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ $t.headersSecret.key }}
        path: {{ $t.headersSecret.key }}
{{- end }}
{{- end -}}

{{/* Egress to the collector, when traces are exported. */}}
{{- define "switchboard.np.otlp" -}}
{{- if .Values.config.telemetry.otlp_endpoint }}
{{- include "switchboard.np.external" .Values.networkPolicy.otlp }}
{{- end }}
{{- end -}}

{{/* Checks of the telemetry values that the schema cannot express. */}}
{{- define "switchboard.validateTelemetry" -}}
{{- $t := .Values.telemetry.otlp -}}
{{- $endpoint := .Values.config.telemetry.otlp_endpoint -}}
{{- if and $t.tls.clientCert (not $t.tls.existingSecret) -}}
{{- fail "switchboard: the collector's client certificate (telemetry.otlp.tls.clientCert) comes from telemetry.otlp.tls.existingSecret, which is empty" -}}
{{- end -}}
{{- if and $t.tls.existingSecret (not (hasPrefix "https://" $endpoint)) -}}
{{- fail "switchboard: telemetry.otlp.tls needs an https:// config.telemetry.otlp_endpoint" -}}
{{- end -}}
{{- if and $t.headersSecret.name (not $endpoint) -}}
{{- fail "switchboard: telemetry.otlp.headersSecret needs config.telemetry.otlp_endpoint" -}}
{{- end -}}
{{- end -}}
