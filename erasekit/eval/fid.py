"""Frechet distance, feature statistics and the FID Inception-v3 network, in plain torch.

FID (Heusel et al., 2017) between two sets of features with means mu1, mu2 and covariances
S1, S2 is

    ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

The network is the "FID Inception" that pytorch-fid and clean-fid use: torchvision's
Inception-v3 layout with the TensorFlow graph's quirks (average pools that do not count the
padding, and a max pool in the last block's pool branch), 2048-d pool3 features. Images in
[0, 1] are resized to 299x299 bilinearly (align_corners=False) and scaled to [-1, 1], as
pytorch-fid does. (clean-fid resizes with PIL bicubic on the uint8 images instead, which moves
FID slightly; compare numbers only under one protocol.)

Weights. Nothing is downloaded and nothing is unpickled here: pass a safetensors file. Make it
once, on a machine that has the pytorch-fid weights ``pt_inception-2015-12-05-6726825d.pth``::

    import torch
    from safetensors.torch import save_file
    state = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, "fid_inception.safetensors")

The key names are torchvision's: ``Conv2d_1a_3x3.conv.weight``, ``Conv2d_1a_3x3.bn.{weight,bias,
running_mean,running_var}``, then ``Conv2d_2a_3x3``, ``Conv2d_2b_3x3``, ``Conv2d_3b_1x1``,
``Conv2d_4a_3x3``, ``Mixed_5b`` ... ``Mixed_7c`` with their branches (e.g.
``Mixed_5b.branch5x5_1.conv.weight``, ``Mixed_7c.branch3x3dbl_3b.bn.running_var``). The
classifier (``fc.*``), ``AuxLogits.*`` and ``*.num_batches_tracked`` are accepted and ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from erasekit.errors import ErasekitError


# ----------------------------------------------------------------- the formula
def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, ``numpy.cov`` with N - 1) of features (N, D)."""
    features = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ErasekitError(f"need at least 2 feature vectors (N, D) for statistics, got shape {features.shape}; evaluate more images")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).

    ``method="sqrtm"`` (the default, what pytorch-fid and clean-fid compute): ``scipy.linalg.sqrtm``
    of the product. When its square root is not finite (singular covariances, e.g. fewer samples
    than dimensions), ``eps`` is added to both diagonals and it is taken again; a square root with
    a non-negligible imaginary part (> 1e-3 on the diagonal) is an error, a tiny one is dropped.

    ``method="eigh"``: the same trace as Tr((sqrt(sigma1) sigma2 sqrt(sigma1))^(1/2)) from two
    symmetric eigendecompositions; equal up to rounding and about 10x faster for 2048-d features
    (sqrtm of a 2048x2048 matrix takes a minute on one CPU core).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ErasekitError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}; "
                            "compute both sets with the same feature extractor")
    diff = mu1 - mu2
    if method == "sqrtm":
        trace_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        trace_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ErasekitError(f"unknown Frechet distance method {method!r}; choose sqrtm or eigh")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():  # a singular product is expected with few images; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ErasekitError(f"the covariance product has a square root with imaginary part {np.abs(covmean.imag).max():.3g}; "
                                "use more images than feature dimensions")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())


# ------------------------------------------------------------- the network
class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _average_pool(x):
    """3x3 average pool, stride 1, padding 1, padding not counted (the TF graph's pool)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_average_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_average_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool_branch``: the last block (Mixed_7c) pools with a 3x3 max pool, as the TF graph does."""

    def __init__(self, in_channels: int, max_pool_branch: bool = False):
        super().__init__()
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool_branch else _average_pool(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Images (N, 3, H, W) in [0, 1] -> pool3 features (N, 2048)."""

    feature_dim = 2048
    input_size = 299

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


IGNORED_KEY_PREFIXES = ("fc.", "AuxLogits.")


def load_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception with weights from a safetensors file (key names in the module docstring)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ErasekitError(f"no Inception weights at {path}; convert pt_inception-2015-12-05 to safetensors as erasekit.eval.fid's docstring shows and pass its path")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ErasekitError(f"{path} is not a readable safetensors file ({error}); pass the converted FID Inception weights") from error
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_KEY_PREFIXES) and not k.endswith("num_batches_tracked")}
    model = FIDInceptionV3()
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        problem = f"missing {len(missing)} keys (e.g. {missing[:3]})" if missing else f"unknown keys (e.g. {unexpected[:3]})"
        raise ErasekitError(f"{path} is not FID Inception-v3 weights: {problem}; convert pt_inception-2015-12-05 with torchvision key names")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ErasekitError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}; these are not the FID Inception weights")
    model.load_state_dict(state, strict=False)
    return model.eval().to(device)


@torch.no_grad()
def inception_features(model: FIDInceptionV3, images, batch_size: int = 16, progress: bool = True) -> np.ndarray:
    """Pool3 features (N, 2048) float64 of images: a tensor (N, 3, H, W) or a list of (3, H, W), in [0, 1].

    Images of different sizes are each resized to 299 first; a list is never stacked at its own size.
    """
    device = next(model.parameters()).device
    features = []
    for start in tqdm(range(0, len(images), batch_size), desc="inception", disable=not progress, leave=False):
        chunk = images[start : start + batch_size]
        if isinstance(chunk, list):
            chunk = torch.cat([F.interpolate(image[None].float(), size=(299, 299), mode="bilinear", align_corners=False) for image in chunk])
        features.append(model(chunk.float().to(device)).double().cpu())
    return torch.cat(features).numpy()


def reference_statistics(path: str | Path, model: FIDInceptionV3 | None = None, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of a reference: an ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid's format), or an image folder."""
    from erasekit.eval.generate import load_image_folder

    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise ErasekitError(f"reference statistics {path} do not exist; pass an .npz with mu and sigma or an image folder")
        with np.load(path, allow_pickle=False) as stats:
            if "mu" not in stats or "sigma" not in stats:
                raise ErasekitError(f"{path} has no 'mu' and 'sigma' arrays; write it with numpy.savez(path, mu=..., sigma=...)")
            return stats["mu"], stats["sigma"]
    if model is None:
        raise ErasekitError("an image-folder reference needs the Inception network; pass --inception")
    images = [image for _, image in load_image_folder(path)]
    return feature_statistics(inception_features(model, images, batch_size))


def evaluate_fid_folder(folder: str | Path, reference: str | Path | None, inception: str | Path | None,
                        device: str = "cpu", progress: bool = True, protocol=None) -> dict:
    """FID between a folder of images and a reference (an image folder or an .npz with mu, sigma)."""
    from erasekit.eval.generate import load_image_folder
    from erasekit.eval.protocols import get_protocol

    protocol = protocol or get_protocol("fid")
    if reference is None:
        raise ErasekitError("fid needs a reference; pass --reference DIR (real images) or --reference stats.npz (mu, sigma)")
    if inception is None:
        raise ErasekitError("fid needs the FID Inception weights; pass --inception fid_inception.safetensors (see erasekit.eval.fid for the conversion)")
    model = load_fid_inception(inception, device=device)
    images = [image for _, image in load_image_folder(folder)]
    mu, sigma = feature_statistics(inception_features(model, images, protocol.batch_size, progress=progress))
    mu_ref, sigma_ref = reference_statistics(reference, model, protocol.batch_size)
    return {"protocol": protocol.record(), "folder": str(folder), "reference": str(reference), "inception": str(inception),
            "images": len(images), "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref, eps=protocol.eps, method=protocol.sqrt_method)}
