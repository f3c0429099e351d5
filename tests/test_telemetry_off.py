"""No library ccurate loads reports home (a data node sends nothing but its crawl).

onnxruntime 1.32 (NudeNet, RapidOCR) ships telemetry that is on by default: ~9 s after the
first model loads, every worker looked up mobile.events.data.microsoft.com and wrote a device
id and an event store under ~/.cache/Microsoft and a `.ses` file in $TMPDIR (found running the
demo under strace). Importing ccurate now turns it (and Ray's and the HF hub's) off first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PROBE = textwrap.dedent(
    """
    import glob, os, sys, time
    import ccurate  # first, as every ccurate entry point does
    import nudenet
    import onnxruntime as ort

    model = glob.glob(os.path.join(os.path.dirname(nudenet.__file__), "*.onnx"))[0]
    ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    time.sleep(float(sys.argv[1]))  # onnxruntime's telemetry starts ~9 s after a session
    """
)


def _env(home: Path, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY",)}
    return {**env, "HOME": str(home), "TMPDIR": str(tmp)}


def test_onnxruntime_writes_no_device_id_or_event_store(tmp_path: Path) -> None:
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    subprocess.run(
        [sys.executable, "-c", PROBE, "11"], env=_env(home, tmp), check=True, timeout=120
    )
    assert not (home / ".cache" / "Microsoft").exists(), sorted(home.rglob("*"))
    assert not list(tmp.iterdir())  # no `.ses` session file left behind


def test_telemetry_switches_are_set_on_import_and_a_users_own_choice_is_kept() -> None:
    code = "import os, ccurate; print(os.environ['ORT_DISABLE_TELEMETRY'], os.environ['RAY_USAGE_STATS_ENABLED'], os.environ['HF_HUB_DISABLE_TELEMETRY'])"  # noqa: E501
    env = {k: v for k, v in os.environ.items() if not k.endswith(("TELEMETRY", "STATS_ENABLED"))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["1", "0", "1"], out.stderr
    env["RAY_USAGE_STATS_ENABLED"] = "1"  # the user asked for it: not overridden
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["1", "1", "1"], out.stderr
