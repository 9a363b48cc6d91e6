"""A versioned probe registry on disk: every probe a backend has served is a file that stays.

Layout, under the registry's root::

    BACKEND/v1.json, v1.safetensors     the probe the config shipped (imported once)
    BACKEND/v2.json, v2.safetensors     each promotion writes the next version (router.probe.save_probe)
    BACKEND/CURRENT                     the version served now ("v2"), replaced atomically
    BACKEND/history.jsonl               one line per import, promotion and rollback

A promoted probe keeps the ``scorer`` block (and so the fingerprint) of the version it replaces, and its
``training`` block records where it came from (``training.learning``: parent version, labels, guard figures).
``rollback`` points CURRENT at any earlier version; nothing is deleted. Promotions and rollbacks of one registry
are serialised by a lock file, so a learner and an operator's command cannot interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from router.probe import Probe, ProbeError, load_probe, save_probe

_VERSION = re.compile(r"^v([1-9][0-9]*)$")
_BACKEND = re.compile(r"^[A-Za-z0-9._:-]+$")


class RegistryError(Exception):
    """A registry operation cannot be done (unknown backend or version, a probe for another scorer)."""


@dataclass(frozen=True)
class Version:
    backend: str
    name: str  # "v3"
    path: Path  # the JSON file (load it with router.probe.load_probe)
    current: bool
    record: dict[str, Any]  # the probe's training block

    @property
    def number(self) -> int:
        return _number(self.name)


def _number(name: str) -> int:
    m = _VERSION.match(name)
    if m is None:
        raise RegistryError(f"{name!r} is not a version name (v1, v2, ...)")
    return int(m.group(1))


class Registry:
    def __init__(self, root: str | Path, clock: Any = time.time) -> None:
        self.root = Path(root)
        self.clock = clock

    # -- reading ------------------------------------------------------------------------------------------------

    def backends(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "CURRENT").is_file())

    def _dir(self, backend: str) -> Path:
        if not _BACKEND.match(backend) or backend in (".", ".."):
            raise RegistryError(f"{backend!r} is not a backend name")
        return self.root / backend

    def current_name(self, backend: str) -> str:
        pointer = self._dir(backend) / "CURRENT"
        try:
            name = pointer.read_text().strip()
        except FileNotFoundError as e:
            raise RegistryError(f"backend {backend!r} has no versions in {self.root}") from e
        _number(name)
        return name

    def path(self, backend: str, name: str) -> Path:
        _number(name)
        return self._dir(backend) / f"{name}.json"

    def current_path(self, backend: str) -> Path:
        """The JSON file of the version served now (what a replica loads)."""
        return self.path(backend, self.current_name(backend))

    def current(self, backend: str) -> tuple[str, Probe]:
        name = self.current_name(backend)
        return name, load_probe(self.path(backend, name))

    def load(self, backend: str, name: str) -> Probe:
        path = self.path(backend, name)
        if not path.is_file():
            raise RegistryError(f"backend {backend!r} has no version {name}")
        return load_probe(path)

    def versions(self, backend: str) -> list[Version]:
        folder = self._dir(backend)
        current = self.current_name(backend)
        out = []
        for path in folder.glob("v*.json"):
            if not _VERSION.match(path.stem):
                continue
            try:
                record = json.loads(path.read_text()).get("training", {})
            except (OSError, json.JSONDecodeError):
                record = {}
            out.append(Version(backend, path.stem, path, path.stem == current, record))
        return sorted(out, key=lambda v: v.number)

    def history(self, backend: str) -> list[dict[str, Any]]:
        path = self._dir(backend) / "history.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- writing ------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _point(self, backend: str, name: str) -> None:
        folder = self._dir(backend)
        tmp = folder / f".CURRENT.{os.getpid()}.tmp"
        tmp.write_text(name + "\n")
        os.replace(tmp, folder / "CURRENT")

    def _log(self, backend: str, event: dict[str, Any]) -> None:
        with (self._dir(backend) / "history.jsonl").open("a") as f:
            f.write(json.dumps({"at": self.clock(), **event}) + "\n")

    def ensure_base(self, backend: str, probe_path: str | Path) -> str:
        """Import ``probe_path`` as version v1 if the backend has no versions yet; return the current version.
        With versions already there, check that the configured probe reads the same scorer as the current one."""
        probe = load_probe(probe_path)
        with self._locked():
            folder = self._dir(backend)
            if (folder / "CURRENT").is_file():
                name, served = self.current(backend)
                if served.scorer.get("fingerprint") != probe.scorer.get("fingerprint"):
                    raise RegistryError(
                        f"backend {backend!r}: the configured probe {probe_path} reads scorer "
                        f"{probe.scorer.get('fingerprint')} but the registry serves {name} for scorer "
                        f"{served.scorer.get('fingerprint')}; use another registry (learning.registry) for it")
                return name
            folder.mkdir(parents=True, exist_ok=True)
            save_probe(probe, folder / "v1.json")
            self._point(backend, "v1")
            self._log(backend, {"event": "import", "version": "v1", "source": str(probe_path)})
            return "v1"

    def promote(self, backend: str, probe: Probe, record: dict[str, Any]) -> str:
        """Write ``probe`` as the backend's next version with ``record`` under ``training.learning``, keeping the
        current version's scorer block (its fingerprint), and serve it. Return its name."""
        with self._locked():
            parent, served = self.current(backend)
            if probe.weight.shape != served.weight.shape or probe.text_dim != served.text_dim:
                raise RegistryError(f"backend {backend!r}: the new probe has {probe.weight.shape[0]} weights, the "
                                    f"served {parent} has {served.weight.shape[0]}")
            if probe.scorer and probe.scorer.get("fingerprint") != served.scorer.get("fingerprint"):
                raise RegistryError(f"backend {backend!r}: the new probe reads scorer "
                                    f"{probe.scorer.get('fingerprint')}, {parent} reads "
                                    f"{served.scorer.get('fingerprint')}")
            latest = max(v.number for v in self.versions(backend))
            name = f"v{latest + 1}"
            training = dict(probe.training or served.training)
            training["learning"] = {"parent": parent, "promoted_at": self.clock(), **record}
            save_probe(replace(probe, scorer=served.scorer, training=training), self.path(backend, name))
            self._point(backend, name)
            self._log(backend, {"event": "promote", "version": name, "parent": parent,
                                "kind": record.get("kind")})
            return name

    def rollback(self, backend: str, to: str | None = None) -> str:
        """Serve version ``to`` (default: the version before the current one, by number); return its name."""
        with self._locked():
            current = self.current_name(backend)
            numbers = [v.number for v in self.versions(backend)]
            if to is None:
                earlier = [n for n in numbers if n < _number(current)]
                if not earlier:
                    raise RegistryError(f"backend {backend!r}: {current} is the first version; nothing to roll back to")
                to = f"v{max(earlier)}"
            if _number(to) not in numbers:
                raise RegistryError(f"backend {backend!r} has no version {to} (has: "
                                    f"{', '.join(f'v{n}' for n in numbers)})")
            try:
                load_probe(self.path(backend, to))
            except ProbeError as e:
                raise RegistryError(f"backend {backend!r}: version {to} does not load: {e}") from e
            self._point(backend, to)
            self._log(backend, {"event": "rollback", "version": to, "from": current})
            return to
