"""W&B that never hangs a run: mode choice, a bounded start with offline fallback, cleanup.

:class:`WandbLogger` is Lightning's logger whose run starts within a bounded time or falls
back to W&B's offline mode, saying so on stderr:

1. no ``WANDB_MODE`` and no API key: offline at once (no prompt, ever);
2. the service does not answer an HTTP request within ``connect_timeout`` seconds (5; no
   network, a closed port, a host that accepts connections but never replies): offline;
3. ``wandb.init`` fails (a bad key, a server error) or takes more than ``init_timeout``
   seconds (30; W&B's own ``init_timeout`` setting): offline.

So a run starts logging after at most ``connect_timeout + init_timeout`` seconds plus the
offline start (about a second). An offline run lives in ``{save_dir}/wandb/offline-run-*``;
``wandb sync DIR`` uploads it later (the CLI prints the command). A resumed run passes its
W&B id (``resume="allow"``), so its rows join the same W&B run.

Once a run has started online, W&B uploads from its own process; losing the network later
does not block training.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = [
    "WandbLogger",
    "ensure_wandb_mode",
    "finish_wandb_runs",
    "is_offline",
    "offline_folders",
    "wandb_api_key_available",
    "wandb_base_url",
    "wandb_service_problem",
]

OFFLINE_MODES = ("offline", "dryrun")


def _say(message: str) -> None:
    print(f"nclightning: {message}", file=sys.stderr, flush=True)


def wandb_base_url() -> str:
    """The W&B server: ``WANDB_BASE_URL``, else wandb's default."""
    url = os.environ.get("WANDB_BASE_URL", "").strip()
    if url:
        return url.rstrip("/")
    try:
        from wandb.sdk.lib import urls

        return urls.DEFAULT_BASE_URL
    except Exception:
        return "https://api.wandb.ai"


def wandb_api_key_available() -> bool:
    """Whether a W&B API key is configured (environment or netrc), without any network call."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return bool(read_netrc_auth(host=wandb_base_url()))
    except ImportError:
        pass
    except Exception:  # a malformed key counts as one: wandb.init reports it
        return True
    import netrc

    host = wandb_base_url().split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def ensure_wandb_mode() -> str | None:
    """Choose W&B offline mode when no mode is set and no API key exists; return the mode."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if wandb_api_key_available():
        return None
    os.environ["WANDB_MODE"] = "offline"
    _say(
        "no W&B API key found (WANDB_API_KEY or `wandb login`): logging to W&B in offline "
        "mode. Set WANDB_MODE=disabled to turn W&B off."
    )
    return "offline"


def wandb_service_problem(url: str | None = None, timeout: float = 5.0) -> str | None:
    """Why the W&B service at ``url`` cannot be used now, or None if it answers HTTP.

    Any HTTP answer (even an error status) counts as an answer; a refused connection, a name
    that does not resolve, or no answer within ``timeout`` seconds (name lookup included) is
    a problem. Proxies of the environment are used as by ``urllib``.
    """
    url = (url or wandb_base_url()).rstrip("/")
    result: list[str | None] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=timeout):
                result.append(None)
        except urllib.error.HTTPError:
            result.append(None)
        except Exception as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError):
                result.append(f"{url} did not answer within {timeout:g} s")
            else:
                result.append(f"{url} unreachable: {reason}")

    thread = threading.Thread(target=probe, daemon=True, name="nclightning-wandb-probe")
    thread.start()
    thread.join(timeout + 0.5)
    if not result:
        return f"{url} did not answer within {timeout:g} s"
    return result[0]


def is_offline(run: Any) -> bool:
    """Whether a wandb run object logs offline."""
    if getattr(run, "offline", None) is not None:
        return bool(run.offline)
    mode = getattr(getattr(run, "settings", None), "mode", None)
    return mode in OFFLINE_MODES


