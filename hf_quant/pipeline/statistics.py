"""What the block loop collects while a block runs on the calibration data: the input Hessians (and input samples)
of its linears, and the per-token attention importance of RSQ."""

from __future__ import annotations

import torch
from torch import nn


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class InputCollector:
    """Accumulates X^T X of the inputs of a block's linears (those in `hessian_of`), and keeps a sample of the input
    rows of those in `sample_of` (every `sample_stride`-th token); linears fed the same tensor share both.
    With `folds`, the sum over the even-numbered calibration sequences is also kept, so that `fold_hessians` can
    give the mean X^T X of each half (damp='cv' cross-validates GPTQ's damping on them)."""

    def __init__(self, modules: dict[str, nn.Module], hessian_of: set[str], sample_of: set[str], sample_stride: int,
                 token_weights: bool = False, folds: bool = False):
        # With token weights (RSQ), a batch's Hessian updates wait for `end_batch(weights)`: the weights come from the
        # block's attention, which runs after the q/k/v projections have been called.
        self.token_weights = token_weights
        self._pending: list[tuple[str, torch.Tensor]] = []
        self.leader: dict[str, str] = {}  # module name -> the module whose statistics it shares
        self.hessians: dict[str, torch.Tensor] = {}
        self._normalised: set[str] = set()
        self.counts: dict[str, float] = {}
        self.folds = folds
        self._fold0: dict[str, tuple[torch.Tensor, float]] = {}  # leader -> (X^T X, count) of even sequences
        self._sequences_before = 0  # calibration sequences in earlier batches (their parity picks the fold)
        self._batch_sequences = 0
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.hessian_of, self.sample_of, self.stride = hessian_of, sample_of, sample_stride
        # (data_ptr, shape, stride) of each input seen in the current batch -> (first module fed it, the tensor). The
        # tensor is held so that its memory cannot be freed and handed to a later input of the same shape (o_proj's
        # or gate_proj's after q_proj's), which would then share the wrong module's statistics.
        self._batch_inputs: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def new_batch(self) -> None:
        self._batch_inputs.clear()
        self._pending.clear()
        self._sequences_before += self._batch_sequences
        self._batch_sequences = 0

    def end_batch(self, weights: torch.Tensor | None) -> None:
        """Accumulate the batch's deferred Hessian updates, each token's row weighted by `weights` [batch, tokens]."""
        for name, x in self._pending:
            self._accumulate(name, x, None if weights is None else weights.reshape(-1, 1).to(x))
        self._pending.clear()

    def _accumulate(self, name: str, x: torch.Tensor, weights: torch.Tensor | None) -> None:
        h = self.hessians.get(name)
        if h is None:
            h = self.hessians[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.counts[name] = 0.0
        h.addmm_((x * weights if weights is not None else x).t(), x)
        self.counts[name] += x.shape[0] if weights is None else float(weights.sum())
        if self.folds:  # the even-numbered sequences' share, rows grouped by sequence ([batch * tokens, in])
            even = (torch.arange(self._batch_sequences, device=x.device) + self._sequences_before) % 2 == 0
            rows = even.repeat_interleave(x.shape[0] // max(self._batch_sequences, 1))
            xe = x[rows]
            we = None if weights is None else weights[rows]
            h0, c0 = self._fold0.get(name, (None, 0.0))
            if h0 is None:
                h0 = torch.zeros_like(h)
            h0.addmm_((xe * we if we is not None else xe).t(), xe)
            self._fold0[name] = (h0, c0 + (xe.shape[0] if we is None else float(we.sum())))

    def _hook(self, name):
        def hook(_module, args, _output):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            first, _ = self._batch_inputs.setdefault(key, (name, x))
            leader = self.leader.setdefault(name, first)
            if leader != name:
                return
            # a linear's input is [batch, tokens, in] (a flat [tokens, in] is one sequence)
            self._batch_sequences = x.shape[0] if x.dim() > 2 else 1
            x = x.detach().reshape(-1, x.shape[-1]).float()
            if name in self.sample_of:
                self.samples.setdefault(name, []).append(x[:: self.stride].clone())
            if name not in self.hessian_of:
                return
            if self.token_weights:
                self._pending.append((name, x))
            else:
                self._accumulate(name, x, None)

        return hook

    def hessian(self, name: str) -> torch.Tensor:
        """The mean X^T X of `name`'s inputs (normalised in place the first time: no second n x n copy)."""
        leader = self.leader[name]
        if leader not in self._normalised:
            self.hessians[leader].div_(max(self.counts[leader], 1.0))
            self._normalised.add(leader)
        return self.hessians[leader]

    def fold_hessians(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean X^T X of `name`'s inputs over the even- and over the odd-numbered calibration sequences (new
        tensors; `folds=True`, before `hessian(name)`). Raises when a half saw no sequence."""
        leader = self.leader[name]
        if leader in self._normalised:
            raise RuntimeError("fold_hessians must be called before hessian() normalises the sum in place")
        total, count = self.hessians[leader], self.counts[leader]
        h0, c0 = self._fold0.pop(leader, (None, 0.0))
        if h0 is None or c0 <= 0 or count - c0 <= 0:
            raise ValueError(f"damp='cv' needs calibration sequences in both halves (even- and odd-numbered) for "
                             f"{name}'s inputs; give n_samples >= 2")
        odd = (total - h0).div_(count - c0)
        return h0.div_(c0), odd

    def release(self, name: str) -> None:
        """Free the Hessian `name` reads (its consumer is done with it): the largest is n x n floats of the widest
        linear's inputs (0.8 GiB for Llama-3-8B's down_proj), not to be held while the next linear is solved."""
        self.hessians.pop(self.leader[name], None)

    def sample(self, name: str) -> torch.Tensor:
        return torch.cat(self.samples[self.leader[name]])

    def held_bytes(self) -> int:
        return (nbytes(self.hessians.values()) + nbytes(h for h, _ in self._fold0.values())
                + nbytes(t for ts in self.samples.values() for t in ts)
                + nbytes(t for _, t in self._batch_inputs.values()))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class AttentionImportance:
    """RSQ-style token importance ("attention concentration"): the attention each token receives in a block, as
    probabilities averaged over heads and summed over queries, relative to its sequence's mean and clipped to
    [0.1, 10] (an attention sink would otherwise take all the weight)."""

    def __init__(self, block: nn.Module):
        self.weights: torch.Tensor | None = None
        self._handles = [m.register_forward_hook(self._hook) for m in block.modules()]

    def _hook(self, _module, _args, output):
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if isinstance(probs, torch.Tensor) and probs.dim() == 4:
            received = probs.float().mean(1).sum(1)  # [batch, heads, queries, keys] -> [batch, keys]
            self.weights = (received / received.mean(-1, keepdim=True)).clamp(0.1, 10.0)

    def take(self) -> torch.Tensor:
        if self.weights is None:
            raise ValueError("token_weighting='attention' found no attention probabilities in the block (the model's "
                             "attention does not return them); use token_weighting=None")
        weights, self.weights = self.weights, None
        return weights

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
