"""CPE's residual attention gates at inference: the ResAG module, the gate, and top-1 routing on a model.

One ``"cpe"`` kv hook per cross-attention layer (:mod:`erasekit.models.attention`) serves every
applied CPE erasure: each token goes to the concept with the highest gate, and only that
concept's residual is added to the key and value. Training lives in :mod:`erasekit.methods.cpe`.
"""

from __future__ import annotations

import math

import torch

from erasekit.errors import ErasekitError
from erasekit.models.attention import HookedCrossAttnProcessor, hooked_processor, remove_hooks

HOOK_NAME = "cpe"


def kaiming_bound(dim: int, rank: int) -> float:
    """1/√(d·r): the bound of the official init, torch's kaiming-uniform (a = √5, a Linear's default) of a
    (1, d, r) tensor, whose fan_in is d·r: uniform(±√(2/(1+5))·√(3/(d·r))) = uniform(±1/√(d·r))."""
    return 1 / math.sqrt(dim * rank)


def query_init_bound(dim: int, gate_rank: int) -> float:
    """|A| bound at initialisation, 1/√(d·r_g)/d²: the official kaiming-uniform (1, d, r_g) init divided by d²
    (1.53e-8 for SD's d = 768, r_g = 16, the |w| ≤ 1.5e-8 of the released, never-trained key weights;
    research notes B1.2 and B1.7), so that Q Qᵀ ≈ 0 and S starts uniform."""
    return kaiming_bound(dim, gate_rank) / dim**2


class ResAG(torch.nn.Module):
    """One concept's residual attention gates on L projections (research notes, B1).

    ``query`` A (d, r_g), ``scaler`` s (d,) and the optional ``key`` are the gate network shared
    by all projections; ``down[ℓ]`` D_ℓ (d, r) and ``up[ℓ]`` U_ℓ (r, out_ℓ) are projection ℓ's.
    Initialised as the official code does: A (and the key) uniform(±1/√(d·r_g)/d²), s zero,
    D_ℓ uniform(±1/√(d·r)) (kaiming-uniform of a (1, d, r) tensor), U_ℓ zero.
    """

    def __init__(self, dim: int, out_dims: list[int], rank: int = 1, gate_rank: int = 16, alpha: float = 1.0,
                 key_projection: bool = False, generator: torch.Generator | None = None, device=None):
        super().__init__()

        def uniform(shape, bound):
            return (torch.rand(shape, generator=generator) * 2 - 1).mul_(bound).to(device)

        self.rank, self.alpha = rank, alpha
        self.query = torch.nn.Parameter(uniform((dim, gate_rank), query_init_bound(dim, gate_rank)))
        self.key = torch.nn.Parameter(uniform((dim, gate_rank), query_init_bound(dim, gate_rank))) if key_projection else None
        self.scaler = torch.nn.Parameter(torch.zeros(dim, device=device))
        self.down = torch.nn.Parameter(uniform((len(out_dims), dim, rank), kaiming_bound(dim, rank)))
        self.up = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(rank, out, device=device)) for out in out_dims])

    def gate(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, Ē) for text states (B, T, d): g (B, T) in (0, 1), Ē = softmax(Q Kᵀ) E (B, T, d)."""
        return gate_outputs(states, self.query, self.scaler, self.key)

    def mixed(self, states: torch.Tensor) -> torch.Tensor:
        """z = (α/r) · g · Ē (B, T, d): ResAG_ℓ(E) = z D_ℓ U_ℓ."""
        g, mixed = self.gate(states)
        return (self.alpha / self.rank) * g[..., None] * mixed

    def residual(self, states: torch.Tensor, index: int) -> torch.Tensor:
        """ResAG_ℓ(E) (B, T, out_ℓ) of projection ``index``, computed directly."""
        return self.mixed(states) @ self.down[index] @ self.up[index]

    def state(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors this concept contributes to an erasure (float32, CPU, no concept axis yet)."""
        tensors = {"gate.query": self.query, "gate.scaler": self.scaler, "alpha": torch.tensor(float(self.alpha))}
        if self.key is not None:
            tensors["gate.key"] = self.key
        for index, name in enumerate(names):
            tensors[f"{name}.down"] = self.down[index]
            tensors[f"{name}.up"] = self.up[index]
        return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