def _run_folders(directory: Path) -> set[Path]:
    wandb_dir = directory / "wandb"
    return set(wandb_dir.glob("run-*")) if wandb_dir.is_dir() else set()


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` whose run starts in bounded time or falls back offline.

    Takes every argument of :class:`lightning.pytorch.loggers.WandbLogger`, plus:

    Args:
        connect_timeout: seconds the service has to answer one HTTP request before the run
            goes offline (default 5).
        init_timeout: seconds ``wandb.init`` may take online before the run goes offline
            (default 30; an ``init_timeout`` in ``settings`` wins).
        fallback: ``"offline"`` (default) or ``"disabled"``: what to do when online fails.

    ``fallback_reason`` says why the run went offline (None when it did not).

    Example:
        Without an API key (as here) the run is offline from the start, never a prompt.

        >>> import os, tempfile
        >>> from nclightning.loggers import WandbLogger, ensure_wandb_mode
        >>> mode = ensure_wandb_mode()  # WANDB_MODE=offline when no mode and no key are set
        >>> with tempfile.TemporaryDirectory() as root:
        ...     logger = WandbLogger(project="demo", save_dir=root, offline=True)
        ...     logger.log_metrics({"nc-train/penultimate/nc1": 0.5}, step=0)
        ...     logger.experiment.finish()
        ...     print(sorted(os.listdir(root)))
        ['wandb']
    """

    def __init__(
        self,
        *args: Any,
        connect_timeout: float = 5.0,
        init_timeout: float = 30.0,
        fallback: Literal["offline", "disabled"] = "offline",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if fallback not in ("offline", "disabled"):
            raise ValueError(f"fallback must be 'offline' or 'disabled', got {fallback!r}")
        self.connect_timeout = float(connect_timeout)
        self.init_timeout = float(init_timeout)
        self.fallback = fallback
        self.fallback_reason: str | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        import wandb

        if (
            self._experiment is None
            and wandb.run is None
            and getattr(self, "_attach_id", None) is None
        ):
            self._experiment = self._start_run()
            if getattr(self._experiment, "define_metric", None):
                self._experiment.define_metric("trainer/global_step")
                self._experiment.define_metric(
                    "*", step_metric="trainer/global_step", step_sync=True
                )
        return _LightningWandbLogger.experiment.fget(self)  # type: ignore[attr-defined]

    def _mode_now(self) -> str | None:
        """The mode asked for now: ``mode=``, then ``offline=True``, then ``WANDB_MODE``.

        wandb reads ``WANDB_MODE`` once, when its process-wide setup first runs, and keeps that
        mode for every later run of the process (a notebook, a test session, a study); the
        mode is therefore resolved here and passed to each ``wandb.init`` explicitly.
        """
        mode = self._wandb_init.get("mode")
        if mode:
            return str(mode)
        if self._offline:
            return "offline"
        return os.environ.get("WANDB_MODE") or None

    def _online_wanted(self) -> bool:
        return self._mode_now() not in (*OFFLINE_MODES, "disabled")

    def _start_run(self) -> Any:
        """``wandb.init`` within the bounds of the class docstring, else the fallback."""
        import wandb

        mode = self._mode_now()
        if mode is not None:
            self._wandb_init["mode"] = mode
        if not self._online_wanted():
            return wandb.init(**self._wandb_init)
        start = time.monotonic()
        if not wandb_api_key_available():
            problem: str | None = "no W&B API key found (WANDB_API_KEY or `wandb login`)"
        else:
            problem = wandb_service_problem(timeout=self.connect_timeout)
        if problem is None:
            folders = _run_folders(Path(self._wandb_init.get("dir") or "."))
            attempt = time.monotonic()
            try:
                return wandb.init(**self._wandb_init, **self._timeout_settings())
            except Exception as err:  # wandb raises CommError, AuthenticationError, UsageError
                problem = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                if time.monotonic() - attempt >= self.init_timeout:
                    problem = f"wandb.init took more than {self.init_timeout:g} s: {problem}"
                self._remove_failed_attempt(folders)
        self.fallback_reason = problem
        _say(
            f"W&B unavailable after {time.monotonic() - start:.0f} s ({problem}); logging to "
            f"W&B in {self.fallback} mode instead"
        )
        return wandb.init(**{**self._wandb_init, "mode": self.fallback})

    def _timeout_settings(self) -> dict[str, Any]:
        import wandb

        settings = self._wandb_init.get("settings")
        if settings is None:
            return {"settings": wandb.Settings(init_timeout=self.init_timeout)}
        if isinstance(settings, dict) and "init_timeout" not in settings:
            return {"settings": {**settings, "init_timeout": self.init_timeout}}
        return {}

    def _remove_failed_attempt(self, before: set[Path]) -> None:
        """Delete the local folders a failed online ``wandb.init`` left behind."""
        import wandb

        try:
            wandb.teardown()
        except Exception:
            pass
        for folder in _run_folders(Path(self._wandb_init.get("dir") or ".")) - before:
            shutil.rmtree(folder, ignore_errors=True)

    def resume_run(self, run_id: str) -> None:
        """Continue the W&B run ``run_id`` (``resume="allow"``); call before the run starts."""
        if self._experiment is not None:
            raise RuntimeError("WandbLogger.resume_run must be called before the run starts")
        self._id = run_id
        self._wandb_init.update(id=run_id, resume="allow")


def offline_folders(run_dir: Path, run_id: str | None) -> list[Path]:
    """Every offline folder of the W&B run ``run_id`` beside ``run_dir`` (one per resumed
    part, oldest first), ``run_dir`` included."""
    found = set()
    if run_id:
        found = {f for f in run_dir.parent.glob(f"offline-run-*-{run_id}") if f.is_dir()}
    return sorted(found | {run_dir}, key=lambda f: f.name)


def finish_wandb_runs(trainer: Any, exit_code: int = 0) -> None:
    """Close the trainer's W&B runs and say where each went (and, offline, how to upload it).

    Closing matters beyond the process: wandb keeps a process-wide current run that a later
    ``WandbLogger`` would otherwise silently reuse.
    """
    if trainer is None:
        return
    for logger in trainer.loggers:
        if not isinstance(logger, _LightningWandbLogger) or logger._experiment is None:
            continue
        run = logger._experiment
        if trainer.is_global_zero and getattr(run, "dir", None):
            run_dir = Path(run.dir).parent
            if is_offline(run):
                folders = offline_folders(run_dir, getattr(run, "id", None))
                _say(f"W&B run saved offline in {run_dir}")
                if len(folders) > 1:  # a resumed run: each part has its own folder
                    _say(f"the run {run.id} is in {len(folders)} offline folders (resumed)")
                _say("upload it with:  wandb sync " + " ".join(str(f) for f in folders))
            elif getattr(run, "url", None):
                _say(f"W&B run at {run.url}")
        if hasattr(run, "finish"):
            run.finish(exit_code=exit_code)
