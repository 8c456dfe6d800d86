"""The ``clip-score`` protocol: 100 * max(cos(image, prompt), 0), averaged over images.

The CLIP model comes from a local folder the user passes (a transformers ``CLIPModel`` saved
with ``save_pretrained``, safetensors weights, and its processor files), e.g. a copy of
``openai/clip-vit-large-patch14``; nothing is downloaded. Which backbone was used is recorded in
the result, since CLIP scores from different backbones are not comparable (landscape.md C7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from erasekit.errors import ErasekitError
from erasekit.models.handle import to_pil


class ClipScorer:
    """CLIP image/text embeddings from a local folder; ``score(images, prompts)`` per image."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ErasekitError(f"{path} is not a CLIP folder (no config.json); pass a folder saved with CLIPModel.save_pretrained, e.g. a local openai/clip-vit-large-patch14")
        try:
            self.model = CLIPModel.from_pretrained(path, use_safetensors=True).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise ErasekitError(f"cannot load CLIP from {path} ({str(error).splitlines()[0]}); the folder needs safetensors weights and the processor/tokenizer files") from error
        self.path = path
        self.device = device
        self.backbone = self.model.config.name_or_path or str(path)

    @torch.no_grad()
    def score(self, images, prompts: list[str], batch_size: int = 32, scale: float = 100.0, clamp_negative: bool = True,
              progress: bool = False) -> list[float]:
        """``scale`` * max(cos, 0) for each (image, prompt) pair (plain cosine when not ``clamp_negative``);
        images: PIL images or (N, 3, H, W) in [0, 1]."""
        if isinstance(images, torch.Tensor):
            images = to_pil(images)
        images = list(images)
        if len(images) != len(prompts):
            raise ErasekitError(f"{len(images)} images but {len(prompts)} prompts; CLIP score needs one prompt per image")
        scores: list[float] = []
        for start in tqdm(range(0, len(images), batch_size), desc="clip score", disable=not progress, leave=False):
            inputs = self.processor(text=prompts[start : start + batch_size], images=images[start : start + batch_size],
                                    return_tensors="pt", padding=True, truncation=True)
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
            cosine = torch.nn.functional.cosine_similarity(out.image_embeds.float(), out.text_embeds.float(), dim=-1)
            scores += (scale * (cosine.clamp(min=0) if clamp_negative else cosine)).cpu().tolist()
        return scores


def clip_score(scorer: ClipScorer, images, prompts: list[str], batch_size: int = 32, scale: float = 100.0) -> float:
    """The mean CLIP score of (image, prompt) pairs."""
    return float(np.mean(scorer.score(images, prompts, batch_size=batch_size, scale=scale)))


def evaluate_clip_folder(folder: str | Path, clip: str | Path | None, device: str = "cpu", progress: bool = True, protocol=None) -> dict:
    """CLIP score of a folder written by ``erasekit generate`` (prompts from its metadata.jsonl)."""
    from erasekit.eval.generate import load_image_folder, read_metadata
    from erasekit.eval.protocols import get_protocol

    protocol = protocol or get_protocol("clip-score")
    if clip is None:
        raise ErasekitError("clip-score needs a CLIP model folder; pass --clip PATH (e.g. a local openai/clip-vit-large-patch14)")
    prompts = {entry["file"]: entry["prompt"] for entry in read_metadata(folder)}
    images = [(name, image) for name, image in load_image_folder(folder) if name in prompts]
    if not images:
        raise ErasekitError(f"no image in {folder} is listed in its metadata.jsonl; regenerate the folder with erasekit generate")
    scorer = ClipScorer(clip, device=device)
    scores = scorer.score([to_pil(image[None])[0] for _, image in images], [prompts[name] for name, _ in images],
                          batch_size=protocol.batch_size, scale=protocol.scale, clamp_negative=protocol.clamp_negative, progress=progress)
    return {"protocol": protocol.record(), "folder": str(folder), "clip": str(clip), "clip_backbone": scorer.backbone,
            "images": len(images), "clip_score": float(np.mean(scores)),
            "per_image": [{"file": name, "prompt": prompts[name], "clip_score": s} for (name, _), s in zip(images, scores)]}
