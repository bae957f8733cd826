"""Backbone factory, token forward, projection head and the CrIBo network.

The backbone is a timm ``VisionTransformer`` built to match the authors' ViT (DINO's ``vision_transformer.py``:
qkv bias, LayerNorm eps 1e-6, exact-erf GELU, learned position embedding for the 224 px grid plus a [CLS]
entry, final norm). Its tokens come from :func:`backbone_tokens`, our own forward through timm's submodules,
which resamples the position embedding exactly as the authors do at any other input size. Reading and writing
weights (ours, the authors', DINO's, safetensors exports) is :mod:`cribo.hub`.

Axis letters: B batch, H/W image height/width (pixels), h/w patch grid (``N = h*w`` patches), G native
position grid side, D embedding dim, R rows (any number of feature vectors), C global head output dim,
Cc object head output dim.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

# Short names of the authors' ViTs (authors' vision_transformer.py: vit_tiny / vit_small / vit_base) and the
# timm model each maps to at patch size 16; other patch sizes use timm's name when it exists, else kwargs.
SHORT_ARCHS: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}
# Embedding width of each short arch, used to infer the arch of a bare state dict (all three are 12 deep).
EMBED_DIM_TO_ARCH: dict[int, str] = {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}
DEFAULT_PATCH_SIZE = 16  # authors' --patch_size default
# Authors'/DINO's interpolate_pos_encoding adds 0.1 to the target grid "to avoid floating point error in the
# interpolation"; the resulting scale factor (not the output size) sets the bicubic sampling positions.
POS_EMBED_GRID_OFFSET = 0.1
HEAD_INIT_STD = 0.02  # DINOHead._init_weights: trunc_normal_(std=.02), zero bias


# ----------------------------------------------------------------------------------------------------------------
# Backbone


def resolve_arch(arch: str, patch_size: int = DEFAULT_PATCH_SIZE) -> tuple[str, dict[str, Any]]:
    """Map an arch name to a timm model name plus the extra kwargs it needs.

    Args:
        arch: ``vit_tiny`` / ``vit_small`` / ``vit_base`` or any timm model name (passed through).
        patch_size: patch side in pixels, used for the short names.

    Returns:
        ``(timm_name, kwargs)``; kwargs holds ``patch_size`` when timm has no model of that name and patch size.
    """
    if patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}")
    if arch in SHORT_ARCHS:
        registered = f"{arch}_patch{patch_size}_224"
        if timm.is_model(registered):
            return registered, {}
        return SHORT_ARCHS[arch], {"patch_size": patch_size}
    if timm.is_model(arch):
        return arch, {}
    raise ValueError(f"arch {arch!r} is unknown: use one of {sorted(SHORT_ARCHS)} or a timm ViT model name")


def skip_dropped_samples(x: Tensor, branch: Callable[[Tensor], Tensor], drop: nn.Module) -> Tensor:
    """``x + drop(branch(x))`` (a residual branch under timm's ``DropPath``) without computing the branch for the
    samples that stochastic depth drops.

    The samples' keep-scales are drawn exactly as ``timm.layers.drop_path`` draws them (one ``bernoulli_`` on a
    ``(B, 1, ..., 1)`` tensor of ``x``'s dtype, divided by the keep probability), so the random stream and the
    values are timm's; only the branch runs on the kept samples alone, which saves the drop rate's share of the
    block's work. On an accelerator, picking the kept samples would wait for the device once per branch, so the
    branch runs on every sample and is multiplied by the scales, as timm does.

    Args:
        x: ``(B, ...)`` the residual stream.
        branch: the residual branch, applied row-wise (sample by sample).
        drop: the block's ``DropPath`` (or ``Identity`` when the rate is 0).

    Returns:
        ``(B, ...)`` the updated stream.
    """
    if not (isinstance(drop, DropPath) and drop.training and drop.drop_prob > 0.0):
        return x + drop(branch(x))
    keep_prob = 1.0 - drop.drop_prob
    scale = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and drop.scale_by_keep:
        scale.div_(keep_prob)
    if x.device.type == "cpu":
        kept = scale.view(-1).nonzero().view(-1)
        if kept.shape[0] < x.shape[0]:
            # The branch still runs (on no rows when all are dropped): every parameter takes part in the backward.
            return x.index_add(0, kept, branch(x[kept]) * scale[kept])
    return x + branch(x) * scale


class SampleDropBlock(Block):
    """timm's ViT ``Block`` whose stochastic depth skips the dropped samples (:func:`skip_dropped_samples`).

    Same parameters, state dict, random draws and values as ``Block``; used for the short arch names.
    """

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None:  # a mask may be per sample: keep timm's path
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = skip_dropped_samples(x, lambda y: self.ls1(self.attn(self.norm1(y), is_causal=is_causal)), self.drop_path1)
        return skip_dropped_samples(x, lambda y: self.ls2(self.mlp(self.norm2(y))), self.drop_path2)


def create_backbone(
    arch: str, patch_size: int = DEFAULT_PATCH_SIZE, drop_path_rate: float = 0.0, depth: int | None = None
) -> VisionTransformer:
    """Build a randomly initialised timm ViT without classifier that accepts any input size.

    Args:
        arch: ``vit_tiny`` / ``vit_small`` / ``vit_base`` (with ``patch_size``) or a timm ViT name, which fixes
            its own patch size (a non-default ``patch_size`` that contradicts it is an error).
        patch_size: patch side in pixels for the short names.
        drop_path_rate: stochastic depth rate (authors: 0.1 in pretraining).
        depth: number of transformer blocks when not the architecture's own (shallow ViTs for CPU runs).

    Returns:
        ``VisionTransformer`` with ``num_classes=0`` and ``dynamic_img_size=True``; nothing is downloaded.
    """
    name, extra = resolve_arch(arch, patch_size)
    if arch in SHORT_ARCHS:  # timm's standard block; other timm names keep their own
        extra = {**extra, "block_fn": SampleDropBlock}
    if depth is not None:
        if depth < 1:
            raise ValueError(f"depth must be a positive number of blocks, got {depth}")
        extra = {**extra, "depth": depth}
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path_rate, **extra
        )
    except TypeError as err:  # a non-ViT timm model rejects the ViT kwargs
        raise ValueError(f"arch {arch!r} is not a timm VisionTransformer: {err}") from err
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"arch {arch!r} builds a {type(model).__name__}, not a timm VisionTransformer")
    built_patch = model.patch_embed.patch_size[0]
    if arch not in SHORT_ARCHS and patch_size != DEFAULT_PATCH_SIZE and built_patch != patch_size:
        raise ValueError(
            f"arch {arch!r} has patch size {built_patch}, not patch_size={patch_size}; use a short name "
            f"{sorted(SHORT_ARCHS)} to choose the patch size"
        )
    return model


def freeze_blocks(backbone: VisionTransformer, frozen_blocks: int) -> int:
    """Freeze the patch embedding, prefix tokens, position embedding and the first ``frozen_blocks`` blocks of a
    ViT (post-training and fine-tuning keep the early layers); with every block frozen the final norm is frozen
    too. ``frozen_blocks = 0`` makes every parameter trainable.

    Returns:
        The number of parameters left trainable in ``backbone``.
    """
    depth = len(backbone.blocks)
    if not 0 <= frozen_blocks <= depth:
        raise ValueError(f"frozen_blocks={frozen_blocks} must lie in 0..{depth} (the backbone has {depth} blocks)")
    backbone.requires_grad_(True)
    if frozen_blocks:
        frozen: list[nn.Module] = [backbone.patch_embed, *backbone.blocks[:frozen_blocks]]
        if frozen_blocks == depth:
            frozen.append(backbone.norm)
        for module in frozen:
            module.requires_grad_(False)
        for name in ("cls_token", "reg_token", "pos_embed"):
            parameter = getattr(backbone, name, None)
            if isinstance(parameter, nn.Parameter):
                parameter.requires_grad_(False)
    return sum(parameter.numel() for parameter in backbone.parameters() if parameter.requires_grad)


def set_fused_attention(backbone: nn.Module, enabled: bool) -> None:
    """Switch timm's fused (``scaled_dot_product_attention``) attention on or off in every attention layer.

    Fused attention is faster and uses less memory; the explicit softmax path reproduces the authors' ViT
    bit for bit (fused: within ~2e-6 on the reference tokens).
    """
    for module in backbone.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled  # type: ignore[assignment]


def interpolate_position_embedding(pos_embed: Tensor, grid: tuple[int, int], native_grid: tuple[int, int]) -> Tensor:
    """Resample a learned position embedding to another patch grid, exactly as the authors' ViT does.

    The patch part (native grid, NCHW) goes through bicubic ``F.interpolate`` with ``scale_factor =
    ((h + 0.1) / G_h, (w + 0.1) / G_w)`` (align_corners False); the [CLS] entry is kept as is. At the native
    grid the embedding is returned unchanged.

    Args:
        pos_embed: (1, 1+G_h*G_w, D) [CLS] entry first.
        grid: target grid (h, w).
        native_grid: grid (G_h, G_w) the embedding was learned for.

    Returns:
        (1, 1+h*w, D).
    """
    if tuple(grid) == tuple(native_grid):
        return pos_embed
    native_h, native_w = native_grid
    height, width = grid
    if pos_embed.shape[1] != 1 + native_h * native_w:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} entries, expected 1 + {native_h}*{native_w} for native_grid"
        )
    dim = pos_embed.shape[-1]
    cls_entry, patch_entries = pos_embed[:, :1], pos_embed[:, 1:]
    patch_grid = patch_entries.reshape(1, native_h, native_w, dim).permute(0, 3, 1, 2)
    scale = ((height + POS_EMBED_GRID_OFFSET) / native_h, (width + POS_EMBED_GRID_OFFSET) / native_w)
    patch_grid = F.interpolate(patch_grid, scale_factor=scale, mode="bicubic", align_corners=False)
    if patch_grid.shape[-2:] != (height, width):
        raise ValueError(f"interpolated grid {tuple(patch_grid.shape[-2:])} does not match grid {grid}")
    patch_entries = patch_grid.permute(0, 2, 3, 1).reshape(1, height * width, dim)
    return torch.cat([cls_entry, patch_entries], dim=1)


def _prefix_parameters(backbone: VisionTransformer) -> tuple[Tensor, Tensor]:
    """``(cls_token (1,1,D), pos_embed (1,1+G*G,D))``; only the authors' token layout is supported."""
    cls_token, pos_embed = backbone.cls_token, backbone.pos_embed
    if cls_token is None or pos_embed is None:
        raise ValueError("backbone must have a [CLS] token and a learned position embedding")
    if backbone.num_prefix_tokens != 1 or backbone.no_embed_class:
        raise ValueError("backbones with register/distillation tokens or no_embed_class are not supported")
    return cls_token, pos_embed


def backbone_tokens(backbone: VisionTransformer, images: Tensor) -> Tensor:
    """Last-layer tokens after the final norm, [CLS] first (authors' ``get_intermediate_layers``/``forward``).

    Args:
        backbone: timm ViT from :func:`create_backbone` or :func:`load_backbone`.
        images: (B, 3, H, W) normalised images; H and W multiples of the patch size, any size.

    Returns:
        (B, 1+N, D) with ``N = (H/p) * (W/p)`` patches in row-major order.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    cls_token, pos_embed = _prefix_parameters(backbone)
    patch_h, patch_w = backbone.patch_embed.patch_size
    height, width = images.shape[-2:]
    if not backbone.patch_embed.dynamic_img_pad and (height % patch_h or width % patch_w):
        raise ValueError(f"images of {height}x{width} px are not a multiple of the patch size {patch_h}x{patch_w}")
    patches = backbone.patch_embed(images)
    if patches.ndim == 4:  # (B, h, w, D) with dynamic_img_size
        grid = (patches.shape[1], patches.shape[2])
        patches = patches.flatten(1, 2)
    else:
        grid = (height // patch_h, width // patch_w)
    pos_embed = interpolate_position_embedding(pos_embed, grid, tuple(backbone.patch_embed.grid_size))
    cls_tokens = cls_token.expand(patches.shape[0], -1, -1)
    tokens = backbone.pos_drop(torch.cat([cls_tokens, patches], dim=1) + pos_embed)
    tokens = backbone.norm_pre(backbone.patch_drop(tokens))
    if backbone.grad_checkpointing and torch.is_grad_enabled():
        tokens = checkpoint_seq(backbone.blocks, tokens)
    else:
        tokens = backbone.blocks(tokens)
    return backbone.norm(tokens)


# ----------------------------------------------------------------------------------------------------------------
# Projection head and network


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation ``weight = g * v / ||v||_row``.

    Stored as ``weight_g`` (C, 1) and ``weight_v`` (C, in), the key names of ``nn.utils.weight_norm`` in the
    authors' checkpoints. ``v`` has ``nn.Linear``'s default init (DINOHead builds its last layer after the
    trunc-normal init), ``g`` starts at 1.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        weight_v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(weight_v, a=math.sqrt(5))  # nn.Linear.reset_parameters
        self.weight_v = nn.Parameter(weight_v)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> Tensor:
        """(C, in) normalised weight."""
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        """(R, in) -> (R, C)."""
        return F.linear(x, self.weight)


def _head_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, num_layers: int, use_bn: bool) -> nn.Module:
    """DINOHead's MLP: Linear (+BN) + GELU repeated, then Linear to the bottleneck (keys mlp.0, mlp.2, ...)."""
    if num_layers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = []
    widths = [in_dim] + [hidden_dim] * (num_layers - 1)
    for width_in, width_out in itertools.pairwise(widths):
        layers.append(nn.Linear(width_in, width_out))
        if use_bn:
            layers.append(nn.BatchNorm1d(width_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class ProjectionHead(nn.Module):
    """The authors' DINOHead with two last layers: a shared MLP, L2 normalisation, then ``last_layer`` for the
    global ([CLS]) output or ``last_layer_c`` for object outputs (paper §3, projection heads).

    Args:
        in_dim: backbone width D.
        out_dim: global output dim C (paper: 65536).
        out_dim_c: object output dim Cc (paper: 65536).
        hidden_dim: MLP width (authors: 2048).
        bottleneck_dim: width before the last layers (authors: 256).
        num_layers: number of Linear layers of the MLP (authors: 3).
        use_bn: BatchNorm after the hidden Linear layers (authors' ``--use_bn_in_head``).
        norm_last_layer: freeze ``weight_g`` (= 1) of both last layers (authors' ``--norm_last_layer``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        out_dim_c: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.use_bn = use_bn
        self.mlp = _head_mlp(in_dim, hidden_dim, bottleneck_dim, num_layers, use_bn)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer_c = WeightNormLinear(bottleneck_dim, out_dim_c)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)
            self.last_layer_c.weight_g.requires_grad_(False)

    def bottleneck(self, x: Tensor) -> Tensor:
        """Shared part: (R, D) -> (R, bottleneck_dim), L2-normalised rows."""
        return F.normalize(self.mlp(x), dim=-1)

    def bottlenecks(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """:meth:`bottleneck` of each ``(R_i, D)`` input. Without batch norm the rows are independent, so the inputs
        go through the MLP as one batch (wider matrix products, one weight-gradient product per layer: ~25 % less
        time for the student's [CLS] + objects); with batch norm each input is its own batch, as in separate calls.
        """
        if self.use_bn or len(inputs) < 2:
            return tuple(self.bottleneck(x) for x in inputs)
        return self.bottleneck(torch.cat(inputs)).split([x.shape[0] for x in inputs])

    def forward(self, x: Tensor) -> Tensor:
        """Global logits: [CLS] features (R, D) -> (R, C) through ``last_layer``."""
        return self.last_layer(self.bottleneck(x))

    def forward_objects(self, x: Tensor) -> Tensor:
        """Object logits: object representations (R, D) -> (R, Cc) through ``last_layer_c``."""
        return self.last_layer_c(self.bottleneck(x))

    def last_layer_parameters(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``(weight_v, weight_g)`` of ``last_layer`` and of ``last_layer_c``, for the fused losses."""
        return (
            (self.last_layer.weight_v, self.last_layer.weight_g),
            (self.last_layer_c.weight_v, self.last_layer_c.weight_g),
        )


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=HEAD_INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class CrIBoNetwork(nn.Module):
    """Backbone plus projection head; state-dict keys ``backbone.*`` and ``head.*`` as in the authors' teacher."""

    def __init__(self, backbone: VisionTransformer, head: ProjectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> tokens (B, 1+N, D), [CLS] first (see :func:`backbone_tokens`)."""
        return backbone_tokens(self.backbone, images)
