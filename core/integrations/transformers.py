"""transformers' attention served by ``dispatcher.attention``: ``register()``, then
``attn_implementation="switchyard"``.

The attention function takes exactly what transformers hands its "sdpa" implementation (q, k, v
``[B, H, L, D]`` with k and v on the model's key/value heads, the mask that ``sdpa_mask`` built) and
makes one ``dispatcher.attention`` call. The mask function registered beside it is ``sdpa_mask``
itself, so the model receives the masks SDPA would: a bool ``[B, 1, Lq, Lk]`` (True = may attend) with
padding and sliding windows in it, or None where the call is purely causal and the flag suffices.

How SDPA's flag maps onto ours: SDPA's ``is_causal`` aligns the triangle top-left, ours bottom-right
(query i sees key j iff ``j <= i + Lk - Lq``). transformers only ever leaves the mask out when the two
agree (``Lq == Lk``, or one query, which it serves with ``is_causal=False``), except for a prefill
into an empty static cache (``Lk > Lq``, the keys past ``Lq`` not yet written), where SDPA's own
integration drops those keys; we do the same, so the causal flag we pass means what SDPA's meant.
GQA needs no copying: the op reads query head h from key/value head ``h // (Hq // Hkv)``, as
``repeat_kv`` lays them out.
"""
from __future__ import annotations

from typing import Any

import torch

from core.errors import Unsupported

NAME = "switchyard"


def _layer(module: Any) -> str:
    index = getattr(module, "layer_idx", None)
    where = f" (layer_idx={index})" if index is not None else ""
    return f"{type(module).__name__}{where}"


def _bool_mask(mask: torch.Tensor, module: Any) -> torch.Tensor:
    """A user's own 4-D float mask: additive 0 / -inf (or the dtype's minimum) becomes bool; any other
    bias cannot be expressed by the op's bool mask."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.dtype.is_floating_point:
        raise Unsupported(f"switchyard attention in {_layer(module)}: attention_mask of dtype {mask.dtype} is not "
                          f"supported; expected a bool mask (True = may attend) or an additive float mask of 0 and -inf")
    blocked = mask <= torch.finfo(mask.dtype).min
    if not bool(((mask == 0) | blocked).all()):
        raise Unsupported(f"switchyard attention in {_layer(module)}: an additive float attention_mask with values "
                          f"other than 0 and -inf (a learned bias) is not supported by the op's bool mask; use "
                          f"attn_implementation='sdpa' for this model")
    return ~blocked


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over ``dispatcher.attention``; returns
    ``([B, L, H, Dv] contiguous, None)`` as the "sdpa" implementation does."""
    from core import dispatcher

    if dropout and dropout > 0:
        raise Unsupported(f"switchyard attention in {_layer(module)}: attention dropout {dropout!r} (the module is in "
                          f"training mode with attention_dropout > 0) is not supported; set the config's "
                          f"attention_dropout to 0, call model.eval(), or use attn_implementation='sdpa'")
    for name in ("softcap", "position_bias", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise Unsupported(f"switchyard attention in {_layer(module)}: {name!r} is not supported; use "
                              f"attn_implementation='sdpa' or 'eager' for this model")
    q_length, kv_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_length > 1 and attention_mask is None and causal)
    if causal and kv_length > q_length:  # top-left meant: an empty static cache's unwritten keys (see above)
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    if attention_mask is not None:
        attention_mask = _bool_mask(attention_mask, module)
    out = dispatcher.attention(query, key, value, causal=causal, scale=scaling, attn_mask=attention_mask)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register ``"switchyard"`` with transformers' attention and mask interfaces; returns the name.

    Calling it again is harmless (the same functions are registered under the same name).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
