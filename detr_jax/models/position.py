"""Padding mask at feature resolution and the position embeddings of DETR."""
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of torch ``F.interpolate(mode='nearest', size=out_size)`` along one axis:
    floor(i * in/out) with the scale in float32, as torch computes it."""
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def downsample_mask(padding_mask, feature_hw: tuple[int, int]):
    """padding_mask [B, H, W] bool -> [B, h, w] bool, nearest-neighbour as official DETR does."""
    rows = nearest_indices(padding_mask.shape[1], feature_hw[0])
    cols = nearest_indices(padding_mask.shape[2], feature_hw[1])
    return padding_mask[:, rows][:, :, cols]


class SinePositionEmbedding(nn.Module):
    """Sine/cosine embedding of (y, x), normalised over the unpadded region.

    mask [B, h, w] (True = padding) -> [B, h, w, 2 * num_pos_feats], the y half first.
    Coordinates are the cumulative count of unpadded cells, divided by the column (row) total and
    scaled to [0, scale], so extra padding never changes an image's embedding.
    """
    num_pos_feats: int
    temperature: float = 10000.0
    scale: float = 2 * math.pi
    offset: float = 0.0  # subtracted from the counts before normalising (Deformable DETR: 0.5)

    def __call__(self, mask):
        not_mask = (~mask).astype(jnp.float32)
        y_embed = jnp.cumsum(not_mask, axis=1)
        x_embed = jnp.cumsum(not_mask, axis=2)
        eps = 1e-6
        y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        n = self.num_pos_feats
        dim_t = np.float32(self.temperature) ** (2 * (np.arange(n, dtype=np.float32) // 2) / np.float32(n))

        def embed(coord):  # [B, h, w] -> [B, h, w, n], (sin, cos) interleaved
            p = coord[..., None] / dim_t
            return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(*p.shape[:3], n)

        return jnp.concatenate([embed(y_embed), embed(x_embed)], axis=-1)


class LearnedPositionEmbedding(nn.Module):
    """Learned row and column embeddings (50 each, as official), x half first as official.

    mask [B, h, w] -> [B, h, w, 2 * num_pos_feats]; feature maps must be at most 50 x 50.
    """
    num_pos_feats: int
    max_size: int = 50

    @nn.compact
    def __call__(self, mask):
        b, h, w = mask.shape
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"position_embedding='learned' supports feature maps up to {self.max_size} x "
                             f"{self.max_size}; got {h} x {w}. Use smaller images or position_embedding='sine'.")
        uniform = nn.initializers.uniform(1.0)
        row = self.param("row_embed", uniform, (self.max_size, self.num_pos_feats))
        col = self.param("col_embed", uniform, (self.max_size, self.num_pos_feats))
        pos = jnp.concatenate([jnp.broadcast_to(col[None, :w], (h, w, self.num_pos_feats)),
                               jnp.broadcast_to(row[:h, None], (h, w, self.num_pos_feats))], axis=-1)
        return jnp.broadcast_to(pos, (b, h, w, 2 * self.num_pos_feats))


def sine_embed_points(points, num_feats: int, temperature: float = 10000.0):
    """Sine embedding of points or boxes in [0, 1] as Conditional DETR's and DAB-DETR's
    ``gen_sineembed_for_position``: points [..., R] (R = 2: (x, y); 4: (x, y, w, h)) ->
    [..., R * num_feats], each coordinate times 2 pi embedded like ``SinePositionEmbedding``'s, in the
    order y, x (, w, h). Float32."""
    points = points.astype(jnp.float32)
    dim_t = np.float32(temperature) ** (2 * (np.arange(num_feats, dtype=np.float32) // 2) / np.float32(num_feats))

    def embed(coord):  # [...] -> [..., num_feats], (sin, cos) interleaved
        p = coord[..., None] * np.float32(2 * math.pi) / dim_t
        return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(*p.shape[:-1], num_feats)

    order = (1, 0, 2, 3)[:points.shape[-1]]
    return jnp.concatenate([embed(points[..., i]) for i in order], axis=-1)
