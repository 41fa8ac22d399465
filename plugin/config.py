"""What to adapt and how: one JSON-serialisable config per named adapter.

A method is only a preset of (composition, backend); everything a file needs to be rebuilt is
in its tensors (see FORMAT.md), so this config is informational once an adapter exists.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

COMPOSITIONS = ("additive", "lie", "dora")
LIE_MAPS = ("exp", "linear")
BACKENDS = ("lowrank", "tucker", "cp", "hadamard", "blockdiag", "blocklowrank", "rowcol")


@dataclass(frozen=True)
class Preset:
    """A method from the literature: a composition, a backend (for Linear layers and for convs) and
    the paper's own initialisation and scale. Any field can be overridden in `AdapterConfig`."""

    composition: str
    backend: str
    conv_backend: str | None = None  # None: the same as `backend`
    lie_map: str = "exp"
    init: str | None = None  # the backend's initialisation, where it has a choice
    blocks: int | None = None  # channel blocks of blockdiag/blocklowrank
    vectors: str | None = None  # which rowcol vectors exist
    scale: float = 1.0
    paper: str = ""


METHODS: dict[str, Preset] = {
    "lora": Preset("additive", "lowrank", paper="LoRA (Hu et al. 2021)"),
    "flora": Preset("additive", "tucker", paper="FLoRA (Si et al. 2024): Tucker update of N-d kernels"),
    "liera": Preset("lie", "lowrank", "tucker", paper="LieRA: W ⊙ exp(s·D), Tucker on convs"),
    "hira": Preset("lie", "lowrank", lie_map="linear", paper="HiRA (Huang et al. 2025): W + W ⊙ (B A)"),
    "abba": Preset(
        "additive", "hadamard", init="abba", paper="ABBA (Singhal et al. 2025): s (B1 A1) ⊙ (B2 A2)"
    ),
    "loha": Preset("additive", "hadamard", init="loha", paper="LoHa (LyCORIS): ABBA's update, LoHa's init"),
    "bhra": Preset("lie", "blocklowrank", lie_map="linear", blocks=2, paper="BHRA: W + W ⊙ block-LoRA"),
    "gralora": Preset("additive", "blocklowrank", blocks=2, paper="GraLoRA (Jung et al. 2025): k x k LoRAs"),
    "diablo": Preset("additive", "blockdiag", blocks=64, paper="DiaBlo (2025): diagonal blocks only"),
    "ssb": Preset("lie", "rowcol", vectors="both", paper="SSB / HyperAdapt: diag(a) W diag(b)"),
    "ssl": Preset("lie", "rowcol", lie_map="linear", vectors="col", paper="SSL: W diag(b)"),
    "ia3": Preset(
        "lie", "rowcol", lie_map="linear", vectors="row", paper="(IA)³ (Liu et al. 2022): diag(l) W"
    ),
    "dora": Preset("dora", "lowrank", paper="DoRA (Liu et al. 2024)"),
    "dora-flora": Preset("dora", "tucker", paper="DoRA's magnitude on a FLoRA (Tucker) update"),
}

# Module-name patterns (regexes matched against the end of a dotted module path).
ATTENTION_PROJECTIONS = (
    r"to_q",
    r"to_k",
    r"to_v",
    r"to_out\.0",
    r"add_q_proj",
    r"add_k_proj",
    r"add_v_proj",
    r"to_add_out",
    r"q_proj",
    r"k_proj",
    r"v_proj",
    r"out_proj",
    # Flux's single blocks: attention and MLP share one input and one output projection.
    r"single_transformer_blocks\.\d+\.proj_mlp",
    r"single_transformer_blocks\.\d+\.proj_out",
)
RESNET_AND_SAMPLER_CONVS = (
    r"resnets\.\d+\.conv1",
    r"resnets\.\d+\.conv2",
    r"resnets\.\d+\.conv_shortcut",
    r"downsamplers\.\d+\.conv",
    r"upsamplers\.\d+\.conv",
)
# A UNet's cross-attention keys and values: the only attention weights applied to the prompt's tokens
# (the others act on every image, whatever it asks for), where an identifier is bound to its subject.
CROSS_ATTENTION_KEYS_VALUES = (r"attn2\.to_k", r"attn2\.to_v")
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ATTENTION_PROJECTIONS,
    "conv": RESNET_AND_SAMPLER_CONVS,
    "attn+conv": ATTENTION_PROJECTIONS + RESNET_AND_SAMPLER_CONVS,
    "cross-kv+conv": CROSS_ATTENTION_KEYS_VALUES + RESNET_AND_SAMPLER_CONVS,
    "all": (r".*",),
}

Rank = int | list[int]


