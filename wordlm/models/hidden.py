"""The recurrent state a model carries from one chunk of text to the next, and the one function that walks it.

Main names: ``Hidden`` and ``map_hidden``. Must not import Sacred or any other ``wordlm`` module, so that
every module can import it.

A hidden state has one of three shapes: a tensor (L, B, H) for RNN and GRU; the LSTM's pair ``(h, c)``
of them; and, for the layered models (locked dropout, weight drop, a last layer of emsize units), a list
with one such state per layer, each a tensor (1, B, H_l) or a pair of them. The Transformer's is a list too:
per layer, its inputs at the last window - 1 positions (window - 1, B, E). Whatever is done to a state
(detached, moved, saved, split among processes) is done to each of its tensors, keeping the shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["Hidden", "map_hidden"]

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | list  # a list of per-layer states when layered


def map_hidden(function: Callable[[torch.Tensor], torch.Tensor], hidden: Hidden | None) -> Hidden | None:
    """``hidden`` in the same shape, with ``function`` applied to each of its tensors in order.

    Args:
        function: what to do to one tensor (it may be a collective: every process walks the same shape in
            the same order).
        hidden: a tensor, a tuple or a list of hidden states (nested as deep as need be), or ``None``.

    Returns:
        The new state: tuples stay tuples, lists stay lists; ``None`` stays ``None``.

    Raises:
        TypeError: ``hidden`` holds something other than tensors, tuples and lists.
    """
    if hidden is None:
        return None
    if isinstance(hidden, torch.Tensor):
        return function(hidden)
    if isinstance(hidden, (tuple, list)):
        return type(hidden)(map_hidden(function, part) for part in hidden)
    raise TypeError(f"a hidden state is a tensor, a tuple or a list of them, not {type(hidden).__name__}")
