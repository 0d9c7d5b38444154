"""Shared helpers of the benchmark scripts: an isolated instance and timing."""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def instance_env(instance: str, port: int, mounts: Path) -> dict[str, str]:
    """Environment for `invoke` that targets a stack of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_")}
    env.update(
        INVOKE_FBM_INSTANCE=instance,
        INVOKE_FBM_MOUNTS=str(mounts),
        INVOKE_FBM_VPN_PORT=str(port),
        INVOKE_FBM_RESEARCHER_JUPYTER_PORT=str(port + 1),
        INVOKE_FBM_RESEARCHER_TENSORBOARD_PORT=str(port + 2),
        INVOKE_FBM_BUILD_BASE_IMAGE=os.environ.get(
            "FBM_TEST_BASE_IMAGE", "fbm-local/debian:bookworm"
        ),
    )
    return env


def invoke(env, *args, check=True, capture=True):
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        env=env,
        check=check,
        capture_output=capture,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values) -> float:
    return statistics.median(values)


def scratch(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
