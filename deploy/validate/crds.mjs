// Validates Istio, Gateway API and prometheus-operator resources against the CRD schemas
// compiled into the @kubernetes-models packages, offline.
//
// Usage: node crds.mjs FILE...
import fs from "node:fs";
import yaml from "js-yaml";

const packages = {
  "networking.istio.io": "@kubernetes-models/istio/networking.istio.io",
  "security.istio.io": "@kubernetes-models/istio/security.istio.io",
  "telemetry.istio.io": "@kubernetes-models/istio/telemetry.istio.io",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator/monitoring.coreos.com",
  "gateway.networking.k8s.io": "@kubernetes-models/gateway-api/gateway.networking.k8s.io",
};

let failed = false;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, "utf8"))) {
    if (!doc) continue;
    const where = `${file}: ${doc.kind} ${doc.metadata?.name}`;
    const [group, version] = String(doc.apiVersion).split("/");
    if (!packages[group] || !version) {
      console.error(`${where}: no schema for ${doc.apiVersion}`);
      failed = true;
      continue;
    }
    let Model;
    try {
      Model = (await import(`${packages[group]}/${version}/${doc.kind}`))[doc.kind];
    } catch (e) {
      console.error(`${where}: no schema for ${doc.apiVersion} ${doc.kind} (${e.code ?? e.message})`);
      failed = true;
      continue;
    }
    try {
      new Model(doc).validate();
      console.log(`${where}: valid`);
    } catch (e) {
      console.error(`${where}: ${e.message}`);
      failed = true;
    }
  }
}
process.exit(failed ? 1 : 0);
