"""plerec: multi-task ranking models for recommender systems (PLE, CGC, MMoE and baselines)."""

import os

# Set before torch is imported: libgomp, torch's OpenMP runtime, reads it once, when it is loaded. A thread
# that waits for the others at the end of a parallel region spins for GOMP_SPINCOUNT rounds before it
# sleeps; libgomp's 300,000 take a core that another process (or plerec's own slower thread) needs, and
# sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a quiet machine about 25 %. 1,000 rounds measured as
# fast as either where each is at its best (README "On a busy machine"). A setting of the user's is kept.
if not any(name in os.environ for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
    os.environ["GOMP_SPINCOUNT"] = "1000"

__version__ = "0.1.0"
