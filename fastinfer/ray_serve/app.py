"""Engine replicas as a Ray Serve application, behind fastinfer's OpenAI server.

Two ways in, one request path (``fastinfer.server``, unchanged):

- ``deploy_replicas``: what ``fastinfer serve --replicas N`` does for each model version. It
  runs an application of N ``EngineReplica``s (route-less: only handles reach it) and returns a
  ``ReplicaSetClient``, which the server's model registry uses as that version's engine. The
  server, its keys, quotas, metrics and versions stay in the one front-end process, so a key's
  quota holds across every replica.
- ``build_openai_app``: a whole Ray Serve application (an ingress deployment serving the OpenAI
  routes, bound to the engine deployment) for users who compose their own, in the style of
  ``ray.serve.llm.build_openai_app``: ``serve.run(build_openai_app("smollm2-135m"))``.

Each engine deployment routes with ``PrefixAwareRouter`` and has its own ``ReplicaDirectory``.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from fastinfer.errors import ConfigError
from fastinfer.ray_serve.client import ReplicaSetClient
from fastinfer.ray_serve.replica import DIRECTORY_NAMESPACE, EngineReplica, directory_actor
from fastinfer.ray_serve.router import PrefixAwareRouter
from fastinfer.ray_serve.routing import POLICIES
from fastinfer.server.app import build_app
from fastinfer.server.keys import KeyStore
from fastinfer.server.registry import ModelRegistry
from fastinfer.server.state import ServerState


@dataclass(frozen=True)
class ReplicaOptions:
    """How the engine replicas are deployed and routed. ``replicas``: how many (ignored when
    ``autoscaling_config``, Ray Serve's, is given); ``routing``: ``"prefix"`` or ``"random"``;
    ``max_ongoing_requests``: requests one replica holds at once (the engine batches them);
    ``num_cpus``: Ray CPUs each replica reserves; ``threads``: its compute threads
    (``OMP_NUM_THREADS``; None: Ray's default, its ``num_cpus``); ``balance_*``: when the router leaves the
    replica with the longest cached prefix for a less loaded one, and ``recent_ttl_s`` how long
    a prefix it sent to a replica counts as cached there before KV events say so
    (``PrefixAwareRouter``)."""

    replicas: int = 2
    routing: str = "prefix"
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int = 256
    num_cpus: float = 1.0
    threads: int | None = None
    balance_abs_threshold: int = 8
    balance_rel_threshold: float = 1.5
    recent_ttl_s: float = 30.0
    health_check_period_s: float = 2.0
    extra_actor_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) or self.replicas < 1:
            raise ConfigError(f"replicas must be an integer >= 1, got {self.replicas!r}", "replicas")
        if self.routing not in POLICIES:
            raise ConfigError(f"routing must be one of {', '.join(POLICIES)}, got {self.routing!r}", "routing")


def engine_application(source: str, engine_options: dict[str, Any], options: ReplicaOptions, *,
                       directory: str, stats_key: str):
    """The bound engine deployment (a Ray Serve ``Application``) with its router."""
    router = RequestRouterConfig(
        request_router_class=f"{PrefixAwareRouter.__module__}.{PrefixAwareRouter.__qualname__}",
        request_router_kwargs={"directory": directory, "namespace": DIRECTORY_NAMESPACE,
                               "block_size": engine_options.get("block_size") or 16, "policy": options.routing,
                               "balance_abs_threshold": options.balance_abs_threshold,
                               "balance_rel_threshold": options.balance_rel_threshold, "stats_key": stats_key,
                               "recent_ttl_s": options.recent_ttl_s})
    scale = ({"autoscaling_config": options.autoscaling_config} if options.autoscaling_config
             else {"num_replicas": options.replicas})
    actor = {"num_cpus": options.num_cpus, **options.extra_actor_options}
    if options.threads is not None:
        actor["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(options.threads)}}
    deployment = serve.deployment(
        EngineReplica, name="engine", max_ongoing_requests=options.max_ongoing_requests,
        request_router_config=router, health_check_period_s=options.health_check_period_s,
        ray_actor_options=actor, **scale)
    return deployment.bind(source, engine_options, directory)


def app_name(name: str, version: str) -> str:
    """The Serve application of one model version."""
    return "fastinfer-" + re.sub(r"[^A-Za-z0-9_-]", "_", f"{name}-{version}")


def start_ray(address: str | None = None, **init_kwargs) -> bool:
    """Connects to the Ray cluster at ``address`` unless connected (None: starts a new local
    instance, even where ``RAY_ADDRESS`` names another), and starts Serve without its HTTP proxy
    (fastinfer's server is the front end). Returns whether it started a local instance."""
    started = False
    if not ray.is_initialized():
        ray.init(address=address or "local", **init_kwargs)
        started = address is None
    serve.start(proxy_location="Disabled")
    return started


def stop_ray() -> None:
    """Shuts Serve and Ray down: only for the local instance ``start_ray`` started, since
    ``serve.shutdown`` deletes every application of the cluster."""
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def deploy_replicas(name: str, version: str, source: str, engine_options: dict[str, Any],
                    options: ReplicaOptions) -> ReplicaSetClient:
    """Runs ``name@version``'s replicas (blocking until they are up: call it off the event
    loop) and returns the client the server uses as its engine."""
    app = app_name(name, version)
    directory = f"{app}-directory"
    actor = directory_actor(directory)
    try:
        handle = serve.run(engine_application(source, engine_options, options, directory=directory, stats_key=app),
                           name=app, route_prefix=None)
        return ReplicaSetClient.connect(handle, directory=actor, stats_key=app, app_name=app, owns_app=True,
                                        replicas=options.replicas)
    except BaseException:
        with contextlib.suppress(Exception):
            serve.delete(app)
        with contextlib.suppress(Exception):
            ray.kill(actor)
        raise


@serve.ingress()
class OpenAIIngress:
    """The ingress deployment of ``build_openai_app``: fastinfer's OpenAI app over the bound
    engine deployment."""

    async def __init__(self, engines, name: str, directory: str, stats_key: str, replicas: int,
                       server_options: dict[str, Any]) -> None:
        self._directory = directory_actor(directory)
        client = await asyncio.to_thread(ReplicaSetClient.connect, engines, directory=self._directory,
                                         stats_key=stats_key, replicas=replicas,
                                         app_name=serve.get_replica_context().app_name)

        def factory(model: str, version: str, source: str) -> ReplicaSetClient:
            if source != name:
                raise ConfigError("this Ray Serve application serves only its bound model; deploy another "
                                  "application for another one", "source")
            return client

        self.state = server_state(ModelRegistry(factory), server_options)
        await self.state.registry.load(name, "v1", name)

    def __serve_build_asgi_app__(self):
        return build_app(self.state)

    def __del__(self) -> None:
        # The application is going (deleted or redeployed): so is its directory, which is detached.
        with contextlib.suppress(Exception):
            ray.kill(self._directory)


def server_state(registry: ModelRegistry, options: dict[str, Any]) -> ServerState:
    """``ServerState`` from plain options: ``api_keys`` (a list), ``api_keys_file`` (a JSON keys
    file, ``fastinfer keys``) and any ``ServerState`` field."""
    options = dict(options)
    keys = KeyStore.from_sources(options.pop("api_keys_file", None), options.pop("api_keys", None))
    return ServerState(registry=registry, keys=keys, **options)


def build_openai_app(source: str = "smollm2-135m", *, name: str | None = None,
                     engine_options: dict[str, Any] | None = None, replica_options: ReplicaOptions | None = None,
                     server_options: dict[str, Any] | None = None):
    """A Ray Serve application serving ``source`` over the OpenAI API from
    ``replica_options.replicas`` engine replicas: ``serve.run(build_openai_app(...))``.
    ``engine_options``: ``AsyncEngine`` keywords; ``server_options``: see ``server_state``."""
    options = replica_options or ReplicaOptions()
    tag = uuid.uuid4().hex[:8]
    directory, stats_key = f"fastinfer-{tag}-directory", f"fastinfer-{tag}"
    engines = engine_application(source, dict(engine_options or {}), options, directory=directory,
                                 stats_key=stats_key)
    ingress = serve.deployment(OpenAIIngress, name="openai", num_replicas=1, max_ongoing_requests=1024,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(engines, name or source, directory, stats_key, options.replicas,
                        dict(server_options or {}))


_BUILDER_KEYS = {"model", "name", "engine", "replicas", "server"}


def app_builder(args: dict[str, Any]):
    """Ray Serve's application builder (``import_path: fastinfer.ray_serve.app:app_builder`` in
    a Serve config or a KubeRay ``RayService``): ``build_openai_app`` from ``args`` with the keys
    ``model``, ``name``, ``engine`` (engine options), ``replicas`` (``ReplicaOptions`` fields)
    and ``server`` (``server_state`` options)."""
    args = dict(args or {})
    unknown = set(args) - _BUILDER_KEYS
    if unknown:
        raise ConfigError(f"unknown fastinfer application args {sorted(unknown)}; expected "
                          f"{sorted(_BUILDER_KEYS)}", "args")
    return build_openai_app(args.get("model", "smollm2-135m"), name=args.get("name"),
                            engine_options=args.get("engine"), replica_options=ReplicaOptions(**args.get("replicas", {})),
                            server_options=args.get("server"))
