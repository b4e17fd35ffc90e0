"""lm-eval's HFLM, scoring continuations with the LM head on the scored positions only.

A multiple-choice request is (context, continuation); its score is
  sum_t log softmax(z_t)[c_t],  z_t = head(h_t),  t over the continuation's positions,
where h_t is the last hidden state before continuation token c_t. lm-eval's HFLM computes the
logits z at every position of every (padded) input and its log-softmax over the whole
vocabulary, then keeps the continuation's rows. With a wide vocabulary the head is most of the
work: Gemma 3's 262,144 x 640 head costs 1.7x its 18 blocks per token, and 200 tokens of
float32 logits are 210 MB. `ContinuationHFLM` runs the same blocks on the same inputs (lm-eval's
left truncation, right padding in batches sorted by length) and asks the model for the logits of
the positions [min start, max end) of the batch's continuations (`logits_to_keep` with
indices); everything else (requests, metrics, caching hook, order of the answers) is lm-eval's.
Answers equal HFLM's up to float rounding (tests/test_zeroshot.py).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

Request = tuple[tuple[str, str] | None, list[int], list[int]]


def keeps_logits(model) -> bool:
    """Whether the model's forward may take `logits_to_keep` (every transformers 5 causal LM;
    a forward of **kwargs may ignore it, which `_score` checks)."""
    params = inspect.signature(model.forward).parameters
    return "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class ContinuationHFLM(HFLM):
    """HFLM whose log-likelihoods compute the LM head on the continuation positions only."""

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        if self.backend != "causal" or not keeps_logits(self.model):
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 1)
        # Longest first, as lm-eval: little padding inside a batch.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood") as bar:
            for first in range(0, len(order), size):
                batch = order[first : first + size]
                scored = self._score([requests[i] for i in batch])
                for i, answer in zip(batch, scored, strict=True):
                    answers[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(batch))
        return answers

    @torch.no_grad()
    def _score(self, requests: list[Request]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, whether greedy decoding gives the continuation) each."""
        inputs, conts = [], []
        for _, context, continuation in requests:
            # lm-eval's causal input: the last max_length + 1 tokens, without the last one.
            inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
            conts.append(continuation)
        width = max(len(x) for x in inputs)
        ids = torch.zeros(len(inputs), width, dtype=torch.long)  # right padding, as lm-eval
        for row, x in enumerate(inputs):
            ids[row, : len(x)] = torch.tensor(x)
        starts = [len(x) - len(c) for x, c in zip(inputs, conts, strict=True)]
        low, high = min(starts), max(len(x) for x in inputs)
        keep = torch.arange(low, high, device=self.device)
        logits = self.model(ids.to(self.device), logits_to_keep=keep).logits
        if logits.shape[1] == width != high - low:  # a forward that ignored logits_to_keep
            logits = logits[:, low:high]
        logp = F.log_softmax(logits.float(), dim=-1)  # [batch, high - low, vocab]
        out = []
        for row, (start, cont) in enumerate(zip(starts, conts, strict=True)):
            rows = logp[row, start - low : start - low + len(cont)]
            target = torch.tensor(cont, device=rows.device)
            greedy = bool((rows.argmax(-1) == target).all())
            out.append((float(rows.gather(1, target[:, None]).sum()), greedy))
        return out
