"""``python -m service.contract``: print the app's OpenAPI document as YAML (the checked-in contract)."""

from __future__ import annotations

import sys
from typing import Any

import yaml

__all__ = ["contract", "dump"]


def contract() -> dict[str, Any]:
    from .app import create_app
    from .server.settings import Settings

    return create_app(Settings(warmup=False)).openapi()


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True, width=100)


if __name__ == "__main__":
    sys.stdout.write(dump(contract()))
