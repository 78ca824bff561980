"""The benchmark harness's own files: nothing that would break the peers' imports."""
import pathlib
import sys


def test_no_benchmark_module_shadows_the_standard_library():
    # benchmarks/run.py runs as a script, so its folder is first on sys.path in every worker: a
    # benchmarks/profile.py once shadowed the stdlib `profile`, and torch's `import cProfile` (via
    # transformers -> torchvision -> torch._dynamo) failed, taking imagen-pytorch's import with it.
    names = {p.stem for p in (pathlib.Path(__file__).parents[1] / "benchmarks").glob("*.py")}
    assert not names & set(sys.stdlib_module_names), sorted(names & set(sys.stdlib_module_names))


def test_pipelined_timing_syncs_once_a_run():
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    import timing

    events = []

    def step():
        events.append("step")
        return len(events)

    def sync(x):
        events.append("sync")

    t = timing.measure(step, sync, warmup=1, iters=3, budget_s=60, log=lambda *a, **k: None, pipelined=5, blocks=2)
    # warm-up and the per-step timing sync after every step; each pipelined run syncs once, after 5.
    assert events == ["step", "sync"] * 4 + (["step"] * 5 + ["sync"]) * 2
    assert t["iters"] == 3 and t["pipelined_block"] == 5 and len(t["pipelined_times_s"]) == 2
    assert 0 < t["pipelined_median_s"] < t["median_s"] * 5 + 1
