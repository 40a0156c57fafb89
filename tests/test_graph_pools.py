"""The CUDA graphs' memory-pool policy, on the CPU: a stand-in for torch.cuda's graph API records
which pool each capture used, when graphs are released and when the host synchronized, and its
allocator keeps PyTorch's rule for private pools (see progan_fast/graphs.py's docstring):

- a pool id is made at its first capture with use_count 1; a capture into an id whose pool still
  exists must find use_count > 0 (``TORCH_INTERNAL_ASSERT`` in ``create_or_incref_pool``);
- ``CUDAGraph.reset()`` decrements use_count; ``empty_cache`` (run on entry to ``torch.cuda.graph``)
  forgets a pool only when use_count is 0 and none of its blocks is still allocated;
- the first capture leaves one allocation alive after its graph is gone, as the cuBLAS workspace of
  the capture stream's first ``F.linear`` does.
"""

import itertools
import weakref

import pytest
import torch

from progan_fast import graphs as graphs_module
from progan_fast.graphs import StageGraphs


class FakeCudaAPI:
    def __init__(self):
        self.log = []  # ("capture", graph number, pool) / ("reset", graph number) / ("sync",) / ("empty_cache",)
        self.pools = {}  # pool id -> {"use_count": int, "live_blocks": int}
        self.ids = itertools.count(1)
        self.survivor_left = False  # the one allocation that outlives its capture (the cuBLAS workspace)
        self.graphs_made = []

    # --- the allocator's private pools
    def begin_allocate_to_pool(self, pool):
        if pool in self.pools:
            if self.pools[pool]["use_count"] <= 0:
                raise RuntimeError("INTERNAL ASSERT FAILED: it->second->use_count > 0 (create_or_incref_pool)")
            self.pools[pool]["use_count"] += 1
        else:
            self.pools[pool] = {"use_count": 1, "live_blocks": 0}

    def release_pool(self, pool):
        self.pools[pool]["use_count"] -= 1
        assert self.pools[pool]["use_count"] >= 0

    def empty_cache(self):
        self.log.append(("empty_cache",))
        for pool in [p for p, s in self.pools.items() if s["use_count"] == 0 and s["live_blocks"] == 0]:
            del self.pools[pool]

    # --- torch.cuda's names
    def graph_pool_handle(self):
        return ("pool", next(self.ids))

    def synchronize(self):
        self.log.append(("sync",))

    def install(self, monkeypatch):
        api = self

        class CUDAGraph:
            def __init__(self):
                self.pool_id, self.replays, self.was_reset = None, 0, False
                self.n = len(api.graphs_made)  # the log names graphs by number, so it keeps none alive
                api.graphs_made.append(weakref.ref(self))

            def replay(self):
                assert self.pool_id is not None and not self.was_reset, "replay of a graph that is not captured"
                self.replays += 1

            def reset(self):
                if self.pool_id is not None and not self.was_reset:
                    api.release_pool(self.pool_id)
                    api.log.append(("reset", self.n))
                self.was_reset = True

            def __del__(self):  # as PyTorch's destructor does
                if not self.was_reset and self.pool_id is not None:
                    api.release_pool(self.pool_id)
                    self.was_reset = True

        class graph:
            def __init__(self, cuda_graph, pool=None):
                self.cuda_graph = cuda_graph
                self.pool = pool if pool is not None else ("internal", next(api.ids))

            def __enter__(self):
                api.synchronize()
                api.empty_cache()
                api.begin_allocate_to_pool(self.pool)
                self.cuda_graph.pool_id = self.pool
                api.log.append(("capture", self.cuda_graph.n, self.pool))
                if not api.survivor_left:
                    api.pools[self.pool]["live_blocks"] += 1
                    api.survivor_left = True

            def __exit__(self, *exc):
                return False

        class Stream:
            def wait_stream(self, other):
                pass

        class stream:
            def __init__(self, s):
                pass

            def __enter__(self):
                pass

            def __exit__(self, *exc):
                return False

        for name, value in {"CUDAGraph": CUDAGraph, "graph": graph, "graph_pool_handle": self.graph_pool_handle,
                            "Stream": Stream, "stream": stream, "current_stream": Stream,
                            "synchronize": self.synchronize}.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def captures(self):
        return [entry for entry in self.log if entry[0] == "capture"]


@pytest.fixture
def api(monkeypatch):
    fake = FakeCudaAPI()
    fake.install(monkeypatch)
    return fake


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def run_phases(graphs, phases, steps_per_phase):
    fns = []
    for key in range(phases):
        fn = Counter()
        fns.append(fn)
        for _ in range(steps_per_phase):
            graphs.step(key, fn)
    return fns


def test_the_stand_in_reproduces_pytorchs_failure_on_a_reused_pool(api):
    """The allocator model is faithful: one shared pool, released graph, a surviving block -> the assertion."""
    pool = torch.cuda.graph_pool_handle()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        pass
    g.reset()
    with pytest.raises(RuntimeError, match="use_count > 0"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), pool=pool):
            pass


def test_each_phase_captures_into_a_pool_no_earlier_capture_used(api):
    graphs = StageGraphs(warmup=2)
    fns = run_phases(graphs, phases=4, steps_per_phase=5)  # a later capture into a reused pool would raise
    pools = [pool for _, _, pool in api.captures()]
    assert graphs.captures == len(pools) == 4
    assert len(set(pools)) == 4
    assert all(pool[0] == "pool" for pool in pools)  # ids from graph_pool_handle, not reused ones
    # Every call is one step: 2 eager calls + the captured call (its fn runs once during capture).
    assert [fn.calls for fn in fns] == [3, 3, 3, 3]
    assert graphs.current.graph.replays == 3  # the capture's own replay and two more


def test_the_old_graph_is_synchronized_and_released_before_the_next_capture(api):
    graphs = StageGraphs(warmup=1)
    run_phases(graphs, phases=1, steps_per_phase=3)
    old_ref, old_n = weakref.ref(graphs.current.graph), graphs.current.graph.n
    api.log.clear()
    graphs.step("next phase", Counter())  # a new key: the old graph goes, the new phase warms up
    assert api.log == [("sync",), ("reset", old_n)]  # the last replay finished before the reset
    assert old_ref() is None  # dropped too: no reference to the old graph is kept
    graphs.step("next phase", Counter())  # the capture
    kinds = [entry[0] for entry in api.log]
    assert kinds.index("reset") < kinds.index("capture")
    assert len(api.pools) == 2  # the first pool lingers only for its surviving block
    assert api.pools[api.captures()[-1][2]]["use_count"] == 1


def test_release_leaves_no_graph_and_the_next_step_warms_up_again(api):
    graphs = StageGraphs(warmup=1)
    run_phases(graphs, phases=1, steps_per_phase=2)
    graph = graphs.current.graph
    graphs.release()
    assert graphs.current is None and graph.was_reset
    assert all(s["use_count"] == 0 for s in api.pools.values())
    fn = Counter()
    graphs.step(0, fn)  # the same key as before: it starts over with an eager call
    assert fn.calls == 1 and graphs.current.graph is None
    graphs.step(0, fn)
    assert graphs.captures == 2 and len({pool for _, _, pool in api.captures()}) == 2


def test_graphed_step_rejects_a_warmup_of_zero(api):
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        graphs_module.GraphedStep(Counter(), warmup=0)