@dataclass
class AdapterConfig:
    """How to build one named adapter: a preset (`method`, see `METHODS`) and any overrides.

    `backend` replaces the preset's backend on every layer, `conv_backend` on convolutions only.
    `rank` is the rank of Linear layers (and of convs when `conv_rank` is unset); `conv_rank` may be a
    list of per-mode Tucker ranks `[out, in, k_0, k_1, ...]` (a shorter list repeats its last entry
    over the remaining kernel modes). Ranks are clipped to each mode's size. `rank_pattern`
    overrides the rank of modules whose name matches a pattern, like PEFT's. With `alpha` set the
    scale is `alpha / rank` (rank's first entry), LoRA-style; otherwise it is `scale`. `init`,
    `blocks` and `vectors` go to the backends that have them (`blocks` is clipped per layer to a
    divisor of both channel counts); `init="pissa"` starts lowrank and tucker updates at `W`'s
    principal part (PiSSA, HOSVD), hadamard ones at ABBA's; `init="zero-out"` starts tucker updates
    from a zero output factor instead of FLoRA's zero core. Unset fields take the preset's values.
    """

    method: str = "liera"
    composition: str | None = None
    backend: str | None = None
    conv_backend: str | None = None
    lie_map: str | None = None
    rank: Rank = 8
    conv_rank: Rank | None = None
    rank_pattern: dict[str, Rank] = field(default_factory=dict)
    alpha: float | None = None
    scale: float | None = None
    init: str | None = None
    blocks: int | None = None
    vectors: str | None = None
    targets: str | list[str] = "attn+conv"
    base_model: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown adapter method {self.method!r}; choose one of {sorted(METHODS)}")
        preset = METHODS[self.method]
        explicit = {name for name, value in self.backend_options().items() if value is not None}
        for name in ("composition", "lie_map", "init", "blocks", "vectors", "scale"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(preset, name))
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"unknown composition {self.composition!r}; choose one of {COMPOSITIONS}")
        for name in ("backend", "conv_backend"):
            value = getattr(self, name)
            if value is not None and value not in BACKENDS:
                raise ValueError(f"unknown {name} {value!r}; choose one of {BACKENDS}")
        if self.lie_map not in LIE_MAPS:
            raise ValueError(f"unknown lie_map {self.lie_map!r}; choose one of {LIE_MAPS}")
        for where, rank in [("rank", self.rank), ("conv_rank", self.conv_rank), *self.rank_pattern.items()]:
            if rank is None:
                continue
            ranks = rank if isinstance(rank, list) else [rank]
            if not ranks or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in ranks):
                raise ValueError(f"{where}: ranks must be positive integers, got {rank!r}")
        if isinstance(self.targets, str) and self.targets not in TARGET_PRESETS:
            raise ValueError(
                f"unknown targets preset {self.targets!r}; choose one of {sorted(TARGET_PRESETS)} "
                "or pass a list of module-name patterns"
            )
        from .backends import BACKEND_CLASSES, accepted_options  # backends import this module

        chosen = {self.backend_for(2), self.backend_for(4)}
        if self.init == "pissa":
            self._check_principal_start({b: BACKEND_CLASSES[b] for b in chosen})
            explicit.discard("init")
        for name in explicit:
            if not any(name in accepted_options(BACKEND_CLASSES[b], {name: 0}) for b in chosen):
                raise ValueError(f"{name} does not apply to the {' and '.join(sorted(chosen))} backend")

    def _check_principal_start(self, backends: dict) -> None:
        """`init="pissa"` (PiSSA) needs an update that adds to `W` and a backend with a principal start."""
        if self.composition not in ("additive", "dora"):
            raise ValueError(
                f"init 'pissa' starts an update that adds to W at W's principal part; the {self.composition} "
                "composition multiplies W instead (use an additive or dora preset: lora, flora, abba, dora)"
            )
        from .backends import Backend

        lacking = sorted(
            name for name, cls in backends.items() if cls.init_principal is Backend.init_principal
        )
        if lacking:
            raise ValueError(f"init 'pissa': the {' and '.join(lacking)} backend has no principal start")

    def target_patterns(self) -> tuple[str, ...]:
        return TARGET_PRESETS[self.targets] if isinstance(self.targets, str) else tuple(self.targets)

    def backend_for(self, weight_ndim: int) -> str:
        """A Linear layer's backend (`weight_ndim` 2) or a conv's: `conv_backend`, then `backend`, then
        the preset's, the first that is set."""
        preset = METHODS[self.method]
        if weight_ndim == 2:
            return self.backend or preset.backend
        return self.conv_backend or self.backend or preset.conv_backend or preset.backend

    def backend_options(self) -> dict[str, object]:
        """The backend options this config sets (`init`, `blocks`, `vectors`)."""
        options = {"init": self.init, "blocks": self.blocks, "vectors": self.vectors}
        return {name: value for name, value in options.items() if value is not None}

    def composition_fields(self) -> dict[str, str]:
        """The composition in a file header's fields (`composition`, and `lie_map` for lie)."""
        fields = {"composition": self.composition}
        if self.composition == "lie":
            fields["lie_map"] = self.lie_map
        return fields

    def rank_for(self, module_name: str, weight_ndim: int) -> Rank:
        for pattern, rank in self.rank_pattern.items():
            if name_matches(module_name, pattern):
                return rank
        if weight_ndim > 2 and self.conv_rank is not None:
            return self.conv_rank
        return self.rank

    def scale_for(self, rank: Rank) -> float:
        if self.alpha is None:
            return self.scale
        return self.alpha / (rank[0] if isinstance(rank, list) else rank)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def name_matches(module_name: str, pattern: str) -> bool:
    """PEFT's rule: a pattern matches a whole dotted path or any dotted suffix of it."""
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module_name) is not None


def mode_ranks(rank: Rank, shape: tuple[int, ...]) -> list[int]:
    """Per-mode Tucker ranks for a weight of `shape`, clipped to each mode's size."""
    ranks = rank if isinstance(rank, list) else [rank]
    return [min(ranks[min(i, len(ranks) - 1)], size) for i, size in enumerate(shape)]


def matrix_rank(rank: Rank, shape: tuple[int, ...], backend: str, clip: bool = True) -> int:
    """One rank, clipped (unless `clip=False`, CP's sums of outer products) so that a low-rank
    product is never wider than the `out x fan_in` matrix it builds."""
    if isinstance(rank, list):
        raise ValueError(f"per-mode ranks {rank} only apply to the tucker backend, not {backend}")
    if not clip:
        return rank
    rows, cols = shape[0], 1
    for size in shape[1:]:
        cols *= size
    return min(rank, rows, cols)
