"""What the scripts of ``benchmarks/`` share: ``harness`` (archives to compare, one served row:
TorchServe start, JVM warm-up, rate sweep, stop; in-process ceilings) and ``timeline_report``
(a recorded timeline's overlap and per-phase breakdown). The ``hetserve`` CLI never imports this
package (``tests/test_layering.py`` checks it); ``hetserve bench`` is ``hetserve/bench.py``."""
