// Validates prometheus-operator custom resources (monitoring.coreos.com/v1
// ServiceMonitor and PrometheusRule) against the JSON schema that
// @kubernetes-models/prometheus-operator generates from the operator's API
// types, the same types its CRDs' OpenAPI schemas come from.
//
// Usage: node validate_crds.mjs NODE_MODULES_DIR < documents.json
// (a JSON array, as validate_k8s.py prints it). Documents of other API
// groups are skipped. Prints one line per validated document and exits 1
// naming the first invalid one and its field.
//
// Limits: like the API server's structural schemas, this schema does not
// reject unknown fields (the server prunes them), so the Rust test asserts
// the fields that matter (jobLabel, relabelings, ...) itself.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const KINDS = ["ServiceMonitor", "PrometheusRule"];

const [nodeModules] = process.argv.slice(2);
if (!nodeModules) {
  console.error("usage: node validate_crds.mjs NODE_MODULES_DIR < documents.json");
  process.exit(2);
}
const models = {};
for (const kind of KINDS) {
  const file = join(
    nodeModules,
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
    `${kind}.js`,
  );
  models[kind] = (await import(pathToFileURL(file).href))[kind];
}

const docs = JSON.parse(readFileSync(0, "utf8"));
let failed = false;
for (const doc of docs) {
  if (!String(doc.apiVersion).startsWith("monitoring.coreos.com/")) continue;
  const name = `${doc.kind} ${doc.metadata?.name ?? "?"}`;
  const Model = doc.apiVersion === "monitoring.coreos.com/v1" ? models[doc.kind] : undefined;
  if (!Model) {
    console.error(`${name}: ${doc.apiVersion} ${doc.kind} has no schema here`);
    failed = true;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`valid: ${name}`);
  } catch (e) {
    console.error(`${name}: ${e.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
