"""The toy world's judge: a small CNN with one head per attribute (shape, color, style).

Its pooled 128-d features are also the feature space of the toy FID. The trained
weights ship with the package (``erasekit/toy/classifier.safetensors``), and
``erasekit toy train-classifier`` reproduces them from a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from erasekit.errors import ErasekitError
from erasekit.toy import world
from erasekit.utils import save_safetensors

BUNDLED_CLASSIFIER = Path(__file__).resolve().parent / "classifier.safetensors"


class ToyClassifier(nn.Module):
    """Images in [0, 1], (batch, 3, 24, 24) -> logits per attribute."""

    feature_dim = 128

    def __init__(self):
        super().__init__()

        def block(c_in, c_out, stride):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())

        self.body = nn.Sequential(
            block(3, 32, 1), block(32, 32, 1), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2), block(128, 128, 1)
        )
        self.heads = nn.ModuleDict({name: nn.Linear(self.feature_dim, len(classes)) for name, classes in world.ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2 - 1).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """Class names per attribute for images in [0, 1]."""
        out: dict[str, list[str]] = {name: [] for name in world.ATTRIBUTES}
        for i in range(0, len(images), batch_size):
            logits = self(images[i : i + batch_size].float())
            for name, classes in world.ATTRIBUTES.items():
                out[name] += [classes[j] for j in logits[name].argmax(1).tolist()]
        return out


def load_classifier(path: str | Path | None = None) -> ToyClassifier:
    path = Path(path) if path else BUNDLED_CLASSIFIER
    if not path.is_file():
        raise ErasekitError(f"no toy classifier at {path}; train one with: erasekit toy train-classifier")
    model = ToyClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


def _augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Generated images are noisier and blurrier than drawn ones: train on noise and slight blur too."""
    sigma = rng.uniform(0, 0.08, size=(len(images), 1, 1, 1))
    out = images + rng.normal(size=images.shape) * sigma
    return np.clip(out, 0, 1).astype(np.float32)


def train_classifier(out: str | Path = BUNDLED_CLASSIFIER, steps: int = 1500, batch_size: int = 128, seed: int = 0, progress: bool = True) -> ToyClassifier:
    """Train on fresh procedural images each step; saves safetensors atomically to ``out``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ToyClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    bar = tqdm(range(steps), desc="toy classifier", disable=not progress)
    for _ in bar:
        images, scenes, _ = world.sample_batch(batch_size, rng)
        x = torch.from_numpy(_augment((images + 1) / 2, rng))
        targets = world.labels(scenes)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], torch.from_numpy(targets[k])) for k in world.ATTRIBUTES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    save_safetensors(out, {k: v.contiguous() for k, v in model.state_dict().items()})
    return model


def accuracy_on_fresh_images(model: ToyClassifier, n: int = 1000, seed: int = 12345) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    images, scenes, _ = world.sample_batch(n, rng)
    predicted = model.predict(torch.from_numpy((images + 1) / 2))
    truth = {"shape": [s.shape for s in scenes], "color": [s.color for s in scenes], "style": [s.style for s in scenes]}
    return {k: float(np.mean([p == t for p, t in zip(predicted[k], truth[k])])) for k in world.ATTRIBUTES}
