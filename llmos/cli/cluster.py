"""`llmos cluster up | status | down`: llmos on a local Ray cluster through Ray Serve.

`up` starts a Ray head here (`ray start --head`) unless one runs, then deploys llmos.serve's
application (replicas that each supervise one llmosd) behind Serve's HTTP proxy; `down`
removes it and stops the head it started. Needs the optional extra: pip install 'llmos[ray]'."""
from __future__ import annotations

import shutil
import subprocess

import click

from llmos.serve.config import ServeConfig

APP = "llmos"


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise click.ClickException("Ray is not installed: pip install 'llmos[ray]'") from None
    return ray, serve


def _connect(ray) -> bool:
    try:
        ray.init(address="auto", log_to_driver=False)
        return True
    except (ConnectionError, RuntimeError):
        return False


@click.group()
def cluster():
    """llmos on Ray Serve: replicas that each run one llmosd (docs/scale-out.md)."""


@cluster.command()
@click.option("--model", "models", multiple=True, metavar="SPEC", help="model each daemon loads (repeatable)")
@click.option("--replicas", default=1, show_default=True, help="replicas at least (each one llmosd)")
@click.option("--max-replicas", type=int, help="autoscale up to this many (default: --replicas)")
@click.option("--target-ongoing", default=8.0, show_default=True, help="requests in flight per replica to scale on")
@click.option("--replica-cpus", default=1.0, show_default=True, help="Ray CPUs each replica reserves")
@click.option("--home-root", type=click.Path(file_okay=False), help="where the slot homes live (same path on every node)")
@click.option("--host", default="127.0.0.1", show_default=True, help="Serve's HTTP proxy address")
@click.option("--port", default=8000, show_default=True)
@click.option("--num-cpus", type=int, help="CPUs of the Ray head this starts (default: all)")
@click.option("--api-key", envvar="LLMOS_SERVE_KEY", help="key the ingress requires (Bearer); needed off localhost")
@click.option("--daemon-arg", "daemon_args", multiple=True, help="an extra llmosd argument (repeatable)")
def up(models, replicas, max_replicas, target_ongoing, replica_cpus, home_root, host, port, num_cpus, api_key,
       daemon_args):
    """Start a local Ray head if none runs, and deploy llmos on it."""
    ray, serve = _ray()
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise click.ClickException("a proxy off localhost needs --api-key: the replicas' daemons trust their callers")
    if not _connect(ray):
        argv = [shutil.which("ray") or "ray", "start", "--head", "--disable-usage-stats"]
        subprocess.run(argv + ([f"--num-cpus={num_cpus}"] if num_cpus is not None else []), check=True)
        ray.init(address="auto", log_to_driver=False)
    from llmos.serve import build_app
    cfg = ServeConfig(models=list(models) or ["smollm2"], daemon_args=list(daemon_args), home_root=home_root,
                      min_replicas=replicas, max_replicas=max_replicas or replicas,
                      target_ongoing_requests=target_ongoing, replica_num_cpus=replica_cpus, api_key=api_key)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    click.echo(f"llmos is served at http://{host}:{port}/v1 ({replicas} replica(s), homes under "
               f"{cfg.resolved().home_root})")


@cluster.command()
def status():
    """The application, its replicas and their daemons."""
    ray, serve = _ray()
    if not _connect(ray):
        raise click.ClickException("no Ray cluster is running here (`llmos cluster up`)")
    app = serve.status().applications.get(APP)
    if app is None:
        raise click.ClickException("llmos is not deployed on this Ray cluster (`llmos cluster up`)")
    click.echo(f"application {APP}: {app.status}")
    for name, dep in app.deployments.items():
        states = ", ".join(f"{n} {s}" for s, n in dep.replica_states.items()) or "no replicas"
        click.echo(f"  {name}: {dep.status} ({states}){' ' + dep.message if dep.message else ''}")


@cluster.command()
@click.option("--keep-ray", is_flag=True, help="remove the app but leave the Ray cluster running")
def down(keep_ray):
    """Remove llmos from Ray Serve (each replica stops its daemon) and stop the local Ray head."""
    ray, serve = _ray()
    if _connect(ray):
        serve.shutdown()
        ray.shutdown()
    if not keep_ray:
        subprocess.run([shutil.which("ray") or "ray", "stop"], check=False)
    click.echo("llmos cluster is down")
