{{/*
The pod template shared by the four services: (dict "root" $ "component" "gateway").
*/}}

{{- define "switchboard.topologySpread" -}}
{{- $root := .root -}}
{{- $ts := $root.Values.topologySpread }}
- maxSkew: 1
  topologyKey: {{ $ts.zoneKey }}
  whenUnsatisfiable: {{ $ts.zoneWhenUnsatisfiable }}
  labelSelector:
    matchLabels:
      {{- include "switchboard.selectorLabels" . | nindent 6 }}
  {{- if .deployment }}
  matchLabelKeys: ["pod-template-hash"]
  {{- end }}
- maxSkew: 1
  topologyKey: {{ $ts.hostKey }}
  whenUnsatisfiable: {{ $ts.hostWhenUnsatisfiable }}
  labelSelector:
    matchLabels:
      {{- include "switchboard.selectorLabels" . | nindent 6 }}
  {{- if .deployment }}
  matchLabelKeys: ["pod-template-hash"]
  {{- end }}
{{- end -}}

{{- define "switchboard.podTemplate" -}}
{{- $root := .root -}}
{{- $comp := .component -}}
{{- $v := $root.Values -}}
{{- $w := index $v $comp -}}
{{- $ctx := dict "root" $root "component" $comp -}}
{{- $embedded := include "switchboard.embedded" $ctx -}}
{{- $persistent := and $embedded (ne $comp "presence") $w.persistence.enabled -}}
{{- $backend := get (dict "presence" "redis" "routing" "kafka" "storage" "scylla") $comp -}}
metadata:
  labels:
    {{- include "switchboard.labels" $ctx | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "switchboard.configChecksum" $root }}
    {{- if eq $comp "gateway" }}
    checksum/auth: {{ toJson $v.auth | sha256sum }}
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $w.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "switchboard.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if eq $comp "gateway" }}
  terminationGracePeriodSeconds: {{ include "switchboard.gatewayGraceSeconds" $root }}
  {{- else }}
  terminationGracePeriodSeconds: {{ $w.terminationGracePeriodSeconds }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- if and $w.topologySpread.enabled (not $embedded) }}
  topologySpreadConstraints:
    {{- include "switchboard.topologySpread" (dict "root" $root "component" $comp "deployment" true) | nindent 4 }}
  {{- end }}
  {{- with $w.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ $comp }}
      image: {{ include "switchboard.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args: [{{ $comp | quote }}]
      env:
        - name: SWITCHBOARD_CONFIG
          value: {{ include "switchboard.configDir" $root }}/switchboard.toml
        - name: SWITCHBOARD_CLUSTER__CREDENTIAL_FILE
          value: {{ include "switchboard.clusterCredentialDir" $root }}/{{ include "switchboard.clusterSecretKey" $root }}
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        {{- if $v.internalGrpc.listenOnPodIP }}
        # Internal gRPC on the pod network only, not every interface.
        - name: SWITCHBOARD_{{ upper $comp }}__GRPC_LISTEN
          value: "$(POD_IP):{{ include "switchboard.port" (dict "root" $root "component" $comp "port" "grpc") }}"
        {{- end }}
        {{- if eq $comp "gateway" }}
        # Routing and presence call Deliver on this address.
        - name: SWITCHBOARD_GATEWAY__ADVERTISE_URL
          value: "http://$(POD_IP):{{ include "switchboard.port" (dict "root" $root "component" "gateway" "port" "grpc") }}"
        {{- end }}
        {{- with $backend }}
        {{- include "switchboard.backendEnv" (dict "root" $root "backend" .) | nindent 8 }}
        {{- end }}
        {{- include "switchboard.telemetryEnv" $root | nindent 8 }}
        {{- with $w.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        {{- if eq $comp "gateway" }}
        - name: http
          containerPort: {{ include "switchboard.port" (dict "root" $root "component" $comp "port" "http") }}
          protocol: TCP
        {{- end }}
        - name: grpc
          containerPort: {{ include "switchboard.port" (dict "root" $root "component" $comp "port" "grpc") }}
          protocol: TCP
        - name: admin
          containerPort: {{ include "switchboard.port" (dict "root" $root "component" $comp "port" "admin") }}
          protocol: TCP
      startupProbe:
        httpGet:
          path: /healthz
          port: admin
        periodSeconds: {{ $v.probes.startup.periodSeconds }}
        failureThreshold: {{ $v.probes.startup.failureThreshold }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: admin
        periodSeconds: {{ $v.probes.liveness.periodSeconds }}
        timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
        failureThreshold: {{ $v.probes.liveness.failureThreshold }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: admin
        periodSeconds: {{ $v.probes.readiness.periodSeconds }}
        timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds }}
        failureThreshold: {{ $v.probes.readiness.failureThreshold }}
      {{- if eq $comp "gateway" }}
      lifecycle:
        # Keep serving while Services and load balancers drop this pod, then SIGTERM
        # starts the drain (goaway to every client, up to drain_deadline_ms).
        preStop:
          sleep:
            seconds: {{ $w.preStopSleepSeconds }}
      {{- end }}
      resources:
        {{- toYaml $w.resources | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: {{ include "switchboard.configDir" $root }}
          readOnly: true
        - name: tmp
          mountPath: /tmp
        - name: data
          mountPath: {{ include "switchboard.dataDir" $root }}
        - name: cluster-credential
          mountPath: {{ include "switchboard.clusterCredentialDir" $root }}
          readOnly: true
        {{- if eq $comp "gateway" }}
        - name: auth
          mountPath: {{ include "switchboard.authDir" $root }}
          readOnly: true
        {{- end }}
        {{- with $backend }}
        {{- include "switchboard.backendMounts" (dict "root" $root "backend" .) | nindent 8 }}
        {{- end }}
        {{- include "switchboard.telemetryMounts" $root | nindent 8 }}
  volumes:
    - name: config
      configMap:
        name: {{ include "switchboard.fullname" $root }}-config
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
    - name: cluster-credential
      secret:
        secretName: {{ include "switchboard.clusterSecretName" $root }}
        defaultMode: 0440
        items:
          - key: {{ include "switchboard.clusterSecretKey" $root }}
            path: {{ include "switchboard.clusterSecretKey" $root }}
    {{- if not $persistent }}
    - name: data
      emptyDir:
        sizeLimit: 1Gi
    {{- end }}
    {{- if eq $comp "gateway" }}
    - name: auth
      secret:
        secretName: {{ include "switchboard.authSecretName" $root }}
        defaultMode: 0440
        items:
          - key: {{ include "switchboard.authKey" $root }}
            path: {{ include "switchboard.authKey" $root }}
    {{- end }}
    {{- with $backend }}
    {{- include "switchboard.backendVolumes" (dict "root" $root "backend" .) | nindent 4 }}
    {{- end }}
    {{- include "switchboard.telemetryVolumes" $root | nindent 4 }}
{{- end -}}
