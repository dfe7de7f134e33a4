"""Scale-out on Ray Serve: replicas of tritonserver per backbone, vFMs placed where their backbone lives.

Only :mod:`fmplex.cluster.placement` is importable without the ``cluster`` extra (it is pure).
"""
