"""Gunicorn settings for Pi Agent Server: one gevent worker, made for long streams.

Imports only pi_agent.config, pi_agent.security.keys and .exposure, pi_agent.hosts,
pi_agent.stores.sqlite_file and pi_agent.metrics_folder, which load neither ssl nor
requests: the gevent worker patches the standard library after the fork, and modules loaded
before it stay unpatched. gevent itself is loaded after the fork too (see
pi_agent/worker.py), so the master, which serves no request, stays about 5 MiB smaller.
That is why each hook imports what it uses when it runs: the worker's hooks (pre_request,
worker_int) load the app's modules, which only a worker may.
"""
import math
import os
import sys

from pi_agent.config import ConfigError, load_settings, metrics_folder

try:
    _settings = load_settings()
except ConfigError as exc:
    # One line naming the variable, instead of a traceback from every worker that boots.
    sys.exit(f"pi-agent: {exc}")

bind = [_settings.bind]
# gunicorn's gevent worker ("-k gevent"), with gevent imported in the worker only.
worker_class = "pi_agent.worker.GeventWorker"
# PI_AGENT_WORKERS, 1 by default: the memory and SQLite stores live in one worker's process,
# and a Pi runs one generation at a time anyway. More workers need the Redis store, which they
# all share (on_starting refuses the others); each opens its own connections after the fork.
workers = _settings.workers
worker_connections = 2000
# Building the app in the master would import ssl and requests before gevent patches them.
preload_app = False
# The gevent worker notifies the master from its own greenlet, so a stream that runs for
# minutes does not trip this; it only catches a worker whose loop is stuck. (The sync worker
# cannot: _fit_worker raises it for that one.)
timeout = 60
# On SIGTERM, streams still running get this long to finish.
graceful_timeout = 60
keepalive = 5
accesslog = "-"
# gunicorn's default, without the query string (a key put in a URL by mistake must not be
# written to the log), the Basic-auth user and the Referer (which may hold either).
access_log_format = '%(h)s - - %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(a)s"'
errorlog = "-"
loglevel = _settings.log_level.lower()
if _settings.log_format == "json":
    # PI_AGENT_LOG_FORMAT=json: gunicorn's own lines (its log and the access log) as JSON
    # objects too, on the root logger's handler, which the app's lines reach as well.
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "pi_agent.logformat.JsonFormatter"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json",
                                 "stream": "ext://sys.stdout"}},
        "root": {"level": _settings.log_level, "handlers": ["console"]},
        "loggers": {
            "gunicorn.error": {"level": _settings.log_level, "handlers": ["console"],
                               "propagate": False, "qualname": "gunicorn.error"},
            "gunicorn.access": {"level": "INFO", "handlers": ["console"],
                                "propagate": False, "qualname": "gunicorn.access"},
        },
    }
# gunicorn 24+ opens a control socket in a shared path by default; nothing here uses it, and
# two servers on one machine would fight over it. Older versions ignore the name.
control_socket_disable = True


def on_starting(server):
    """Refuse to listen beyond loopback without API keys (see pi_agent/security/exposure.py), on
    the addresses gunicorn will bind, -b included."""
    from pi_agent.security.exposure import refusal
    from pi_agent.security.keys import KeyFileError

    try:
        # Read again: gunicorn has applied its -e variables to the environment by now.
        settings = load_settings()
        reason = (refusal(server.cfg.bind, settings) or _workers_refusal(server, settings)
                  or _store_refusal(settings))
    except (ConfigError, KeyFileError) as exc:
        reason = str(exc)
    if reason:
        sys.exit(f"pi-agent: {reason}")
    if settings.auth == "off":
        server.log.warning("pi-agent: PI_AGENT_AUTH=off: every request is served without a key")
    _fit_worker(server, settings)
    _fit_descriptors(server)
    _prepare_metrics(server)


def _prepare_metrics(server):
    """Several workers keep their metrics in files in a folder of their own, which this
    master makes now, before it forks them, and removes when it exits (on_exit)."""
    from pi_agent.metrics_folder import prepare

    folder = prepare(os.environ, server.cfg.workers)
    if folder:
        server.log.info("pi-agent: the workers' metrics in %s", folder)


def child_exit(server, worker):
    """A worker that ended counts no more in the gauges of turns running and waiting
    (prometheus-client's multiprocess.mark_process_dead, which the master cannot import:
    see pi_agent/metrics_folder.py)."""
    from pi_agent.metrics_folder import forget_worker

    folder = metrics_folder()
    if folder:
        forget_worker(folder, worker.pid)


def on_exit(server):
    """The workers' metrics folder goes with the master."""
    from pi_agent.metrics_folder import remove_folder

    folder = metrics_folder()
    if folder:
        remove_folder(folder)


