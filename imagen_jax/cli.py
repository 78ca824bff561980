"""Shared command-line plumbing of the entry points."""
import sys

from absl import flags


def parse_flags(argv):
    """absl flag parsing that reports a bad flag or config override (`--config.train.batchsize=3`)
    as one line and exit status 2, instead of absl's chained tracebacks."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
        msg = str(e).replace("\\n", " ").replace("\\'", "'").replace("\n", " ").strip("'\" ")
        print(f"error: bad command-line flag: {msg}", file=sys.stderr)
        sys.exit(2)
