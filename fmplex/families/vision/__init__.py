"""The vision backbone family: EfficientNet-Lite0 (``fm.efficientnet``) and its task kinds.

Modules: :mod:`.weights` (the ImageNet state dict, cached as safetensors),
:mod:`.model` (the network in stages), :mod:`.preprocess` (IMAGE/PIXELS ->
the backbone's input), :mod:`.tasks`/:mod:`.fork`/:mod:`.lora` (loaded tasks),
:mod:`.executor` (one shared pass over many tasks' rows), :mod:`.family`
(everything as one object); control plane only: :mod:`.importers`, :mod:`.train`,
:mod:`.demo_data` (labelled digits and photographs from wheels).
Nothing here imports Triton.
"""
