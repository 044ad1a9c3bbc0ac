"""Validates Kubernetes manifests against the OpenAPI schemas that the
kubernetes-validate package bundles (no network), then prints every document
as one JSON array on stdout for the caller's own checks.

Usage: python validate_k8s.py VERSION... < manifests.yaml

Each document whose apiVersion is one of Kubernetes' own groups is validated
strictly (unknown fields are errors) against every VERSION given, e.g.
1.30.0 1.37.0. Documents of other groups (custom resources such as
monitoring.coreos.com) are not validated here; their kinds are listed on
stderr so the caller knows what is left for it. Exits 1 on the first
invalid document, naming it, the Kubernetes version and the field.
"""

import json
import sys

import kubernetes_validate
import yaml

# API groups whose schemas are part of Kubernetes itself.
CORE_GROUPS = {
    "",
    "apps",
    "batch",
    "policy",
    "rbac.authorization.k8s.io",
    "networking.k8s.io",
    "scheduling.k8s.io",
    "storage.k8s.io",
    "autoscaling",
}


def group_of(api_version):
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def main(versions):
    if not versions:
        sys.exit("usage: validate_k8s.py VERSION... < manifests.yaml")
    docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]
    for doc in docs:
        api_version = doc.get("apiVersion", "")
        kind = doc.get("kind", "")
        name = doc.get("metadata", {}).get("name", "?")
        if group_of(api_version) not in CORE_GROUPS:
            print(f"not validated here: {api_version} {kind} {name}", file=sys.stderr)
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                sys.exit(f"{kind} {name}: invalid for Kubernetes {version} at {path or '(top)'}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                sys.exit(f"{kind} {name}: no schema in Kubernetes {version}: {e}")
            except kubernetes_validate.utils.VersionNotSupportedError:
                sys.exit(f"Kubernetes {version} is not bundled with this kubernetes-validate")
    json.dump(docs, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