def gate_outputs(states: torch.Tensor, query: torch.Tensor, scaler: torch.Tensor, key: torch.Tensor | None = None):
    """The gate for text states (B, T, d) and one concept (query (d, r_g)) or several (query (C, d, r_g)).

    Returns g (…, B, T) and Ē (…, B, T, d), with a leading concept axis when ``query`` has one.
    """
    stacked = query.ndim == 3
    q = torch.einsum("btd,cdr->cbtr", states, query) if stacked else states @ query
    k = q if key is None else (torch.einsum("btd,cdr->cbtr", states, key) if stacked else states @ key)
    attention = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    mixed = attention @ states  # (…, B, T, T) @ (B, T, d)
    g = torch.sigmoid((mixed * (scaler[:, None, None, :] if stacked else scaler)).sum(-1))
    return g, mixed


def _check_shapes(tensors: dict[str, torch.Tensor]) -> None:
    """One line when a CPE erasure's tensors do not fit together: C concepts, query/key (C, d, r_g), scaler (C, d),
    alpha (C,), and per projection down (C, d, r) and up (C, r, out)."""
    def damaged(what: str) -> ErasekitError:
        return ErasekitError(f"this CPE erasure's tensors do not fit together ({what}); the file is damaged, make the erasure again")

    query, scaler, alpha = tensors.get("gate.query"), tensors.get("gate.scaler"), tensors.get("alpha")
    if query is None or scaler is None or alpha is None or query.ndim != 3:
        raise damaged("gate.query (C, d, r_g), gate.scaler and alpha are needed")
    concepts, dim, _ = query.shape
    if tuple(scaler.shape) != (concepts, dim) or tuple(alpha.shape) != (concepts,):
        raise damaged(f"scaler {list(scaler.shape)} and alpha {list(alpha.shape)} for query {list(query.shape)}")
    if "gate.key" in tensors and tensors["gate.key"].shape != query.shape:
        raise damaged(f"gate.key {list(tensors['gate.key'].shape)} for query {list(query.shape)}")
    downs = [k[: -len(".down")] for k in tensors if k.endswith(".down")]
    if not downs:
        raise damaged("no projection has gates")
    for name in downs:
        down, up = tensors[f"{name}.down"], tensors.get(f"{name}.up")
        if (up is None or down.ndim != 3 or up.ndim != 3 or down.shape[:2] != (concepts, dim)
                or up.shape[:2] != (concepts, down.shape[2])):
            raise damaged(f"{name}: down {list(down.shape)}, up {None if up is None else list(up.shape)}")


