"""Evaluation: generation over prompt sets and named, versioned protocols.

- ``erasekit.eval.generate``: batched, seeded, resumable, shardable generation into a folder
  (with ``metadata.jsonl``), prompt files (I2P-style CSV, text, ``toy:SET``).
- ``erasekit.eval.protocols``: the registry (``toy``, ``nudenet``, ``nudenet-0.45``, ``clip-score``, ``fid``).
- ``erasekit.eval.toy``: ``evaluate_toy_protocol(model, concepts)``, the toy protocol in one call.
- ``erasekit.eval.nudenet``, ``erasekit.eval.clip_score``, ``erasekit.eval.fid``: the detectors and metrics.

Submodules are imported on use, so ``import erasekit`` stays light.
"""
