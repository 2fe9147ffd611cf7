"""Plugin discovery: built-ins, entry points, the off switch, blocking, and plugins that fail."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import bad_kernels
from core import dispatcher
from registry import Kernel, loader
from registry.kernel import signature_problem


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch, tmp_path):
    monkeypatch.setenv("SWITCHYARD_CACHE_DIR", str(tmp_path / "cache"))
    yield
    for name in list(loader._extra):
        loader._extra.pop(name)
    loader.reload()


def _record(reg, name):
    return next(p for p in reg.plugins if p.name == name)


def test_builtins_load_in_order_with_versions():
    reg = loader.reload()
    names = [p.name for p in reg.plugins]
    assert names[:3] == ["reference", "torch", "fused"]
    for name in ("reference", "torch", "fused"):
        rec = _record(reg, name)
        assert rec.status == "loaded" and rec.version and rec.source.startswith("builtin")
    assert reg.reference("attention").backend == "reference"
    priorities = [k.priority for k in reg.kernels_for("attention")]
    assert priorities == sorted(priorities, reverse=True)


@pytest.mark.parametrize("plugin, message", [
    (bad_kernels.RaisingHookPlugin(), "the hook itself raised"),
    (bad_kernels.MisspelledHookPlugin(), "switchyard_kernel"),
    (bad_kernels.UnknownOpPlugin(), "unknown op 'no_such_op'"),
    (bad_kernels.BadSignaturePlugin(), "cannot be called as (q, k, v, *, causal"),
])
def test_failing_plugin_is_recorded_and_others_keep_working(plugin, message, gen):
    with pytest.warns(loader.PluginWarning, match="failed to load"):
        reg = loader.add_plugin(plugin, "broken")
    rec = _record(reg, "broken")
    assert rec.status == "failed" and message in rec.error and not rec.kernels
    assert _record(reg, "torch").status == "loaded"
    q = torch.randn(1, 2, 8, 4, generator=gen)
    out = dispatcher.attention(q, q, q)
    assert out.shape == q.shape
    assert any(message in p for p in dispatcher.explain("attention", q, q, q).failed_plugins)


def test_signature_problem_names_the_kernel():
    k = Kernel(op="attention", backend="x", fn=lambda q, k, v, *, causal: q)
    problem = signature_problem(k, ("q", "k", "v"), ("causal", "scale", "attn_mask", "return_lse"))
    assert problem and "kernel 'x' for op 'attention'" in problem


def _fake_distribution(tmp_path, name, target):
    """A real (if tiny) installed distribution with an entry point in the switchyard group."""
    dist = tmp_path / f"{name}-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text(f"[switchyard]\n{name} = {target}\n")
    return tmp_path


def _in_subprocess(code, path, env_extra=None):
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")]))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120)


LIST = """
    import warnings
    warnings.simplefilter("ignore")
    from registry import loader
    for p in loader.get_registry().plugins:
        print(p.name, p.status, p.version, "|", p.error)
"""


def test_entry_point_import_failure_recorded(tmp_path):
    path = _fake_distribution(tmp_path, "brokenpkg", "no_such_module_for_switchyard.plugin")
    out = _in_subprocess(LIST, path)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("brokenpkg"))
    assert "failed 1.2.3" in line and "import failed: ModuleNotFoundError" in line
    assert "torch loaded" in out.stdout


def test_autoload_switch_and_block_list(tmp_path):
    path = _fake_distribution(tmp_path, "brokenpkg", "no_such_module_for_switchyard.plugin")
    off = _in_subprocess(LIST, path, {"SWITCHYARD_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert "brokenpkg" not in off.stdout and "reference loaded" in off.stdout
    blocked = _in_subprocess(LIST, path, {"SWITCHYARD_BLOCK": "brokenpkg,torch"})
    assert "brokenpkg blocked" in blocked.stdout and "torch blocked" in blocked.stdout
    assert "fused loaded" in blocked.stdout


def test_duplicate_plugin_name_fails(gen):
    with pytest.warns(loader.PluginWarning, match="already loaded"):
        reg = loader.add_plugin(bad_kernels.BadPlugin(), "torch")
    assert [p.status for p in reg.plugins if p.name == "torch"] == ["loaded", "failed"]


def test_kernel_reasons_are_data():
    reg = loader.get_registry()
    sdpa = next(k for k in reg.kernels_for("attention") if k.backend == "torch-sdpa")
    q = torch.randn(1, 1, 4, 8)
    assert sdpa.not_supported_reasons(q, q, q) == []
    reasons = sdpa.not_supported_reasons(q, q, q, return_lse=True)
    assert any("log-sum-exp" in r for r in reasons)
    acme_like = Kernel(op="attention", backend="only-f64", fn=lambda *a, **k: None, devices={"cuda"}, dtypes={torch.float64})
    reasons = acme_like.not_supported_reasons(q, q, q)
    assert any("device 'cpu'" in r for r in reasons) and any("float32" in r for r in reasons)
