"""Hardware probing (cores, SMT siblings, NUMA, affinity) in one place."""
