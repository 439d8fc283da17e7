"""The node side of ``ugro-launch``: every remote action is one run of this package.

    <python> -m ugro.launcher.agent preflight --workdir W --ports 9500,9501,9490 [--gpus N] \
        [--web-config FILE]
    <python> -m ugro.launcher.agent ensure-exporter --port P --node NAME --workdir W \
        [--web-config FILE]
    <python> -m ugro.launcher.agent stop-exporter --node NAME --workdir W
    <python> -m ugro.launcher.agent start --job-id J --node NAME --workdir W [--env K=V] -- ARGV...
    <python> -m ugro.launcher.agent status|stop|logs --job-id J --node NAME --workdir W
    <python> -m ugro.launcher.agent stacks --job-id J --node NAME --workdir W [--timeout S]

Each verb except ``logs`` prints one JSON object on one line and exits 0, also when it reports
a problem: problems are data for the launcher. A usage error exits 2, anything unexpected 1,
each with one line on stderr. The work is done here, in Python with psutil, so the launcher
sends one ``shlex.join``-ed argv over SSH and never builds a shell pipeline.

``start`` hands the job to a detached supervisor (``supervise``, in its own session) that
starts ARGV in a second new session, so that ``stop`` can signal torchrun's process group
without hitting the supervisor, which then records the exit status. torchrun puts each
worker in a session of its own, so every job process also carries ``UGRO_AGENT_JOB_DIR`` in
its environment, by which ``stop`` finds and kills what SIGTERM left. Nothing is tied to the
SSH session: it may close as soon as ``start`` has answered.
A web configuration (TLS, basic auth) travels as its path only (``--web-config``, the ranks'
``UGRO_WEB_CONFIG``, the exporter's ``--web.config.file``): the file stays on the node, so no
key or password hash shows on a command line or in an environment.
See :mod:`ugro.launcher.jobfiles` for the files of a job.

Modules: ``cli`` (arguments, one verb, one JSON line), ``preflight``, ``exporter``
(``ensure-exporter``, ``stop-exporter``), ``start`` (``start``, ``supervise``), ``status``
(``status``, ``stop``), ``logs``, ``stacks`` (py-spy dumps of the job's ranks, and the check
that preflight runs for it), and ``base``, what they share. ``__main__`` only runs
``cli.main``.
"""

from ..jobfiles import job_dir
from .cli import main
from .exporter import ensure_exporter, stop_exporter
from .preflight import preflight
from .stacks import job_stacks
from .start import start_job, supervise
from .status import job_status, stop_job

__all__ = [
    "ensure_exporter",
    "job_dir",
    "job_stacks",
    "job_status",
    "main",
    "preflight",
    "start_job",
    "stop_exporter",
    "stop_job",
    "supervise",
]
