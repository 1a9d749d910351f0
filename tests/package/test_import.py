"""`import lens_alti`: every public name resolves, and importing loads none of the optional heavy libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import lens_alti
from tests.support import ROOT


def test_every_public_name_resolves():
    for name in lens_alti.__all__:
        assert getattr(lens_alti, name) is not None, name
    assert set(lens_alti.__all__) <= set(dir(lens_alti))
    from lens_alti.api import logit_attribution, routes

    assert routes is lens_alti.routes and logit_attribution is lens_alti.logit_attribution
    assert lens_alti.api.attribute is lens_alti.attribute  # the function, not its module


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        lens_alti.not_a_name  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        lens_alti.api.not_a_name  # noqa: B018


def test_import_does_not_load_optional_heavy_libraries():
    """pandas, networkx, plotly, safetensors and tqdm's notebook machinery load on first use only."""
    code = (
        "import sys, lens_alti\n"
        "heavy = ['pandas', 'networkx', 'plotly', 'safetensors', 'matplotlib', 'datasets']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


_NO_SIDE_EFFECTS = """
import json, multiprocessing, os, sys, threading, time
import torch

def children():
    mine = str(os.getpid())
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = f.read().rsplit(")", 1)[1].split()[1]  # the field after the state
            except (OSError, IndexError):
                continue
            if ppid == mine:
                kids.add(entry)
    return sorted(kids)

env, threads, kids = dict(os.environ), threading.active_count(), children()
import lens_alti
after = {"threads": threading.active_count(), "names": [t.name for t in threading.enumerate()],
         "children": children(), "mp_children": len(multiprocessing.active_children()),
         "env_changed": sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))}
time.sleep(0.3)  # a build started in the background would have spawned its compiler by now
after["children_later"] = children()
after["cache"] = sorted(os.listdir(os.environ["LENS_ALTI_CACHE"]))
print(json.dumps({"before": {"threads": threads, "children": kids}, "after": after}))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_import_starts_no_thread_or_process_and_leaves_the_environment_alone(tmp_path):
    """With nothing cached (an empty LENS_ALTI_CACHE), `import lens_alti` builds nothing, starts no
    thread or child process, and changes no environment variable (TORCHINDUCTOR_CACHE_DIR included)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "LENS_ALTI_NO_NATIVE")}
    env["LENS_ALTI_CACHE"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _NO_SIDE_EFFECTS], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    before, after = got["before"], got["after"]
    assert after["threads"] == before["threads"], after["names"]
    assert after["children"] == before["children"] and after["children_later"] == before["children"]
    assert after["mp_children"] == 0
    assert after["env_changed"] == []
    assert after["cache"] == []  # nothing built or written at import
