"""Shared command-line plumbing of the entry points: one-line errors, exit statuses (0 ok, 1 a
runtime error, 2 a usage error: a bad flag, value or path) and checks that an output can be written
before any work starts."""
import argparse
import os
import sys

from absl import flags
from etils import epath


class UsageError(ValueError):
    """Bad user input found before any work: exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag on one line (not usage + error) with exit status 2."""

    def error(self, message):
        print(f"{self.prog.split('.')[-1]}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def one_line(e: BaseException) -> str:
    """The message of `e` (or of the error it wraps) on one line, without a flattened traceback."""
    while e.__cause__ is not None and not str(e).strip():
        e = e.__cause__
    text = str(e)
    if "Traceback (most recent call last)" in text:
        # ml_collections embeds the config module's whole traceback; its last line is the error.
        lines = [ln.strip() for ln in text.replace("\\n", "\n").splitlines() if ln.strip()]
        text = lines[-1] if lines else type(e).__name__
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    text = " ".join(text.replace("\\n", " ").replace("\\'", "'").split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # absl quotes whole messages
        text = text[1:-1].strip()
    return text or type(e).__name__


def parse_flags(argv):
    """absl flag parsing that reports a bad flag or config override (`--config.train.batchsize=3`)
    as one line and exit status 2, instead of absl's chained tracebacks."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError) as e:
        print(f"error: bad command-line flag: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def config_flag(name="config"):
    """The config of an ml_collections config flag; a missing file or an unknown variant (raised when
    the flag is first read) becomes a UsageError naming it."""
    try:
        config = getattr(flags.FLAGS, name)
        if config is not None:
            config.get("stage")  # a config that failed to load raises on first use, not on access
        return config
    except Exception as e:  # noqa: BLE001 -- whatever loading the config module raises is the user's config
        chain, c = [], e
        while c is not None and len(chain) < 8:
            chain.append(str(c))
            c = c.__cause__ or c.__context__
        where = flags.FLAGS[name].serialize().split("=", 1)[-1]
        if any("No such file" in t or "Errno 2" in t for t in chain):
            raise UsageError(f"--{name}: config file {where.split(':')[0]!r} does not exist "
                             "(give configs/<stage>.py[:variant])") from None
        raise UsageError(f"--{name} {where}: {one_line(e)}") from None


def check_output(p, flag):
    """Raises UsageError unless directory `p` exists or can be created: no ancestor is a regular
    file and the nearest existing ancestor is writable. gs:// paths are left to the path layer."""
    p = os.fspath(p)
    if "://" in p:
        return
    q = epath.Path(os.path.abspath(p))
    if q.exists() and not q.is_dir():
        raise UsageError(f"{flag} {p} is a regular file, not a directory; give a directory path")
    anc = q
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"{flag} {p}: {anc} is a regular file, so nothing can be created under it; "
                         "give another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {p}: {anc} is not writable; give a writable path")


def overlaps(a, b) -> bool:
    """True when local paths a and b are the same or one holds the other."""
    a, b = os.path.realpath(os.fspath(a)), os.path.realpath(os.fspath(b))
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def run(fn, *args, prefix="error: ", **kwargs) -> int:
    """Calls fn; returns 0, or prints one line and returns 2 (UsageError) or 1 (any other error a
    user's input, files or machine can cause). Programming errors keep their traceback."""
    try:
        fn(*args, **kwargs)
    except UsageError as e:
        print(f"{prefix}{one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError, RuntimeError, MemoryError, EOFError) as e:
        print(f"{prefix}{one_line(e)}", file=sys.stderr)
        return 1
    return 0