def _workers_refusal(server, settings):
    """Several workers share nothing but a Redis store: with another one, each would keep
    its own conversations, limits and slots, and a conversation would change with the worker
    that a request happens to reach."""
    if server.cfg.workers > 1 and settings.store != "redis":
        return (f"{server.cfg.workers} workers need PI_AGENT_STORE=redis (the {settings.store}"
                f" store is one worker's): set PI_AGENT_WORKERS=1 or use Redis")
    return ""


def _store_refusal(settings):
    """Why the SQLite store cannot be used (its file or folder), found before the worker
    boots; the file is made then if missing, and closed before the fork."""
    if settings.store != "sqlite":
        return ""
    from pi_agent.stores.sqlite_file import StoreFileError, prepare, state_file

    try:
        prepare(state_file(settings.state_dir))
    except StoreFileError as exc:
        return f"PI_AGENT_STORE=sqlite: {exc}"
    return ""


def _fit_descriptors(server):
    """Raise the soft limit on open files to the hard one (1,024 is a common soft limit),
    and keep worker_connections within it: a worker that runs out of descriptors fails to
    accept, and fails the turns that need a new connection to Ollama."""
    from pi_agent.hosts import connections_allowed, raise_descriptor_limit

    before, limit = raise_descriptor_limit()
    wanted = server.cfg.worker_connections
    allowed = connections_allowed(limit, wanted)
    if allowed < wanted:
        server.cfg.set("worker_connections", allowed)
    server.log.info("pi-agent: descriptors: soft limit %d%s; worker_connections %d%s", limit,
                    f" (raised from {before})" if limit != before else "", allowed,
                    f" (lowered from {wanted} to fit)" if allowed < wanted else "")


def on_reload(server):
    """On SIGHUP gunicorn reads this file again and copies its timeout anew: fit it again."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        server.log.error("pi-agent: %s; the worker settings stay as this file has them", exc)
        return
    _fit_worker(server, settings)
    _fit_descriptors(server)


# A sync worker's turn may run this long past PI_AGENT_TOTAL_TIMEOUT: the connection to
# Ollama, reading the history, writing the reply and the memory.
SYNC_TIMEOUT_MARGIN = 30


def _fit_worker(server, settings):
    """Fit gunicorn's settings to the worker it runs: "-k" on the command line overrides
    worker_class, and a thread or a process per request needs other settings than gevent.

    The sync worker tells the master that it is alive only between two requests, so the
    master kills it (SIGABRT: an HTML 500 and the memory of the whole process lost) when one
    turn lasts longer than ``timeout``: raise that above the longest turn. The gthread worker
    tells it from its own loop, whatever its threads do, but a turn holds a thread while it
    runs and while it waits in the queue: give it a thread for each, and a few to spare
    (a --threads below that is raised too; PI_AGENT_MAX_QUEUE is the setting to lower).
    """
    from pi_agent.hosts import SPARE_THREADS, threads_needed

    worker = server.cfg.worker_class_str
    if worker in ("sync", "gunicorn.workers.sync.SyncWorker") and server.cfg.timeout:
        needed = math.ceil(settings.total_timeout) + SYNC_TIMEOUT_MARGIN
        if server.cfg.timeout < needed:
            server.cfg.set("timeout", needed)
            server.timeout = needed  # the Arbiter copied the setting before this hook ran
            server.log.info("pi-agent: timeout raised to %d s for the sync worker "
                            "(PI_AGENT_TOTAL_TIMEOUT + %d s)", needed, SYNC_TIMEOUT_MARGIN)
    elif worker in ("gthread", "gunicorn.workers.gthread.ThreadWorker"):
        needed = threads_needed(settings)
        if server.cfg.threads < needed:
            server.cfg.set("threads", needed)
            server.log.info("pi-agent: threads raised to %d for the gthread worker "
                            "(PI_AGENT_MAX_CONCURRENT + PI_AGENT_MAX_QUEUE + %d)",
                            needed, SPARE_THREADS)


def pre_request(worker, req):
    """Refuse an oversized body before gunicorn invites it or waits for it (see
    pi_agent/worker.py)."""
    from pi_agent.worker import guard_body

    config = getattr(worker.wsgi, "config", None)
    limit = config.get("MAX_CONTENT_LENGTH") if config is not None else None
    guard_body(req, limit or _settings.max_body_bytes)
    worker.log.debug("%s %s", req.method, req.path)


def post_worker_init(worker):
    """On SIGTERM, tell the app when graceful_timeout runs out, so that an event stream still
    running then ends with an error event server_shutting_down instead of a silent cut."""
    import signal

    from pi_agent.state import announce_shutdown

    previous = signal.getsignal(signal.SIGTERM)

    def handle_term(sig, frame):
        announce_shutdown(worker.wsgi, worker.cfg.graceful_timeout)
        if callable(previous):
            previous(sig, frame)

    signal.signal(signal.SIGTERM, handle_term)
    signal.siginterrupt(signal.SIGTERM, False)