class _Attached:
    """One applied CPE erasure's tensors, on the model's device in float32, ready for routing."""

    def __init__(self, erasure, scale: float, device):
        self.erasure, self.scale = erasure, scale
        self.to(device)

    def to(self, device) -> None:
        """(Re)load the tensors onto ``device`` (the model may have moved since the erasure was applied)."""
        tensors = {k: v.to(device, torch.float32) for k, v in self.erasure.modules.items()}
        _check_shapes(tensors)
        self.device = torch.device(device)
        self.query, self.scaler, self.key = tensors["gate.query"], tensors["gate.scaler"], tensors.get("gate.key")
        rank = next(v for k, v in tensors.items() if k.endswith(".down")).shape[-1]
        self.coefficient = tensors["alpha"] / rank * self.scale  # (C,)
        names = [k[: -len(".down")] for k in tensors if k.endswith(".down")]
        self.pairs = {name: (tensors[f"{name}.down"], tensors[f"{name}.up"]) for name in names}

    def residual(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """Σ_c z_c D_c U_c (B, T, out) for projection ``name``; z (C, B, T, d) is zero where c is not routed."""
        down, up = self.pairs[name]
        return torch.einsum("cbtr,cro->bto", torch.einsum("cbtd,cdr->cbtr", z, down), up)


class _Router:
    """Every CPE erasure applied to one model; routes each token to the concept with the top gate."""

    def __init__(self):
        self.entries: list[_Attached] = []
        self._cache = None  # (text states, their key, routed z per entry)

    def clear_cache(self) -> None:
        self._cache = None

    @staticmethod
    def _key(states: torch.Tensor):
        try:
            version = states._version
        except RuntimeError:  # inference tensors have no version counter: do not cache
            return None
        return (states.data_ptr(), tuple(states.shape), states.stride(), states.dtype, states.device, version,
                torch.is_grad_enabled())

    def routed(self, states: torch.Tensor) -> list[torch.Tensor]:
        """Per entry z (C, B, T, d) = (α/r)·scale·g·Ē on the tokens its concepts win, zero elsewhere."""
        key = self._key(states)
        if key is not None and self._cache is not None and self._cache[1] == key:
            return self._cache[2]
        text = states.float()
        for entry in self.entries:
            if entry.device != text.device:
                entry.to(text.device)
        gates, mixes = zip(*(gate_outputs(text, e.query, e.scaler, e.key) for e in self.entries))
        all_gates = torch.cat(gates)  # (C_total, B, T)
        winner = torch.nn.functional.one_hot(all_gates.argmax(0), all_gates.shape[0]).permute(2, 0, 1).to(text.dtype)
        routed, start = [], 0
        for entry, g, mixed in zip(self.entries, gates, mixes):
            count = g.shape[0]
            weight = winner[start : start + count] * g * entry.coefficient[:, None, None]
            routed.append(weight[..., None] * mixed)
            start += count
        self._cache = None if key is None else (states, key, routed)
        return routed


class _LayerHook:
    """The kv hook of one cross-attention layer: key/value plus the routed residuals."""

    def __init__(self, router: _Router, path: str):
        self.router, self.key_name, self.value_name = router, f"{path}.to_k", f"{path}.to_v"

    def __call__(self, attn, text_states, key, value):
        for entry, z in zip(self.router.entries, self.router.routed(text_states)):
            key = key + entry.residual(self.key_name, z).to(key.dtype)
            value = value + entry.residual(self.value_name, z).to(value.dtype)
        return key, value


def _router(layers: dict[str, torch.nn.Module]) -> _Router | None:
    for attn in layers.values():
        processor = attn.processor
        if isinstance(processor, HookedCrossAttnProcessor) and HOOK_NAME in processor.kv_hooks:
            return processor.kv_hooks[HOOK_NAME].router
    return None


class CPEModules:
    """Attaches and detaches CPE erasures (``Erasure.apply`` / ``remove`` call these)."""

    @staticmethod
    def attach(model, erasure, scale: float = 1.0) -> None:
        layers = model.cross_attention_layers()
        entry = _Attached(erasure, scale, model.device)
        for path, attn in layers.items():
            for which, linear in (("to_k", attn.to_k), ("to_v", attn.to_v)):
                pair = entry.pairs.get(f"{path}.{which}")
                if pair is None or pair[0].shape[1] != linear.in_features or pair[1].shape[2] != linear.out_features:
                    raise ErasekitError(
                        f"this CPE erasure has no gate fitting {path}.{which}; it was made for another architecture")
        if len(entry.pairs) != 2 * len(layers):
            raise ErasekitError(
                "this CPE erasure has gates for layers the model does not have; it was made for another architecture")
        router = _router(layers)
        if router is None:
            router = _Router()
            for path, attn in layers.items():
                hooked_processor(attn).kv_hooks[HOOK_NAME] = _LayerHook(router, path)
        router.entries.append(entry)
        router.clear_cache()

    @staticmethod
    def detach(model, erasure) -> None:
        layers = model.cross_attention_layers()
        router = _router(layers)
        if router is None:
            return
        router.entries = [e for e in router.entries if e.erasure is not erasure]
        router.clear_cache()
        if not router.entries:
            remove_hooks(layers, HOOK_NAME)
