"""plerec: multi-task ranking models for recommender systems (PLE, CGC, MMoE and baselines)."""

import os

# Set before torch is imported: libgomp, torch's OpenMP runtime, reads it once, when it is loaded. PASSIVE:
# a thread that waits for the others at the end of a parallel region sleeps instead of spinning on a core
# that another process (or plerec's own slower thread) needs. See benchmarks/contention.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
