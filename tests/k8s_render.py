"""A small kustomize, for the tests of deploy/k8s without a kustomize binary: resources
(files and directories), components, `namespace`, `images`, and `patches` (strategic merge
patches, and JSON 6902 patches with a target). Anything else in a kustomization is refused, so
the manifests cannot quietly use a feature this renderer gets wrong; tests/test_k8s.py checks it
against `kubectl kustomize` where kubectl is installed."""

import copy
from pathlib import Path

import yaml

KNOWN = {"apiVersion", "kind", "namespace", "resources", "components", "images", "patches"}
CLUSTER_SCOPED = {"Namespace"}
# strategic merge: the lists merged item by item, and their keys (Kubernetes' patchMergeKey)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def render(folder: Path) -> list[dict]:
    """The objects `kustomize build folder` makes."""
    folder = Path(folder)
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(k) - KNOWN
    assert not unknown, f"{folder}: the test renderer does not do {sorted(unknown)}"
    objects = []
    for entry in k.get("resources", []):
        path = folder / entry
        objects += render(path) if path.is_dir() else load(path)
    for entry in k.get("components", []):
        objects = apply_component(objects, folder / entry)
    return transform(objects, k, folder)


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def apply_component(objects: list[dict], folder: Path) -> list[dict]:
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert k["kind"] == "Component", f"{folder} is not a Component"
    unknown = set(k) - KNOWN
    assert not unknown, f"{folder}: the test renderer does not do {sorted(unknown)}"
    added = [o for r in k.get("resources", []) for o in load(folder / r)]
    return transform(objects + added, k, folder)


def transform(objects: list[dict], k: dict, folder: Path) -> list[dict]:
    objects = copy.deepcopy(objects)
    for entry in k.get("patches", []):
        patch = yaml.safe_load(
            entry["patch"] if "patch" in entry else (folder / entry["path"]).read_text()
        )
        objects = [apply_patch(o, patch, entry.get("target")) for o in objects]
    if "namespace" in k:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        for o in objects:
            for c in containers(o):
                c["image"] = retag(c["image"], image)
    return objects


def matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    have = {
        "group": group,
        "version": version,
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
    }
    return all(have[key] == value for key, value in target.items())


def apply_patch(obj: dict, patch, target: dict | None) -> dict:
    if isinstance(patch, list):  # JSON 6902
        assert target, "a JSON 6902 patch needs a target"
        return json6902(obj, patch) if matches(obj, target) else obj
    target = target or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
    return strategic_merge(obj, patch) if matches(obj, target) else obj


def strategic_merge(base, patch, key: str | None = None):
    if isinstance(patch, dict) and isinstance(base, dict):
        assert not any(k.startswith("$") for k in patch), "no $patch directives here"
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = strategic_merge(base.get(k), v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(patch, list) and isinstance(base, list) and key in MERGE_KEYS:
        # kustomize's order: the patch's items first, then the base's others
        mk = MERGE_KEYS[key]
        olds = {item[mk]: item for item in base}
        merged = [
            strategic_merge(olds[p[mk]], p) if p[mk] in olds else copy.deepcopy(p) for p in patch
        ]
        return merged + [b for b in base if b[mk] not in {p[mk] for p in patch}]
    return copy.deepcopy(patch)


def json6902(obj: dict, ops: list[dict]) -> dict:
    obj = copy.deepcopy(obj)
    for op in ops:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")
        ]
        node = obj
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if op["op"] == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif op["op"] == "replace":
                node[index] = copy.deepcopy(op["value"])
            elif op["op"] == "remove":
                del node[index]
            elif op["op"] == "test":
                assert node[index] == op["value"], op
            else:
                raise AssertionError(f"the test renderer does not do {op['op']}")
        elif op["op"] in ("add", "replace"):
            assert op["op"] == "add" or last in node, f"replace of a missing {op['path']}"
            node[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[last]
        elif op["op"] == "test":
            assert node[last] == op["value"], op
        else:
            raise AssertionError(f"the test renderer does not do {op['op']}")
    return obj


def containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def retag(image: str, rule: dict) -> str:
    name, tag = image, None
    if ":" in image.rsplit("/", 1)[-1]:
        name, tag = image.rsplit(":", 1)
    if name != rule["name"]:
        return image
    tag = rule.get("newTag", tag)
    return rule.get("newName", name) + (f":{tag}" if tag else "")
