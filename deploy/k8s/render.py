#!/usr/bin/env python3
"""Render a kustomization of this repository without kustomize or kubectl (needs only PyYAML).

    python deploy/k8s/render.py deploy/k8s/overlays/gpu > gpu.yaml
    python deploy/k8s/render.py --compare "kubectl kustomize" deploy/k8s/base

Supports exactly the subset deploy/k8s uses: ``resources`` (manifest files and directories with a
kustomization), ``images`` (newName/newTag/digest) and ``patches`` given by ``path`` or inline ``patch``,
as JSON 6902 operation lists, selected by ``target`` (group/version/kind/name). Anything else in a
kustomization is an error, so the renderer never silently renders something kustomize would not.
scripts/test-container.sh uses it where no kustomize is installed and, where one is, checks that both
render the same objects (``--compare``).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "images", "patches"}


def _load_all(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    cur = doc
    for p in parts[:-1]:
        cur = cur[int(p)] if isinstance(cur, list) else cur[p]
    return cur, parts[-1]


def apply_json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for op in ops:
        kind = op["op"]
        parent, key = _parent(doc, _pointer(op["path"]))
        if kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if key == "-" else int(key), copy.deepcopy(op["value"]))
            else:
                parent[key] = copy.deepcopy(op["value"])
        elif kind == "replace":
            if isinstance(parent, list):
                parent[int(key)] = copy.deepcopy(op["value"])
            else:
                if key not in parent:
                    raise KeyError(f"replace: no {op['path']}")
                parent[key] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[int(key) if isinstance(parent, list) else key]
        else:
            raise ValueError(f"unsupported JSON 6902 op {kind!r}")
    return doc


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    want = {
        "group": group,
        "version": version,
        "kind": obj.get("kind"),
        "name": obj.get("metadata", {}).get("name"),
    }
    unsupported = set(target) - set(want)
    if unsupported:
        raise ValueError(f"unsupported patch target fields: {sorted(unsupported)}")
    return all(want[k] == v for k, v in target.items())


def _set_images(obj: dict[str, Any], images: list[dict[str, Any]]) -> None:
    spec = obj.get("spec", {}).get("template", {}).get("spec") or obj.get("spec", {})
    for key in ("initContainers", "containers"):
        for c in spec.get(key, []) or []:
            ref = c.get("image", "")
            name = ref.split("@")[0]
            if ":" in name.rsplit("/", 1)[-1]:
                name = name.rsplit(":", 1)[0]
            for img in images:
                if img["name"] != name:
                    continue
                new = img.get("newName", name)
                if "digest" in img:
                    c["image"] = f"{new}@{img['digest']}"
                elif "newTag" in img:
                    c["image"] = f"{new}:{img['newTag']}"
                else:
                    c["image"] = ref.replace(name, new, 1)


def render(directory: Path) -> list[dict[str, Any]]:
    kfile = next((directory / n for n in ("kustomization.yaml", "kustomization.yml", "Kustomization")
                  if (directory / n).is_file()), None)
    if kfile is None:
        raise FileNotFoundError(f"no kustomization in {directory}")
    k = yaml.safe_load(kfile.read_text(encoding="utf-8")) or {}
    extra = set(k) - SUPPORTED
    if extra:
        raise ValueError(f"{kfile}: fields this renderer does not support: {sorted(extra)}")
    objs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        p = (directory / res).resolve()
        objs.extend(render(p) if p.is_dir() else _load_all(p))
    for patch in k.get("patches", []):
        body = patch.get("patch")
        ops = yaml.safe_load(body) if body is not None else yaml.safe_load((directory / patch["path"]).read_text())
        if not isinstance(ops, list):
            raise ValueError(f"{kfile}: only JSON 6902 patches (operation lists) are supported")
        hits = [i for i, o in enumerate(objs) if _matches(o, patch.get("target", {}))]
        if not hits:
            raise ValueError(f"{kfile}: patch target {patch.get('target')} matches nothing")
        for i in hits:
            objs[i] = apply_json6902(objs[i], ops)
    images = k.get("images", [])
    for o in objs:
        _set_images(o, images)
    return objs


def _key(o: dict[str, Any]) -> tuple[str, str, str]:
    return (o.get("apiVersion", ""), o.get("kind", ""), o.get("metadata", {}).get("name", ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--compare", metavar="CMD", help="also run CMD DIRECTORY (a kustomize) and require the same objects")
    args = ap.parse_args(argv)
    objs = render(args.directory)
    if args.compare:
        out = subprocess.run([*shlex.split(args.compare), str(args.directory)], check=True,
                             capture_output=True, text=True).stdout
        theirs = {_key(o): o for o in yaml.safe_load_all(out) if o}
        ours = {_key(o): o for o in objs}
        if ours != theirs:
            for key in sorted(set(ours) | set(theirs)):
                if ours.get(key) != theirs.get(key):
                    print(f"differs: {key}\n  ours:   {json.dumps(ours.get(key), sort_keys=True)}\n"
                          f"  theirs: {json.dumps(theirs.get(key), sort_keys=True)}", file=sys.stderr)
            return 1
        print(f"{args.directory}: same {len(ours)} objects as `{args.compare}`", file=sys.stderr)
    yaml.safe_dump_all(objs, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
