"""``python -m router``: serve the gateway, prepare the scorer model, check a config, print the config reference."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from router.config import ConfigError, ScorerConfig, Settings, load_settings
from router.learning.versions import RegistryError
from router.probe import ProbeError
from router.scorer.cpu import configure_openmp

if TYPE_CHECKING:
    import uvicorn

    from router.learning.versions import Registry
    from router.routing import ProbeGroup

log = logging.getLogger("router")


def _side_server(app: object, host: str, port: int, log_level: str) -> uvicorn.Server:
    """A uvicorn server that leaves signal handling to the main one."""
    import uvicorn

    class SideServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return SideServer(uvicorn.Config(app, host=host, port=port, log_level=log_level))


async def _run_servers(main: uvicorn.Server, metrics: uvicorn.Server | None) -> None:
    side = asyncio.create_task(metrics.serve()) if metrics is not None else None
    try:
        await main.serve()
    finally:
        if metrics is not None and side is not None:
            metrics.should_exit = True
            await side


def _settle_gc(freeze: bool, young_threshold: int) -> None:
    """Move everything loaded so far (the scorer model, torch, transformers: millions of objects that live as long
    as the process) out of the collector's sight, and collect the youngest generation less often. Without this,
    collections that walk those objects cost more CPU than the rest of a forwarded request (docs/benchmarks.md)."""
    if freeze:
        gc.collect()
        gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (uvicorn's own choice, which our Runner would otherwise bypass)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _load(settings: Settings) -> tuple[ProbeGroup, ...]:
    """Open the scorers and load the probes, with the CPU settings they ask for in place before torch loads."""
    configure_openmp(settings.scorer)
    from router.routing import load_probe_groups

    groups = load_probe_groups(settings)
    for group in groups:
        info = group.scorer.info
        log.info("scorer %s (%s, layers %s, %s pooling, fingerprint %s) for %s", info.model,
                 type(group.scorer).__name__, list(info.layers), info.pooling, info.fingerprint,
                 ", ".join(group.probes.names))
    return groups


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = load_settings(args.config)
    host = args.host or settings.server.host
    port = args.port or settings.server.port
    groups = _load(settings)
    from router.app import create_app, create_metrics_app
    from router.edge import raise_open_file_limit, server_config

    app = create_app(settings, groups)
    _settle_gc(settings.server.gc_freeze, settings.server.gc_young_threshold)
    open_files = raise_open_file_limit()
    if settings.server.max_connections + 256 > open_files:
        log.warning("server.max_connections (%d) leaves little of the open-file limit (%d) for backend connections",
                    settings.server.max_connections, open_files)
    main = uvicorn.Server(server_config(app, settings.server, host, port, args.log_level))
    metrics = None
    if settings.server.metrics_port is not None:
        metrics = _side_server(create_metrics_app(app), host, settings.server.metrics_port, args.log_level)
        log.info("metrics on http://%s:%d/metrics", host, settings.server.metrics_port)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_run_servers(main, metrics))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from router.scorer.source import resolve_model, truncate_model
    from router.scorer.vllm import vllm_pooling_args

    settings = load_settings(args.config) if args.config else None
    scorers = [ScorerConfig()] if settings is None else [settings.scorer] + [
        b.scorer for b in settings.backends if b.scorer is not None]
    for cfg in scorers:
        folder = resolve_model(cfg.model, cfg.cache_dir)
        print(folder.path)
        if cfg.kind == "vllm" or args.vllm:
            served = truncate_model(folder, max(cfg.layers), cfg.cache_dir)
            command = ["vllm", "serve", str(served), *vllm_pooling_args(cfg)]
            print(f"  serve it for scorer.kind 'vllm' with: {shlex.join(command)}")
    return 0


def _check(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    groups = _load(settings)
    for group in groups:
        print(f"{args.config}: scorer {group.scorer.info.model} fingerprint {group.scorer.info.fingerprint}; "
              f"probes for {', '.join(group.probes.names)} match it")
    return 0


def _registry(args: argparse.Namespace) -> tuple[Settings, Registry]:
    from router.learning import Registry

    settings = load_settings(args.config)
    root = args.registry or settings.learning.registry
    if root is None:
        raise ConfigError(f"{args.config}: no learning.registry (or pass --registry DIR)")
    return settings, Registry(root)


def _probes_list(args: argparse.Namespace) -> int:
    _, registry = _registry(args)
    backends = [args.backend] if args.backend else registry.backends()
    if not backends:
        print(f"{registry.root}: no versioned probes yet (the learner imports the configured ones as v1)")
        return 0
    for backend in backends:
        print(backend)
        for v in registry.versions(backend):
            learning = v.record.get("learning", {})
            guard = learning.get("guard", {})
            figures = ""
            if guard:
                figures = (f" guard log-loss {guard['serving']['logloss']:.4f} → {guard['candidate']['logloss']:.4f}, "
                           f"AUROC {guard['serving']['auroc']:.4f} → {guard['candidate']['auroc']:.4f}")
            origin = (f"{learning.get('kind')} from {learning.get('parent')}, {learning.get('n_train', '?')} labels"
                      if learning else f"imported ({v.record.get('data', 'the configured probe')})")
            print(f"  {'*' if v.current else ' '} {v.name}: {origin}{figures}")
    return 0


def _probes_rollback(args: argparse.Namespace) -> int:
    _, registry = _registry(args)
    before = registry.current_name(args.backend)
    now = registry.rollback(args.backend, args.to)
    print(f"{args.backend}: serving {now} (was {before})")
    return 0


def _probes_promote(args: argparse.Namespace) -> int:
    from router.probe import load_probe

    _, registry = _registry(args)
    probe = load_probe(args.probe)
    name = registry.promote(args.backend, probe, {"kind": "manual", "source": str(args.probe),
                                                  "note": args.note or ""})
    print(f"{args.backend}: serving {name} ({args.probe})")
    return 0


def _probes_refit(args: argparse.Namespace) -> int:

    from router.learning import ExampleStore, Learner, LearnerSettings

    settings, registry = _registry(args)
    store_path = args.store or settings.learning.store
    if store_path is None:
        raise ConfigError(f"{args.config}: no learning.store (or pass --store FILE)")
    probed = [b for b in settings.backends if b.probe is not None and (not args.backend or b.name == args.backend)]
    for b in probed:
        registry.ensure_base(b.name, b.probe)
    anchors = {b.name: registry.load(b.name, "v1") for b in probed}
    with ExampleStore(store_path, settings.learning.max_examples) as store:
        learner = Learner(store, registry, LearnerSettings.from_config(settings.learning), anchors)
        for outcome in learner.run_once():
            print(json.dumps(outcome.as_dict()))
    return 0


def _learn(args: argparse.Namespace) -> int:
    """The learner as its own process: every learning.refit_interval_s, one pass over the backends that are due,
    while this process holds the learner's lock (the gateway replicas then run with learning.in_process false)."""
    import time
    from pathlib import Path

    from router.learning import ExampleStore, Registry
    from router.learning.live import LOCK_FILE, LearnerLock, open_learner, run_learner_pass

    settings = load_settings(args.config)
    cfg = settings.learning
    if not cfg.enabled or cfg.store is None or cfg.registry is None:
        raise ConfigError(f"{args.config}: learning is not enabled (learning.enabled, learning.store, "
                          "learning.registry)")
    registry = Registry(cfg.registry)
    lock = LearnerLock(Path(cfg.registry) / LOCK_FILE)
    with ExampleStore(cfg.store, cfg.max_examples) as store:
        learner = open_learner(settings, registry, store)
        passes = 0
        while args.passes is None or passes < args.passes:
            if lock.acquire():
                for outcome in run_learner_pass(learner):
                    print(json.dumps(outcome.as_dict()), flush=True)
            else:
                log.info("another learner holds %s; waiting", lock.path)
            passes += 1
            if args.passes is None or passes < args.passes:
                time.sleep(args.interval_s or cfg.refit_interval_s)
        lock.release()
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    from router.config_doc import reference

    text = reference()
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, default=Path("config.yaml"))
    serve.add_argument("--host", help="default: server.host of the config (127.0.0.1)")
    serve.add_argument("--port", type=int, help="default: server.port of the config (8000)")
    serve.set_defaults(run=_serve)
    prepare = sub.add_parser("prepare", help="make the scorer model ready locally (convert a packaged model once) "
                             "and print its folder")
    prepare.add_argument("--config", type=Path)
    prepare.add_argument("--vllm", action="store_true", help="also write the checkpoint cut after the probed layer "
                         "that a vLLM pooling server serves (done anyway for scorers of kind 'vllm'), and print the "
                         "command")
    prepare.set_defaults(run=_prepare)
    check = sub.add_parser("check", help="validate a config and its probes against the scorer, then exit")
    check.add_argument("--config", type=Path, default=Path("config.yaml"))
    check.set_defaults(run=_check)

    probes = sub.add_parser("probes", help="the versioned probes learnt from traffic: list, roll back, promote, "
                            "refit", description="Manage learning.registry: every probe a backend has served is a "
                            "version (v1: the configured probe); CURRENT names the one served.")
    psub = probes.add_subparsers(dest="probes_command", required=True)

    def registry_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=Path("config.yaml"))
        p.add_argument("--registry", type=Path, help="default: learning.registry of the config")

    plist = psub.add_parser("list", help="every version of each backend's probe, the served one starred")
    registry_opts(plist)
    plist.add_argument("--backend")
    plist.set_defaults(run=_probes_list)
    rollback = psub.add_parser("rollback", help="serve an earlier version (default: the one before the current)")
    registry_opts(rollback)
    rollback.add_argument("backend")
    rollback.add_argument("--to", help="the version to serve, e.g. v1")
    rollback.set_defaults(run=_probes_rollback)
    promote = psub.add_parser("promote", help="serve a probe file (e.g. trained offline) as the backend's next "
                              "version; it must read the same scorer")
    registry_opts(promote)
    promote.add_argument("backend")
    promote.add_argument("--probe", type=Path, required=True, help="the probe's JSON file")
    promote.add_argument("--note", help="recorded in the version's training record")
    promote.set_defaults(run=_probes_promote)
    refit = psub.add_parser("refit", help="one learner pass now: fit candidates on the stored ratings and promote "
                            "those that beat the serving probes on the guard ratings")
    registry_opts(refit)
    refit.add_argument("--store", type=Path, help="default: learning.store of the config")
    refit.add_argument("--backend", help="only this backend")
    refit.set_defaults(run=_probes_refit)
    learn = sub.add_parser("learn", help="run the learner as its own process (one per fleet: a lock file beside "
                           "learning.registry); with learning.in_process false in the gateways' config")
    learn.add_argument("--config", type=Path, default=Path("config.yaml"))
    learn.add_argument("--passes", type=int, help="stop after this many passes (default: run until stopped)")
    learn.add_argument("--interval-s", type=float, help="seconds between passes (default: learning.refit_interval_s)")
    learn.set_defaults(run=_learn)
    ref = sub.add_parser("config-reference", help="print the configuration reference (every field of the config "
                         "file, generated from the settings models) as Markdown")
    ref.add_argument("--out", type=Path, help="write it to this file (docs/reference/configuration.md)")
    ref.set_defaults(run=_config_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is uvicorn's job
    try:
        return args.run(args)
    except (ConfigError, ProbeError, RegistryError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
