"""Environment variables Lightning's and DeepSpeed's launchers export for a rank.

A test that starts its own multi-process run removes them from the child's environment, so the child is not
mistaken for an already-launched rank (the autouse fixture in ``conftest.py`` restores them after each test).
"""

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
