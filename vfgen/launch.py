"""Run one `vllm serve` so that no two instances on a GPU are ever starting at the same time.

vLLM corrupts its memory accounting when two instances start together on one GPU, so
every instance runs under this launcher, which:

1. waits until every --after instance is healthy, or its start ended without it
   (it held the lock and let go of it), bounded by --lock-timeout;
2. takes every --lock file with flock(LOCK_EX), in sorted path order so tensor-parallel
   instances sharing GPUs cannot deadlock; the kernel drops a flock when its holder
   dies, so no stale lock survives a kill -9 or a reboot. Steps 1 and 2 share one
   deadline, --lock-timeout seconds (none without it); past it the launcher exits 1
   without starting anything;
3. starts the child with PR_SET_PDEATHSIG=SIGKILL, so it never outlives the launcher,
   and without the lock fds;
4. forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to the child;
5. releases the locks once --health-url is healthy (as `vfgen health wait` defines it),
   or when the child exits first, or after killing it at --start-timeout, which counts
   from the moment the locks are held;
6. waits for the child and exits with its exit code (128+N when killed by signal N).

Usage: python -m vfgen.launch [--lock PATH]... [--after URL]... --health-url URL
       [--served-model-name NAME] [--start-timeout S] [--lock-timeout S]
       [--env KEY=VALUE]... [--env-file PATH]
       [--] COMMAND...

It wraps every vLLM process for its whole life, so it imports only the standard library,
vfgen.procfs, vfgen.quoting's name rule and the probe from vfgen.health. All its lines go to stderr, prefixed
`vfgen-launch[<served name>:<port>]:`.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from urllib.parse import urlparse

from vfgen import procfs
from vfgen.quoting import ENV_NAME
from vfgen.health import Target, probe, wait

STOP_GRACE_S = 10.0  # SIGTERM → SIGKILL delay for a child that missed --start-timeout
LOCK_POLL_S = 0.1
LOCK_REPORT_EVERY_S = 10.0
LOCK_NAME_GRACE_S = 1.0  # how long a fresh holder may take to write its pid into the lock file
HEALTH_POLL_S = 0.5
HEALTH_REPORT_EVERY_S = 30.0
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a child that exits 0 (or dies of these) after them stopped cleanly
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
ORPHAN_GRACE_S = 3.0  # what the child left behind may end on its own this long, then SIGKILL


class _StopRequested(BaseException):
    """A stop signal arrived before the child existed (BaseException: no library may swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


class EnvFileError(Exception):
    pass


def read_env_file(path: str) -> dict[str, str]:
    """The variables systemd's EnvironmentFile= would set from `path`, read the same way.

    Under systemd the unit's EnvironmentFile= reads the file; under supervisord this launcher
    does. Both must give the child the same environment, so this follows systemd 252's parser
    (src/basic/env-file.c, then strv_env_clean): see parse_env_text for the syntax. Assignments
    systemd drops (a line without `=`, an invalid name) are dropped here too, with a warning
    naming the line; invalid UTF-8 or a NUL byte fails the start, as it fails systemd's. Values are never
    echoed: the file holds secrets.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise EnvFileError(f"cannot read env file {path}: {exc.strerror or exc}") from None
    if b"\0" in raw:
        raise EnvFileError(f"{path}: a NUL byte (systemd refuses to start with this file)")
    text = raw.decode("utf-8", "surrogateescape")
    env: dict[str, str] = {}
    for line, key, value in parse_env_text(text):
        if value is None:
            _warn(f"{path}:{line}: not a KEY=VALUE line; ignored, as systemd ignores it")
        elif _has_invalid_utf8(key) or _has_invalid_utf8(value):
            raise EnvFileError(f"{path}:{line}: invalid UTF-8 (systemd refuses to start with this file)")
        elif not ENV_NAME.fullmatch(key):
            _warn(f"{path}:{line}: invalid variable name; ignored, as systemd ignores it")
        else:
            env.pop(key, None)  # the last assignment of a name wins, as in systemd
            env[key] = value
    return env


_SPACE, _NEWLINE, _COMMENT, _SHELL_ESCAPED = " \t\n\r", "\n\r", "#;", '"\\`$'


def _has_invalid_utf8(text: str | None) -> bool:
    return text is not None and any("\udc80" <= ch <= "\udcff" for ch in text)


def _warn(message: str) -> None:
    print(f"vfgen-launch: {message}", file=sys.stderr, flush=True)


def _blank_run_start(ch: str, buf: list[str], start: int | None) -> int | None:
    """Where the run of blanks at the end of `buf` starts once `ch` is appended (None: no run)."""
    if ch not in _SPACE:
        return None
    return len(buf) if start is None else start


def parse_env_text(text: str) -> list[tuple[int, str, str | None]]:
    """(line, key, value) per assignment, as systemd's env-file state machine reads them.

    - Lines whose first non-blank character is # or ; are comments; a backslash at the end
      of a comment line continues the comment. CR counts as a line end, like LF.
    - Blanks around the key and before the value are dropped. A line without `=` yields
      value None (systemd skips it).
    - Unquoted values lose trailing blanks; a backslash keeps the next character literally,
      and a backslash before a line end joins the next line.
    - 'single quotes' keep everything literally, newlines included.
    - In "double quotes", a backslash escapes only " \\ ` $ and a line end; before any other
      character it stays.
    - After a closing quote, parsing goes on as before the value: blanks are skipped and
      whatever follows is appended, so `"a" "b"` gives ab.
    """
    out: list[tuple[int, str, str | None]] = []
    state = "pre_key"
    key: list[str] = []
    value: list[str] = []
    key_blank_at = value_blank_at = None  # where a run of trailing blanks starts
    line = start_line = 1

    def push(chomp: bool) -> None:
        k = "".join(key[:key_blank_at] if key_blank_at is not None else key)
        v = value[:value_blank_at] if chomp and value_blank_at is not None else value
        out.append((start_line, k, "".join(v)))

    for ch in text:
        if state == "pre_key":
            if ch in _COMMENT:
                state = "comment"
            elif ch not in _SPACE:
                state, key, value, key_blank_at, start_line = "key", [ch], [], None, line
        elif state == "key":
            if ch in _NEWLINE:
                out.append((start_line, "".join(key), None))
                state = "pre_key"
            elif ch == "=":
                state, value_blank_at = "pre_value", None
            else:
                key_blank_at = _blank_run_start(ch, key, key_blank_at)
                key.append(ch)
        elif state == "pre_value":
            if ch in _NEWLINE:
                push(chomp=False)
                state = "pre_key"
            elif ch == "'":
                state = "single"
            elif ch == '"':
                state = "double"
            elif ch == "\\":
                state = "escape"
            elif ch not in _SPACE:
                state = "value"
                value.append(ch)
        elif state == "value":
            if ch in _NEWLINE:
                push(chomp=True)
                state = "pre_key"
            elif ch == "\\":
                state, value_blank_at = "escape", None
            else:
                value_blank_at = _blank_run_start(ch, value, value_blank_at)
                value.append(ch)
        elif state == "escape":
            state = "value"
            if ch not in _NEWLINE:
                value.append(ch)
        elif state == "single":
            if ch == "'":
                state = "pre_value"
            else:
                value.append(ch)
        elif state == "double":
            if ch == '"':
                state = "pre_value"
            elif ch == "\\":
                state = "double_escape"
            else:
                value.append(ch)
        elif state == "double_escape":
            state = "double"
            if ch in _SHELL_ESCAPED:
                value.append(ch)
            elif ch != "\n":
                value += ["\\", ch]
        elif state == "comment":
            if ch == "\\":
                state = "comment_escape"
            elif ch in _NEWLINE:
                state = "pre_key"
        else:  # comment_escape
            state = "comment"
        if ch == "\n":
            line += 1
    if state == "key":
        out.append((start_line, "".join(key), None))
    elif state not in ("pre_key", "comment", "comment_escape"):
        push(chomp=state == "value")
    return out


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


class _LockTimeout(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfgen launch", allow_abbrev=False,
        description="Start a vLLM instance under per-GPU start-up locks.",
        usage="%(prog)s [options] -- COMMAND [ARG...]",
    )
    parser.add_argument("--lock", action="append", default=[], metavar="PATH",
                        help="lock file held from before the start until healthy (repeatable)")
    parser.add_argument("--after", action="append", default=[], metavar="URL",
                        help="instance that must be healthy before this one starts (repeatable)")
    parser.add_argument("--health-url", required=True, metavar="URL", help="base URL of this instance")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="model /v1/models must list (default: any)")
    parser.add_argument("--start-timeout", type=_positive, default=900.0, metavar="S",
                        help="seconds the child may take to become healthy, once the locks are held")
    parser.add_argument("--lock-timeout", type=_non_negative, default=None, metavar="S",
                        help="seconds to wait for the --after instances and the locks (default: no bound)")
    parser.add_argument("--env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment variable for the child (repeatable)")
    parser.add_argument("--env-file", default=None, metavar="PATH",
                        help="KEY=VALUE lines (# comments) read at start, for secrets; they override --env")
    return parser


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = _parser()
    # The command is everything from the first non-option word on, so the `--` before it is
    # optional: click (typer) swallows it when the CLI passes these arguments through.
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("nothing to run: give the command after `--`")
    return args, command


def _load_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux


class _Launcher:
    def __init__(self, args: argparse.Namespace, command: list[str]):
        self.args = args
        self.command = command
        try:
            port = urlparse(args.health_url).port
        except ValueError:
            port = None
        self.label = f"{args.served_model_name or 'vllm'}:{port if port is not None else '?'}"
        self.prefix = f"vfgen-launch[{self.label}]: "
        self.child_env = {**os.environ, **dict(args.env)}
        self.locks: list[tuple[str, int]] = []  # (path, fd), in acquisition order
        self.child: subprocess.Popen | None = None
        self.spawning = False
        self.signals: list[int] = []  # every signal received since the child exists or is forking
        self.arrived_while_forking: list[int] = []
        self.deadline: float | None = None  # for steps 1 and 2 (--lock-timeout)

    # Written with os.write: a signal handler may log while the main code is logging,
    # and Python's buffered streams raise on such re-entrant writes.
    def say(self, message: str) -> None:
        try:
            os.write(2, (self.prefix + message + "\n").encode(errors="replace"))
        except OSError:
            pass

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.child is not None:
            self.signals.append(signum)
            self._forward(signum)
        elif self.spawning:
            self.signals.append(signum)
            self.arrived_while_forking.append(signum)  # forwarded as soon as Popen returns
        else:
            raise _StopRequested(signum)

    def _forward(self, signum: int) -> None:
        if self.child is None or self.child.returncode is not None:
            return  # never signal a reaped pid: it may belong to someone else by now
        self.say(f"forwarding {signal.Signals(signum).name} to pid {self.child.pid}")
        try:
            os.kill(self.child.pid, signum)
        except ProcessLookupError:
            pass

    def _stop_requested(self) -> bool:
        return any(sig in STOP_SIGNALS for sig in self.signals)

    # -- 1. predecessors ---------------------------------------------------------------
    def wait_for_predecessors(self) -> None:
        """Until every --after URL is healthy, or a predecessor seen holding a lock let go of
        it without becoming healthy (its start failed or timed out: waiting longer only lets
        its restart take the lock again), or the lock deadline."""
        if not self.args.after:
            return
        if self.deadline is None:  # launchers rendered before --lock-timeout existed
            status = wait(self.args.after, model=None, timeout=self.args.start_timeout, out=_PrefixedOut(self.say))
            if status != 0:
                self.say(f"warning: {', '.join(self.args.after)} not healthy after {self.args.start_timeout:g}s; "
                         "starting anyway")
            return
        ports = {_port(url) for url in self.args.after} - {None}
        targets = [Target(name=url, url=url) for url in self.args.after]
        began = time.monotonic()
        seen_holding = False
        next_report = began + HEALTH_REPORT_EVERY_S
        self.say(f"waiting up to {self.deadline - began:.0f}s for {', '.join(self.args.after)} to be healthy")
        while True:
            holding = any(_holder_port(path) in ports for path in self.args.lock)
            if all(probe(t, timeout=1.0).state == "healthy" for t in targets):
                self.say(f"{', '.join(self.args.after)} healthy after {time.monotonic() - began:.1f}s")
                return
            if seen_holding and not holding:
                self.say(f"warning: {', '.join(self.args.after)} released the start lock without becoming "
                         "healthy; starting anyway")
                return
            seen_holding = seen_holding or holding
            now = time.monotonic()
            if now >= self.deadline:
                self.say(f"warning: {', '.join(self.args.after)} not healthy after {now - began:.0f}s; starting anyway")
                return
            if now >= next_report:
                self.say(f"still waiting for {', '.join(self.args.after)} ({now - began:.0f}s so far)")
                next_report = now + HEALTH_REPORT_EVERY_S
            time.sleep(HEALTH_POLL_S)

    # -- 2. locks ----------------------------------------------------------------------
    def take_locks(self) -> None:
        for path in sorted({os.path.abspath(p) for p in self.args.lock}):
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self.locks.append((path, fd))
            began = time.monotonic()
            next_report = began
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    holder = _holder(fd)
                    if self.deadline is not None and now >= self.deadline:
                        raise _LockTimeout(f"lock {path} not free after {now - began:.0f}s ({holder}); "
                                           f"--lock-timeout is {self.args.lock_timeout:g}s; not starting")
                    # A holder writes its pid just after taking the lock: give it a moment
                    # before reporting a holder without one.
                    named = holder.startswith("held by pid") or now - began >= LOCK_NAME_GRACE_S
                    if now >= next_report and named:
                        self.say(f"waiting for lock {path} ({holder}; {now - began:.0f}s so far)")
                        next_report = now + LOCK_REPORT_EVERY_S
                    time.sleep(LOCK_POLL_S)
            if time.monotonic() - began > LOCK_POLL_S:
                self.say(f"acquired lock {path} after {time.monotonic() - began:.1f}s")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {self.label}\n".encode(), 0)

    def release_locks(self) -> list[str]:
        released = []
        for path, fd in reversed(self.locks):
            try:
                os.ftruncate(fd, 0)  # so the next waiter does not report us as the holder
            except OSError:
                pass
            os.close(fd)
            released.append(path)
        self.locks.clear()
        return released[::-1]

    # -- 3. child ----------------------------------------------------------------------
    def spawn(self) -> None:
        prctl = _load_prctl()
        if prctl is None:
            self.say("warning: prctl unavailable; the child may outlive a killed launcher")
        launcher_pid = os.getpid()

        def die_with_launcher() -> None:  # runs in the child between fork and exec
            if prctl is not None:
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
                os._exit(1)

        if prctl is not None:
            # Orphans of the child (vLLM's engine core and workers outlive a SIGKILLed API
            # server) become the launcher's children, so reap_orphans() can stop them.
            prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        self.spawning = True
        try:
            self.child = subprocess.Popen(self.command, env=self.child_env, close_fds=True,
                                          preexec_fn=die_with_launcher)
        finally:
            self.spawning = False
        self.say(f"started pid {self.child.pid}: {' '.join(self.command)}")
        for signum in self.arrived_while_forking:
            self._forward(signum)

    # -- 5. until healthy --------------------------------------------------------------
    def wait_until_healthy(self) -> int | None:
        """None once healthy (locks released); otherwise the launcher's exit code."""
        assert self.child is not None
        target = Target(name=self.label, url=self.args.health_url, expected_model=self.args.served_model_name)
        api_key = self.child_env.get("VLLM_API_KEY")
        started = time.monotonic()
        deadline = started + self.args.start_timeout
        next_report = started + HEALTH_REPORT_EVERY_S
        while True:
            code = self.child.poll()
            if code is not None:
                return self._exited_before_healthy(code)
            if self._stop_requested():
                return self.wait_for_exit()  # locks stay held until the child has freed the GPU
            now = time.monotonic()
            result = probe(target, timeout=max(0.1, min(2.0, deadline - now)), api_key=api_key)
            now = time.monotonic()
            if result.state == "healthy":
                released = self.release_locks()
                what = f"released GPU lock(s) {', '.join(released)}" if released else "no GPU locks to release"
                self.say(f"healthy after {now - started:.1f}s; {what}")
                return None
            if now >= deadline:
                self.say(f"not healthy after {self.args.start_timeout:g}s ({result.state}: {result.detail}); "
                         f"stopping pid {self.child.pid}")
                self._terminate_child()
                self.reap_orphans()  # vLLM's engine processes hold GPU memory: free it before the next start
                released = self.release_locks()
                if released:
                    self.say(f"released GPU lock(s) {', '.join(released)}")
                return 1
            if now >= next_report:
                self.say(f"starting for {now - started:.0f}s: {result.state} ({result.detail})")
                next_report = now + HEALTH_REPORT_EVERY_S
            try:
                self.child.wait(timeout=HEALTH_POLL_S)  # sleeps, but wakes as soon as the child exits
            except subprocess.TimeoutExpired:
                pass

    def reap_orphans(self) -> None:
        """Reap what the exited child left behind, before the locks go. Helpers that end on
        their own (multiprocessing's resource tracker) get ORPHAN_GRACE_S; what is left then
        gets SIGKILL: vLLM's engine core and worker outlive a SIGKILLed API server, holding
        its memory (GPU memory too)."""
        deadline = time.monotonic() + ORPHAN_GRACE_S
        while (left := procfs.children(os.getpid())) and time.monotonic() < deadline + ORPHAN_GRACE_S:
            late = time.monotonic() > deadline
            for pid in left:
                try:
                    if late:
                        self.say(f"killing pid {pid} ({_comm(pid)}), left behind by the child")
                        os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0 if late else os.WNOHANG)
                except (ProcessLookupError, ChildProcessError):
                    pass
            time.sleep(0.05)

    def _exited_before_healthy(self, code: int) -> int:
        self.reap_orphans()
        released = self.release_locks()
        if self._stop_requested() and (code == 0 or -code in STOP_SIGNALS):
            self.say(f"child stopped before becoming healthy ({_describe_exit(code)}); exiting 0")
            return 0
        self.say(f"child {_describe_exit(code)} before becoming healthy"
                 + (f"; released GPU lock(s) {', '.join(released)}" if released else ""))
        if code == 0:
            return 1  # a server that exits 0 before serving has failed
        return 128 - code if code < 0 else code

    def _terminate_child(self) -> None:
        assert self.child is not None
        try:
            self.child.terminate()
            self.child.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.say(f"pid {self.child.pid} ignored SIGTERM for {STOP_GRACE_S:g}s; sending SIGKILL")
            self.child.kill()
            self.child.wait()

    # -- 6. until the child exits ------------------------------------------------------
    def wait_for_exit(self) -> int:
        assert self.child is not None
        code = self.child.wait()
        self.reap_orphans()
        self.release_locks()
        if self._stop_requested() and (code == 0 or -code in STOP_SIGNALS):
            self.say(f"child stopped ({_describe_exit(code)}); exiting 0")
            return 0
        self.say(f"child {_describe_exit(code)}")
        return 128 - code if code < 0 else code

    def run(self) -> int:
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._on_signal)
        if self.args.env_file:
            try:
                self.child_env.update(read_env_file(self.args.env_file))
            except EnvFileError as exc:
                self.say(str(exc))
                return 1
        if self.args.lock_timeout is not None:
            self.deadline = time.monotonic() + self.args.lock_timeout
        try:
            self.wait_for_predecessors()
            try:
                self.take_locks()
            except _LockTimeout as exc:
                self.release_locks()
                self.say(str(exc))
                return 1
            except OSError as exc:
                self.release_locks()
                self.say(f"cannot take lock: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else ""))
                return 1
            try:
                self.spawn()
            except OSError as exc:
                self.release_locks()
                self.say(f"cannot start {self.command[0]}: {exc.strerror or exc}")
                return 127 if isinstance(exc, FileNotFoundError) else 126
        except _StopRequested as stop:
            self.release_locks()
            self.say(f"received {signal.Signals(stop.signum).name} before the child started; exiting")
            return 0 if stop.signum in STOP_SIGNALS else 128 + stop.signum
        result = self.wait_until_healthy()
        return result if result is not None else self.wait_for_exit()


class _PrefixedOut:
    """A minimal text stream that sends each complete line to the launcher's `say`."""

    def __init__(self, say):
        self._say = say
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._say(line)
        return len(text)

    def flush(self) -> None:
        pass


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return "?"


def _port(url: str) -> int | None:
    try:
        return urlparse(url).port
    except ValueError:
        return None


def _holder_port(path: str) -> int | None:
    """Port of the instance holding the lock at `path`, from what it wrote there ("PID NAME:PORT")."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(200).decode(errors="replace").strip()
    except OSError:
        return None
    pid, _, label = text.partition(" ")
    port = label.rpartition(":")[2]
    if not pid.isdigit() or not port.isdigit() or not os.path.exists(f"/proc/{pid}"):
        return None  # free, or its holder died (the kernel dropped its flock)
    return int(port)


def _holder(fd: int) -> str:
    """Who holds a lock, from what the holder wrote into the file."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    pid, _, label = text.partition(" ")
    if not pid.isdigit():
        return "held by a process that has not written its pid yet"
    return f"held by pid {pid}" + (f" ({label})" if label else "")


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def main(argv: list[str]) -> int:
    args, command = _parse(argv)
    return _Launcher(args, command).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
