"""Multi-head attention whose projections are ordinary child layers, so they can be factorized.

``torch.nn.MultiheadAttention`` holds its query/key/value projection as one packed parameter,
``in_proj_weight`` (3E x E), which no layer replacement can reach. :class:`UnpackedMultiheadAttention`
computes the same function (Vaswani et al. 2017, "Attention is all you need", eq. 1 and section
3.2.2) with the projections as child modules: one packed ``in_proj`` Linear (E -> 3E), or three
``q_proj``/``k_proj``/``v_proj`` Linears, and ``out_proj``. :func:`stpnet.compress` converts every
``nn.MultiheadAttention`` into it and then factorizes those Linears like any other.

It keeps the interface of ``nn.MultiheadAttention``: the forward signature (masks, ``need_weights``,
``average_attn_weights``, ``is_causal``, batched and unbatched inputs, ``batch_first``) and the
attributes PyTorch's own modules read (``in_proj_weight``, ``in_proj_bias``, ``out_proj``,
``num_heads``, ``batch_first``, ``_qkv_same_embed_dim``, ``merge_masks``), so it runs inside
``nn.TransformerEncoderLayer``, fast path included.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.conv import recording

__all__ = ["UnpackedMultiheadAttention", "WeightsOnceEncoderLayer"]


class UnpackedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its projections as child layers.

    Parameters
    ----------
    embed_dim, num_heads, dropout, bias, kdim, vdim, batch_first
        As in ``torch.nn.MultiheadAttention``.
    packed : bool, default True
        One ``in_proj`` Linear (E -> 3E) for query, key and value (needs ``kdim == vdim ==
        embed_dim``); self-attention then runs it once on the input. ``False``: three Linears
        ``q_proj``, ``k_proj``, ``v_proj``.

    Notes
    -----
    ``add_bias_kv`` and ``add_zero_attn`` are not supported (:meth:`from_torch` refuses such a
    module with a clear error; ``compress`` then leaves it dense and reports why).
    """

    merge_masks = nn.MultiheadAttention.merge_masks  # read by nn.TransformerEncoderLayer's fast path
    bias_k = None
    bias_v = None
    add_zero_attn = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False, *,
                 packed: bool = True, device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be positive, got {embed_dim} and {num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        if packed and not self._qkv_same_embed_dim:
            raise ValueError(f"packed=True needs kdim == vdim == embed_dim, got kdim={self.kdim}, vdim={self.vdim}, "
                             f"embed_dim={embed_dim}; use packed=False")
        self.packed = packed
        factory = {"device": device, "dtype": dtype}
        if packed:
            self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **factory)
        else:
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
            self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
            self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, *, packed: bool | None = None) -> "UnpackedMultiheadAttention":
        """The same attention, with the weights of ``module`` copied into child Linears.

        ``packed`` defaults to True when ``module`` packs its projections (kdim == vdim == embed_dim).
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise ValueError(f"from_torch expects an nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True is not supported")
        if packed is None:
            packed = module._qkv_same_embed_dim
        weight = module.out_proj.weight
        out = cls(module.embed_dim, module.num_heads, module.dropout, module.in_proj_bias is not None,
                  module.kdim, module.vdim, module.batch_first, packed=packed, device=weight.device,
                  dtype=weight.dtype)
        E = module.embed_dim
        with torch.no_grad():
            if module._qkv_same_embed_dim:
                weights = module.in_proj_weight.split(E)
            else:
                weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
            biases = module.in_proj_bias.split(E) if module.in_proj_bias is not None else (None,) * 3
            if packed:
                out.in_proj.weight.copy_(torch.cat(weights))
                if module.in_proj_bias is not None:
                    out.in_proj.bias.copy_(module.in_proj_bias)
            else:
                for proj, w, b in zip((out.q_proj, out.k_proj, out.v_proj), weights, biases):
                    proj.weight.copy_(w)
                    if b is not None:
                        proj.bias.copy_(b)
            out.out_proj.weight.copy_(module.out_proj.weight)
            if module.out_proj.bias is not None:
                out.out_proj.bias.copy_(module.out_proj.bias)
        return out.train(module.training)

    # ------------------------------------------------- the attributes torch code reads
    @property
    def in_proj_weight(self) -> torch.Tensor | None:
        """The packed (3E, E) projection weight, as ``nn.MultiheadAttention`` has it (None when
        kdim or vdim differ from embed_dim)."""
        if self.packed:
            return self.in_proj.weight
        if not self._qkv_same_embed_dim:
            return None
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        if self.packed:
            return self.in_proj.bias
        if self.q_proj.bias is None:
            return None
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])

    @property
    def q_proj_weight(self) -> torch.Tensor | None:
        return None if self._qkv_same_embed_dim else self.q_proj.weight

    @property
    def k_proj_weight(self) -> torch.Tensor | None:
        return None if self._qkv_same_embed_dim else self.k_proj.weight

    @property
    def v_proj_weight(self) -> torch.Tensor | None:
        return None if self._qkv_same_embed_dim else self.v_proj.weight

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}, packed={self.packed}")

    # ------------------------------------------------------------------ forward
    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, self_attention: bool):
        E = self.embed_dim
        if not self.packed:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self_attention:  # one call of the (possibly factorized) packed projection
            return self.in_proj(query).chunk(3, dim=-1)
        weight, bias = self.in_proj.weight, self.in_proj.bias
        biases = bias.split(E) if bias is not None else (None,) * 3
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weight.split(E), biases))

    def _float_mask(self, mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
        if not mask.is_floating_point():
            raise ValueError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
        return mask.to(dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: returns ``(output, weights or None)``."""
        self_attention = query is key and key is value
        unbatched = query.dim() == 2
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must all be 2-D (unbatched) or 3-D, got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query has {query.shape[-1]} features, embed_dim is {self.embed_dim}")
        n, L, _ = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value, self_attention)
        q = q.reshape(n, L, H, D).transpose(1, 2)
        k = k.reshape(n, S, H, D).transpose(1, 2)
        v = v.reshape(n, S, H, D).transpose(1, 2)

        if is_causal and attn_mask is None:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu_(1)
        mask = self._float_mask(attn_mask, "attn_mask", q.dtype)
        if mask is not None:
            if mask.dim() == 2:
                if tuple(mask.shape) != (L, S):
                    raise ValueError(f"a 2-D attn_mask must have shape ({L}, {S}), got {tuple(mask.shape)}")
                mask = mask.view(1, 1, L, S)
            elif mask.dim() == 3 and tuple(mask.shape) == (n * H, L, S):
                mask = mask.view(n, H, L, S)
            else:
                raise ValueError(f"attn_mask must have shape ({L}, {S}) or ({n * H}, {L}, {S}), got {tuple(mask.shape)}")
        padding = self._float_mask(key_padding_mask, "key_padding_mask", q.dtype)
        if padding is not None:
            if tuple(padding.shape) != (n, S):
                raise ValueError(f"key_padding_mask must have shape ({n}, {S}), got {tuple(padding.shape)}")
            padding = padding.view(n, 1, 1, S)
            mask = padding if mask is None else mask + padding
        p = self.dropout if self.training else 0.0

        if need_weights:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(dim=-1), p, training=self.training)  # returned after dropout, as torch
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, L, self.embed_dim))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


class WeightsOnceEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` around an :class:`UnpackedMultiheadAttention` whose inference
    fast path reads each weight once, and which runs its modules where they are not on dense
    weights.

    In eval mode without gradients, PyTorch's encoder layer runs one fused kernel
    (``torch._transformer_encoder_layer_fwd``) on the weights it reads from its attention and
    feed-forward layers, and it reads each of them twice: once to check that the fast path
    applies, once to call it. A factorized or fused layer's ``weight`` is rebuilt once and then
    checked against its factors on every read (:class:`stpnet.nn._cache.InferenceCache`), so
    :func:`stpnet.fuse` turns such encoder layers into this class. In the plain inference case
    (eval mode, gradients off, not traced or compiled, the fast path enabled
    (``torch.backends.mha``), a batched, batch-first (N, L, E) plain tensor, no masks and no
    ``is_causal``, no autocast, no hooks on the layer or its submodules, a packed attention with
    biases and an even number of heads, ReLU or GELU, equal LayerNorm epsilons, every tensor on
    the input's device, CPU or CUDA) it

    * calls that kernel with the same arguments, each weight read once, when every projection
      runs on its dense weight (a fused layer in the ``'dense'`` form, or a layer kept
      factorized);
    * else runs its modules, as PyTorch's layer does with the fast path off: the projections
      then run the forms :func:`stpnet.fuse` chose for them (measured faster than their dense
      op), which the kernel would bypass.

    Every other call is ``nn.TransformerEncoderLayer.forward`` itself, so the function is the same
    in every case.
    """

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        plan = None
        if src_mask is None and src_key_padding_mask is None and not is_causal:
            plan = self._inference_plan(src)
        if plan == "modules":
            if self.norm_first:
                x = src + self._sa_block(self.norm1(src), None, None)
                return x + self._ff_block(self.norm2(x))
            x = self.norm1(src + self._sa_block(src, None, None))
            return self.norm2(x + self._ff_block(x))
        if plan is None:
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        attn = self.self_attn
        in_w, in_b, out_w, out_b, n1_w, n1_b, n2_w, n2_b, l1_w, l1_b, l2_w, l2_b = plan
        mask, mask_type = attn.merge_masks(None, None, src)
        return torch._transformer_encoder_layer_fwd(
            src, attn.embed_dim, attn.num_heads, in_w, in_b, out_w, out_b, self.activation_relu_or_gelu == 2,
            self.norm_first, self.norm1.eps, n1_w, n1_b, n2_w, n2_b, l1_w, l1_b, l2_w, l2_b, mask, mask_type)

    def _inference_plan(self, src: torch.Tensor) -> str | tuple[torch.Tensor, ...] | None:
        """For a call without masks: None where PyTorch's layer runs (not the plain inference case
        of the class docstring), ``'modules'`` where a projection is not on its dense weight, else
        the fused kernel's tensors, each read once. (Submodules and parameters are read from
        their dicts: this runs on every inference call.)"""
        if (self.training or torch.is_grad_enabled() or type(src) is not torch.Tensor or src.dim() != 3
                or src.is_nested or recording() or not torch.backends.mha.get_fastpath_enabled()):
            return None
        device = src.device.type
        if device not in ("cpu", "cuda") or torch.is_autocast_enabled(device) or torch.is_autocast_enabled("cpu"):
            return None
        children = self._modules
        attn, norm1, norm2 = children.get("self_attn"), children.get("norm1"), children.get("norm2")
        linear1, linear2 = children.get("linear1"), children.get("linear2")
        if (not isinstance(attn, UnpackedMultiheadAttention) or not attn.packed or not attn.batch_first
                or attn.num_heads % 2 or not self.activation_relu_or_gelu or norm1.eps != norm2.eps):
            return None
        stack: list[nn.Module] = [self]
        while stack:  # no hooks anywhere below (they would not run inside the kernel)
            module = stack.pop()
            if module._forward_hooks or module._forward_pre_hooks:
                return None
            for child in module._modules.values():
                if child is not None:
                    stack.append(child)
        in_proj, out_proj = attn._modules.get("in_proj"), attn._modules.get("out_proj")
        projections = (in_proj, out_proj, linear1, linear2)
        for m in projections:
            if m.__dict__.get("form", "dense") != "dense":  # a fused layer's form; other layers have none
                return "modules"
        tensors = (in_proj.weight, in_proj._parameters.get("bias"), out_proj.weight, out_proj._parameters.get("bias"),
                   norm1._parameters.get("weight"), norm1._parameters.get("bias"), norm2._parameters.get("weight"),
                   norm2._parameters.get("bias"), linear1.weight, linear1._parameters.get("bias"), linear2.weight,
                   linear2._parameters.get("bias"))
        on_cpu = device == "cpu"
        for t in tensors:
            if type(t) not in (torch.Tensor, nn.Parameter) or (not t.is_cpu if on_cpu else t.device != src.device):
                return None
        return tensors
