"""The learning code (torch): what the drivers run when the core asks for a number or a model.

- ``tasks``       built-in and plug-in tasks (model, data shards, loss, evaluation)
- ``taskcommon``  shards, seeded generators and the task's metric (what targets follow)
- ``lm``          the ``lm`` task: a byte-level GPT (``gpt``) on text that ships with Python (``lmdata``)
- ``hf``          the ``hf`` task: a local Hugging Face causal LM on a local text file (``hfdata``)
- ``trainable``   every task's ``trainable=`` / ``lora=`` options: what is trained, the rest frozen
- ``estimators``  zeroth-order SPSA (MeZO) and first-order projection (Ferret) on shared directions
- ``replay``      the model as a pure function of the chain (``ModelStates``), model digests
- ``checkpoint``  parameter blobs and their content-addressed chunk manifests
- ``initial``     the one genesis builder (settings plus the initial model's digest)
"""
