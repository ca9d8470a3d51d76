"""Install Debian packages a system test needs (Slurm, Chromium), or say why that is impossible.

CI runs as root on Debian, so the tests install what they need with apt. Anywhere else a test
calls ``pytest.skip`` with the reason that :func:`ensure_debian_packages` returns.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def ensure_debian_packages(packages: dict[str, str]) -> str | None:
    """Make every command in ``packages`` available, installing its package with apt if missing.

    Args:
        packages: command name -> Debian package that provides it.

    Returns:
        None when every command is on PATH afterwards, else a one-line reason.
    """
    missing = sorted({pkg for cmd, pkg in packages.items() if shutil.which(cmd) is None})
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"{', '.join(missing)} not installed and not root, so apt cannot install them"
    if shutil.which("apt-get") is None:
        return f"{', '.join(missing)} not installed and apt-get is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Under pytest -n 2 the Slurm and browser tests can install at the same moment: wait for the
    # other's dpkg lock instead of failing (and skipping) at once.
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=900"]
    install = [*apt, "install", "-y", "-q", "--no-install-recommends", *missing]
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        # A stale package index is the usual cause on a fresh machine.
        subprocess.run([*apt, "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"apt-get install {' '.join(missing)} failed: {tail[0]}"
    still = sorted(cmd for cmd in packages if shutil.which(cmd) is None)
    return f"installed {', '.join(missing)} but {', '.join(still)} still missing" if still else None
