"""Shared command-line plumbing of the entry points: one-line errors, exit statuses (0 ok, 1 a
runtime error, 2 a usage error: a bad flag, value or path) and checks that an output can be written
before any work starts."""
import os
import sys

from absl import flags
from etils import epath


class UsageError(ValueError):
    """Bad user input found before any work: exit status 2."""


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


def configs_dir():
    """The folder of the stage configs: the checkout's top-level configs/, or the copy an installed
    wheel carries as the top-level package `configs` (None when neither is importable)."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("configs")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return next((d for d in locations if os.path.isfile(os.path.join(d, "common.py"))), None)


def config_names():
    d = configs_dir()
    return sorted(f[:-3] for f in os.listdir(d) if f.endswith(".py") and f not in ("__init__.py", "common.py")) \
        if d else []


def resolve_config(value):
    """`--config` value -> a config file path (with its `:variant`): a file that exists is taken as
    given; `NAME[:variant]` or `configs/NAME.py[:variant]` that is not a file here is looked up among
    the project's configs (so an installed package finds `base64:tiny` from any directory)."""
    path, sep, variant = str(value).partition(":")
    if not path or os.path.exists(path):
        return value
    name = os.path.basename(path)
    name = name[:-3] if name.endswith(".py") else name
    d = configs_dir()
    by_name = path == name or os.path.normpath(os.path.dirname(path)) == "configs"
    if d and by_name and os.path.isfile(os.path.join(d, name + ".py")):
        return os.path.join(d, name + ".py") + sep + variant
    return value


def define_config(name="config", help_string="Stage config: configs/<stage>.py[:variant] or <stage>[:variant]."):
    """An ml_collections config-file flag whose value may also be a config name (resolve_config)."""
    from ml_collections import config_flags

    holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)
    flag = flags.FLAGS[name]

    class _Parser(type(flag.parser)):
        def parse(self, path):
            return super().parse(resolve_config(path))

    parser = _Parser.__new__(_Parser)
    parser.__dict__.update(flag.parser.__dict__)
    flag.parser = parser
    # absl files the flag under this module; the tool's --help lists the flags of the tool's module.
    caller = sys._getframe(1).f_globals.get("__name__")
    flags.FLAGS.register_flag_by_module(sys.argv[0] if caller == "__main__" else caller, flag)
    return holder


HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")


def help_text(module) -> str:
    """A tool's --help: its module docstring (the command and what it writes), then every flag
    the tool defines, with its default."""
    names = {module.__name__, getattr(module, "__file__", None)}
    if module.__name__ == "__main__" and getattr(module, "__spec__", None) is not None:
        names.add(module.__spec__.name)
    by_module = flags.FLAGS.flags_by_module_dict()
    parts = [(module.__doc__ or "").strip(), "", "flags:"]
    for key in by_module:
        if key in names:
            parts.append(flags.FLAGS.module_help(key).split("\n", 1)[-1])
    parts.append("\nTry --helpfull to get a list of all flags (absl's and jax's included).")
    return "\n".join(parts)


def parse_own_flags(flag_values, argv, module_doc):
    """Parses argv (flags only, no program name) into a tool's own absl FlagValues, so that its
    main(argv) can be called again in one process (tests, notebooks) and next to other tools whose
    flags share names. --help prints module_doc and the flags, SystemExit(0); a bad, missing or
    unknown flag prints one line, SystemExit(2)."""
    argv = list(argv)
    head = argv[:argv.index("--")] if "--" in argv else argv
    if any(a in HELP_FLAGS + ("--helpfull", "-helpfull") for a in head):
        print("\n".join([(module_doc or "").strip(), "", "flags:",
                         flag_values.get_help(include_special_flags=False).split("\n", 1)[-1]]))
        raise SystemExit(0)
    if flag_values.is_parsed():  # a rerun in one process: forget the last call's values
        import logging
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.WARNING)  # absl logs every unparse at INFO
        try:
            flag_values.unparse_flags()
        finally:
            root.setLevel(level)
    try:
        rest = flag_values(["prog"] + argv)
    except (flags.Error, ValueError, TypeError) as e:
        print(f"error: bad command-line flag: {one_line(e)} (see --help)", file=sys.stderr)
        raise SystemExit(2) from None
    if len(rest) > 1:
        print(f"error: unexpected argument {rest[1]!r}: every input is a --flag (see --help)", file=sys.stderr)
        raise SystemExit(2)
    return flag_values


def console_main(main):
    """Runs an absl entry point (`python -m imagen_jax.X` and the console scripts `imagen-X`):
    --help prints help_text and exits 0 (absl's exits 1 and, from a console script, lists no flags),
    flags are parsed by parse_flags, the exit status is main's."""
    from absl import app

    module = sys.modules[main.__module__]
    argv = sys.argv[1:]
    argv = argv[:argv.index("--")] if "--" in argv else argv  # what follows "--" is not a flag
    if any(a in HELP_FLAGS for a in argv):
        print(help_text(module))
        sys.exit(0)
    if any(a in ("--helpfull", "-helpfull") for a in argv):
        print(flags.FLAGS.get_help())
        sys.exit(0)
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


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
                             "(give configs/<stage>.py[:variant] or a config name: "
                             f"{', '.join(config_names()) or 'none found'})") from None
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
