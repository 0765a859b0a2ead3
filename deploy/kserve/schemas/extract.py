#!/usr/bin/env python3
"""Extract the OpenAPI schemas of KServe's CRDs, which the tests validate deploy/kserve against.

    python deploy/kserve/schemas/extract.py DIR

DIR holds the CRD files of the KServe release that SOURCE.json names (``config/crd/full/...`` of the
release's tag, e.g. from a checkout: ``git -C kserve show v0.20.0:config/crd/full/FILE > DIR/FILE``).
Each file must have the sha256 SOURCE.json records; the served version's ``openAPIV3Schema`` is
written unchanged, as JSON (keys sorted), to the file SOURCE.json names beside this script, and
SOURCE.json gets that file's sha256. Needs only PyYAML.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "SOURCE.json"


def schema_text(crd: dict, version: str) -> str:
    """The ``openAPIV3Schema`` of ``version`` of a CRD, as the vendored JSON text."""
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return json.dumps(entry["schema"]["openAPIV3Schema"], sort_keys=True, separators=(",", ":")) + "\n"


def main(directory: Path) -> None:
    source = json.loads(SOURCE.read_text(encoding="utf-8"))
    for item in source["schemas"]:
        raw = (directory / Path(item["crd"]).name).read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != item["crd_sha256"]:
            sys.exit(f"{item['crd']}: sha256 {digest}, SOURCE.json records {item['crd_sha256']} ({source['release']})")
        crd = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert crd["spec"]["names"]["kind"] == item["kind"], (crd["spec"]["names"]["kind"], item["kind"])
        text = schema_text(crd, item["version"])
        (HERE / item["schema"]).write_text(text, encoding="utf-8")
        item["schema_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        print(item["schema"], item["schema_sha256"])
    SOURCE.write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
