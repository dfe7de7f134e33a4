"""The time-series backbone family: Fracast-0 (``fm.fracast``) and its task kinds.

Modules: :mod:`.model` (the packaged weights, the input normalisation and the
split of the network into a shared trunk and per-task heads), :mod:`.inputs`
(SERIES/LENGTHS/HORIZON -> checked rows), :mod:`.tasks` (loaded tasks),
:mod:`.executor` (one trunk pass over many tasks' rows), :mod:`.family`
(everything as one object); control plane only: :mod:`.importers`,
:mod:`.train`, :mod:`.finetune` (a fork's source: the head tuned on one's
series), :mod:`.demo_data` (series bundled with statsmodels).
Nothing here imports Triton.
"""
