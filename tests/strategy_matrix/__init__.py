"""The strategy matrix: every algorithm module under every training strategy, on the tiny models.

``cells`` says what runs (algorithms, strategy columns, declared-unsupported combinations), ``runner`` is the
script one column runs in (all its algorithms in ONE process, or one launched pair of ranks), ``probes`` holds
the callbacks and checks that run inside it, and ``driver`` starts columns, survives broken or hanging cells
and collects the per-cell JSON records that ``tests/test_strategy_matrix.py`` compares.
"""
