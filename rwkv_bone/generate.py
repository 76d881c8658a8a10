"""Text generation with an RWKV-6 model: the prompt goes through once, then one token at a time
with the carried recurrent state (no growing cache, constant cost per token).

    logits, state = feed(prompt)                       # in chunks; only the last logits are kept
    repeat: t = sample_next(logits); stop on end-of-document (id 0) or a stop string
            logits, state = model.step([t], state)     # the one-token path (rwkv_bone.decode)

Sampling (`sample_next`), over the model's logits l (V,):
    temperature 0: greedy, argmax l.
    otherwise: p = softmax(l / temperature); sort p descending; keep each token whose preceding
    mass (sum of the more likely ones) is < top_p, so the top token always stays and top_p = 1
    keeps everything (the "nucleus"); renormalise and draw with a seeded generator.

Streaming (`stream_text`): a World token is a byte string and may end inside a UTF-8 character, so
text is released only once its bytes decode cleanly; a tail that could still grow into a stop string
is held back until it either completes the stop string (generation ends before it) or cannot.
"""
from __future__ import annotations

import codecs
import math
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from .decode import EOD_ID, PROMPT_CHUNK, advance, feed  # noqa: F401 - feed/PROMPT_CHUNK re-exported
from .errors import UserError
from .model import RWKV6

DEFAULT_TOP_P = 0.85      # the nucleus the RWKV reference demos use

def check_sampling(temperature: float, top_p: float) -> None:
    """Refuse settings that have no meaning: temperature < 0 or top_p outside (0, 1]."""
    if not math.isfinite(temperature):
        raise UserError(f"temperature {temperature} is not a finite number; use 0 for greedy decoding "
                        "or a positive value such as 1.0")
    if temperature < 0:
        raise UserError(f"temperature {temperature} is negative; use 0 for greedy decoding or a "
                        "positive value such as 1.0")
    if math.isnan(top_p):
        raise UserError("top_p nan is not a number; use a value in (0, 1] such as 0.85 (1 keeps every token)")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p {top_p} is outside (0, 1]; use e.g. 0.85 (1 keeps every token)")


def sample_next(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> int:
    """One token id from logits (V,) (see the module docstring); computed on the CPU in float32 so
    a seed gives the same draws on every device."""
    logits = logits.detach().float().cpu()
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)  # (V,)
    if top_p >= 1:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_p, order = torch.sort(probs, descending=True)  # (V,), (V,)
    before = torch.cumsum(sorted_p, dim=0) - sorted_p     # mass of the strictly more likely tokens
    nucleus = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    return int(order[torch.multinomial(nucleus, 1, generator=generator)])


@torch.inference_mode()
def generate_tokens(model: RWKV6, prompt_ids: Sequence[int], max_tokens: int = 200, *,
                    temperature: float = 1.0, top_p: float = DEFAULT_TOP_P,
                    seed: Optional[int] = None, stop_ids: Sequence[int] = (EOD_ID,),
                    vocab_limit: Optional[int] = None) -> Iterator[int]:
    """Yield up to `max_tokens` new token ids after `prompt_ids`, ending early (without yielding it)
    at a token in `stop_ids`. Ids >= `vocab_limit` (those the tokenizer cannot decode) are never
    drawn. seed None draws a fresh random seed."""
    check_sampling(temperature, top_p)
    if max_tokens < 0:
        raise UserError(f"max_tokens {max_tokens} is negative; ask for 0 or more new tokens")
    if len(prompt_ids) == 0:
        raise UserError("the prompt is empty; give the model some text to continue")
    V = model.config.vocab_size
    bad = [i for i in prompt_ids if not 0 <= int(i) < V]
    if bad:
        raise UserError(f"prompt token id {bad[0]} is outside the model's vocabulary (0..{V - 1}); "
                        "use the tokenizer the model was trained with")
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    stops = set(int(i) for i in stop_ids)
    logits, state = feed(model, prompt_ids)
    for n in range(max_tokens):
        if vocab_limit is not None and vocab_limit < V:
            logits = logits.clone()
            logits[vocab_limit:] = float("-inf")
        token = sample_next(logits, temperature, top_p, gen)
        if token in stops:
            return
        yield token
        if n + 1 < max_tokens:
            logits, state = advance(model, token, state)


class TextStream:
    """Token ids in, printable text out, never half a UTF-8 character. World tokenizers give bytes
    (decoded incrementally); others (tokenizer.json) are decoded whole and released when the text
    does not end in an incomplete character (U+FFFD)."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self._bytes = getattr(tokenizer, "decode_bytes", None)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._released = 0  # characters of decode(self._ids) already returned (non-byte path)

    def push(self, token: int) -> str:
        if self._bytes is not None:
            return self._utf8.decode(self._bytes([token]))
        self._ids.append(token)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def finish(self) -> str:
        """Whatever is left (an incomplete final character becomes U+FFFD)."""
        if self._bytes is not None:
            return self._utf8.decode(b"", final=True)
        return self._take(self._tok.decode(self._ids)) if self._ids else ""

    def _take(self, text: str) -> str:
        new, self._released = text[self._released:], max(self._released, len(text))
        return new


def _first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:k])), default=0)


def stream_text(model: RWKV6, tokenizer, prompt: str, max_tokens: int = 200, *,
                temperature: float = 1.0, top_p: float = DEFAULT_TOP_P, seed: Optional[int] = None,
                stop: Sequence[str] = ()) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece as it can be printed. Ends at the
    end-of-document token, after `max_tokens` tokens, or just before the first stop string."""
    if not prompt:
        raise UserError("the prompt is empty; give the model some text to continue")
    ids = tokenizer.encode(prompt)
    stops = [s for s in stop if s]
    limit = min(model.config.vocab_size, tokenizer.vocab_size)
    text = TextStream(tokenizer)
    pending = ""  # decoded but not yet released: it may be the start of a stop string
    tokens = generate_tokens(model, ids, max_tokens, temperature=temperature, top_p=top_p,
                             seed=seed, vocab_limit=limit)
    for piece in _pieces(tokens, text):
        pending += piece
        cut = _first_stop(pending, stops)
        if cut is not None:
            if cut:
                yield pending[:cut]
            return
        ready = len(pending) - _held_back(pending, stops)
        if ready:
            yield pending[:ready]
            pending = pending[ready:]
    if pending:
        yield pending


def _pieces(tokens: Iterator[int], text: TextStream) -> Iterator[str]:
    for t in tokens:
        yield text.push(t)
    yield text.finish()


def generate(model: RWKV6, tokenizer, prompt: str, max_tokens: int = 200, *,
             temperature: float = 1.0, top_p: float = DEFAULT_TOP_P, seed: Optional[int] = None,
             stop: Sequence[str] = ()) -> str:
    """The whole continuation of `prompt` as one string (see `stream_text`)."""
    return "".join(stream_text(model, tokenizer, prompt, max_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, stop=stop))


__all__ = ["EOD_ID", "DEFAULT_TOP_P", "check_sampling", "sample_next", "feed", "generate_tokens", "TextStream",
           "stream_text", "generate"]
