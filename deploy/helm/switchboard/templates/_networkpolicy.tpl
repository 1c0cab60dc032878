{{/* Peers and rules shared by the NetworkPolicies. */}}

{{- define "switchboard.np.pods" -}}
- podSelector:
    matchLabels:
      {{- include "switchboard.selectorLabels" . | nindent 6 }}
{{- end }}
{{- define "switchboard.np.dns" -}}
- to:
    {{- toYaml .Values.networkPolicy.dns.to | nindent 4 }}
  ports:
    {{- range .Values.networkPolicy.dns.ports }}
    - port: {{ . }}
      protocol: UDP
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}
{{- define "switchboard.np.external" -}}
- {{- with .to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    {{- range .ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}
{{- define "switchboard.np.metrics" -}}
- from:
    {{- toYaml .root.Values.networkPolicy.metricsFrom | nindent 4 }}
  ports:
    - port: {{ include "switchboard.port" (dict "root" .root "component" .component "port" "admin") }}
      protocol: TCP
{{- end }}
