"""``import surrogate_client`` needs neither PyTorch nor JAX; the adapters import them when used."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import sys

    class Blocker:
        blocked = {"torch", "jax", "jaxlib"}

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_import_surrogate_client_needs_neither_torch_nor_jax():
    proc = _run(
        """
        import surrogate_client
        from surrogate_client import SurrogateClient, ValidationError
        assert not {"torch", "jax", "jaxlib"} & set(sys.modules), sorted(sys.modules)
        print("ok", surrogate_client.__version__)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok ")


def test_the_adapters_import_their_framework():
    for module, framework in (("surrogate_client.torch", "torch"), ("surrogate_client.jax", "jax")):
        proc = _run(f"import {module}")
        assert proc.returncode != 0
        assert f"{framework} is blocked in this test" in proc.stderr
