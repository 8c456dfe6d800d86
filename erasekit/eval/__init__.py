"""Evaluation: generation over prompt sets and named, versioned protocols.

- ``erasekit.eval.generate``: batched, seeded, resumable, shardable generation into a folder
  (with ``metadata.jsonl``), prompt files (I2P-style CSV, text, ``toy:SET``).
- ``erasekit.eval.protocols``: the registry (``toy``, ``nudenet``, ``nudenet-0.45``, ``clip-score``, ``fid``,
  ``imagenette-top1``, ``classifier-top1``, ``clip-zero-shot``).
- ``erasekit.eval.judges``: does an image show the concept? ``make_judge("classifier:PATH" | "clip:PATH" | "nudenet" | "toy")``.
- ``erasekit.eval.stats``: rates with their image counts and 95% Wilson intervals.
- ``erasekit.eval.toy``: ``evaluate_toy_protocol(model, concepts)``, the toy protocol in one call.
- ``erasekit.eval.nudenet``, ``erasekit.eval.clip_score``, ``erasekit.eval.fid``: the detectors and metrics.

Submodules are imported on use, so ``import erasekit`` stays light.
"""
