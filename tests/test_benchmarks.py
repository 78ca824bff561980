"""The benchmark harness's own files: nothing that would break the peers' imports."""
import pathlib
import sys


def test_no_benchmark_module_shadows_the_standard_library():
    # benchmarks/run.py runs as a script, so its folder is first on sys.path in every worker: a
    # benchmarks/profile.py once shadowed the stdlib `profile`, and torch's `import cProfile` (via
    # transformers -> torchvision -> torch._dynamo) failed, taking imagen-pytorch's import with it.
    names = {p.stem for p in (pathlib.Path(__file__).parents[1] / "benchmarks").glob("*.py")}
    assert not names & set(sys.stdlib_module_names), sorted(names & set(sys.stdlib_module_names))
