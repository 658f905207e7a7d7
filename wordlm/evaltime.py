"""Evaluation-time improvements: the continuous cache pointer and dynamic evaluation.

Lives here: ``cache_pointer_loss`` and ``dynamic_evaluation_loss``. Must not import Sacred. Both read
the text as one stream (batch 1), as their papers and AWD-LSTM's pointer.py do, and score every token
but the first exactly once.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from wordlm.model import RNNModel, detach_hidden


@torch.inference_mode()
def cache_pointer_loss(
    model: RNNModel, ids: torch.Tensor, window: int, theta: float, lambdah: float, chunk: int = 500
) -> tuple[float, int]:
    """Mean loss with the continuous cache pointer (Grave, Joulin & Usunier 2017).

    The probability of the next word mixes the model's softmax with a cache of the last ``window``
    top-layer states: ``p = (1 - λ) p_model + λ p_cache``, where ``p_cache(w)`` is the softmax of
    ``θ · h_t · h_i`` over the cached states ``h_i`` whose next word was ``w``. With λ = 0 it is the plain
    model. Typical values on WikiText-2 (AWD-LSTM): window 3785, θ 0.662, λ 0.1279.

    Returns:
        ``(loss, targets)``: mean negative log-likelihood and the number of targets (``len(ids) - 1``).
    """
    model.eval()
    hidden = model.init_hidden(1)
    memory_states = ids.new_empty(0, dtype=torch.float32)  # (≤window, H)
    memory_words = ids.new_empty(0)  # (≤window,) the word that followed each cached state
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, chunk):
        inputs = ids[start : start + chunk]
        targets = ids[start + 1 : start + 1 + inputs.numel()]
        inputs = inputs[: targets.numel()]
        features, hidden = model.features(inputs.view(-1, 1), hidden)  # (T, 1, H)
        states = features.squeeze(1)  # (T, H)
        log_model = torch.log_softmax(model.scores(states).double(), dim=-1)  # (T, V)
        model_log_prob = log_model.gather(1, targets.view(-1, 1)).squeeze(1)  # (T,)
        if window > 0 and lambdah > 0:
            keys = torch.cat([memory_states, states])  # (M + T, H): cache, then this chunk
            words = torch.cat([memory_words, targets])
            steps = torch.arange(states.size(0), device=ids.device)
            positions = torch.arange(keys.size(0), device=ids.device) - memory_states.size(0)
            # state t sees the states of the `window` steps before it, not itself or later ones
            visible = (positions[None, :] < steps[:, None]) & (positions[None, :] >= steps[:, None] - window)
            scores = (theta * states.double() @ keys.double().t()).masked_fill(~visible, -math.inf)  # (T, M+T)
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no cache yet: all zero
            cache_prob = (weights * (words[None, :] == targets[:, None])).sum(-1)  # (T,)
            has_cache = visible.any(-1)
            mixed = (1 - lambdah) * model_log_prob.exp() + lambdah * cache_prob
            log_prob = torch.where(has_cache, mixed.log(), model_log_prob)
            memory_states, memory_words = keys[-window:], words[-window:]
        else:
            log_prob = model_log_prob
        total -= log_prob.sum().item()
        count += targets.numel()
    return total / count, count


def dynamic_evaluation_loss(
    model: RNNModel, ids: torch.Tensor, bptt: int, lr: float, decay: float = 0.0
) -> tuple[float, int]:
    """Mean loss with dynamic evaluation (Krause, Kahembwe, Murray & Renals 2018), SGD variant.

    The text is scored ``bptt`` tokens at a time; after each segment is scored, the model takes one
    gradient step on it, ``θ ← θ - lr · ∇ + decay · (θ₀ - θ)``, so later text is predicted by a model
    adapted to the text so far. Each segment is scored before the model learns from it. With ``lr`` 0
    and ``decay`` 0 it is plain evaluation at batch 1. The caller's model is not changed.

    Returns:
        ``(loss, targets)``: mean negative log-likelihood and the number of targets.
    """
    adapted = copy.deepcopy(model)
    adapted.eval()  # no dropout: the gradient step is on the clean model's predictions
    original = [p.detach().clone() for p in adapted.parameters()]
    hidden = adapted.init_hidden(1)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for start in range(0, ids.numel() - 1, bptt):
        inputs = ids[start : start + bptt]
        targets = ids[start + 1 : start + 1 + inputs.numel()]
        inputs = inputs[: targets.numel()]
        hidden = detach_hidden(hidden)
        features, hidden = adapted.features(inputs.view(-1, 1), hidden)
        logits = adapted.scores(features.squeeze(1))
        loss = F.cross_entropy(logits, targets, reduction="sum")
        total += loss.detach().double().cpu()
        count += targets.numel()
        if lr > 0 or decay > 0:
            adapted.zero_grad(set_to_none=True)
            (loss / targets.numel()).backward()
            with torch.no_grad():
                for parameter, start_value in zip(adapted.parameters(), original):
                    if parameter.grad is not None and lr > 0:
                        parameter.sub_(lr * parameter.grad)
                    if decay > 0:
                        parameter.add_(decay * (start_value - parameter))
    return total.item() / count, count
