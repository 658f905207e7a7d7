"""The one walk over a hidden state: tensor, LSTM pair, the layered models' list."""

from __future__ import annotations

import pytest
import torch

from wordlm.models import ModelConfig, RNNModel, detach_hidden
from wordlm.models.hidden import map_hidden


@pytest.mark.parametrize(("model_type", "layered"), [("GRU", False), ("LSTM", False), ("GRU", True), ("LSTM", True)])
def test_every_shape_of_state_keeps_its_shape_and_each_tensor_is_mapped(model_type, layered):
    model = RNNModel(ModelConfig(ntoken=20, model_type=model_type, emsize=6, nhid=6, locked_dropout=layered))
    hidden = model.init_hidden(3)
    assert isinstance(hidden, list if layered else tuple if model_type == "LSTM" else torch.Tensor)
    seen = []
    shifted = map_hidden(lambda h: seen.append(h.shape) or h + 1, hidden)
    assert type(shifted) is type(hidden) and len(seen) == {False: 1, True: 2}[layered] * (1 + (model_type == "LSTM"))
    _, carried = model(torch.zeros(4, 3, dtype=torch.long), shifted)
    detached = detach_hidden(carried)
    assert map_hidden(lambda h: h.shape, detached) == map_hidden(lambda h: h.shape, hidden)
    assert all(not h.requires_grad for h in _tensors(detached)) and any(h.requires_grad for h in _tensors(carried))
    assert map_hidden(torch.Tensor.detach, None) is None


def test_anything_else_is_refused_by_name():
    with pytest.raises(TypeError, match="not dict"):
        map_hidden(torch.Tensor.detach, {"h": torch.zeros(1)})


def _tensors(hidden) -> list[torch.Tensor]:
    found = []
    map_hidden(lambda h: found.append(h) or h, hidden)
    return found
