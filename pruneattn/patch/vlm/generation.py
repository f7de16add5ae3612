"""``generate`` of a patched vision-language model: one mixin for every family.

``generate`` reads the call once (:func:`pruneattn.patch.vlm.call.prepare`) and runs the model's own
``generate`` on the model's call; the forwards inside it are not read again. A planned prompt is the
model's sequence: nothing else changes. A full prompt is shortened; then everything that reads the
sequence during generation sees the caller's: length limits count the caller's prompt, stopping criteria,
logits processors and ``prefix_allowed_tokens_fn`` of the caller's own get the caller's sequences (the
transformers classes that only read the last tokens or the time are passed on as they are), a streamer
first gets the caller's prompt, and the result is the caller's prompt followed by the new tokens. The
model's cache keeps the map, so a later ``generate`` or forward that continues it with the caller's
sequence is mapped too.
"""
from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
)
from transformers.generation.stopping_criteria import MaxLengthCriteria, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerationMixin

from pruneattn.patch.swap import Swapped
from pruneattn.patch.vlm.call import prepare
from pruneattn.patch.vlm.continuation import CACHES, remember
from pruneattn.patch.vlm.scope import already_read, model_terms

@dataclass(frozen=True)
class CallerTerms:
    """The caller's sequences during one ``generate``: its prompt, then what the model appends to its own."""

    prompt: torch.Tensor  # (B, L) as the caller passed it
    model_length: int  # L': the model's prompt

    @property
    def removed(self) -> int:
        return self.prompt.shape[1] - self.model_length

    def sequences(self, model_sequences: torch.Tensor) -> torch.Tensor:
        rows = model_sequences.shape[0] // self.prompt.shape[0]
        prompt = self.prompt.repeat_interleave(rows, 0).to(model_sequences.device)
        return torch.cat([prompt, model_sequences[:, self.model_length :]], dim=1)

    def row(self, batch_id: int, model_row: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.prompt[batch_id].to(model_row.device), model_row[self.model_length :]])


class CriterionOnCallerSequences(StoppingCriteria):
    """A caller's stopping criterion, given the caller's sequences."""

    def __init__(self, inner: StoppingCriteria, terms: CallerTerms) -> None:
        self.inner, self.terms = inner, terms

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.inner(self.terms.sequences(input_ids), scores, **kwargs)


class ProcessorOnCallerSequences(LogitsProcessor):
    """A caller's logits processor, given the caller's sequences."""

    def __init__(self, inner: LogitsProcessor, terms: CallerTerms) -> None:
        self.inner, self.terms = inner, terms

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.inner(self.terms.sequences(input_ids), scores)


class StreamerOfCallerPrompt(BaseStreamer):
    """Hands the caller's prompt to a streamer first (``generate`` puts its prompt first), then the new
    tokens as they come."""

    def __init__(self, inner: BaseStreamer, terms: CallerTerms) -> None:
        self.inner, self.terms, self.started = inner, terms, False

    def put(self, value: torch.Tensor) -> None:
        if not self.started:
            self.started = True
            prompt = self.terms.prompt
            value = prompt.repeat_interleave(value.shape[0] // prompt.shape[0], 0).cpu()
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()


def _stopping_criteria(criteria: StoppingCriteriaList, terms: CallerTerms) -> StoppingCriteriaList:
    out = StoppingCriteriaList()
    for c in criteria:
        if type(c) is MaxLengthCriteria:  # the same class, so it still takes the place of generate's own
            c = copy.copy(c)
            c.max_length -= terms.removed
        elif not type(c).__module__.startswith("transformers."):
            c = CriterionOnCallerSequences(c, terms)
        out.append(c)  # transformers' other criteria read the last tokens, the scores or the time
    return out


def _logits_processors(processors: LogitsProcessorList, terms: CallerTerms) -> LogitsProcessorList:
    out = LogitsProcessorList()
    for p in processors:
        if type(p) is MinLengthLogitsProcessor:
            p = copy.copy(p)
            p.min_length -= terms.removed
        elif type(p) is MinNewTokensLengthLogitsProcessor:
            p = copy.copy(p)
            p.prompt_length_to_skip -= terms.removed
        elif not type(p).__module__.startswith("transformers."):
            p = ProcessorOnCallerSequences(p, terms)
        out.append(p)  # transformers' other processors read the scores or the tokens, not their places
    return out


def _lengths(model: object, kwargs: dict, removed: int) -> None:
    """``max_length`` / ``min_length`` that the caller or a generation config sets count the caller's
    prompt: move them back by the removed placeholders. Limits counted in new tokens (``max_new_tokens``,
    ``min_new_tokens``, the default of 20 new tokens) stay as they are."""
    configs = [c for c in (kwargs.get("generation_config"), model.generation_config) if c is not None]

    def setting(name: str) -> int | None:
        if kwargs.get(name) is not None:
            return kwargs[name]
        return next((getattr(c, name) for c in configs if getattr(c, name, None) is not None), None)

    if setting("max_new_tokens") is None and setting("max_length") is not None:
        kwargs["max_length"] = max(1, setting("max_length") - removed)
    if setting("min_new_tokens") is None and setting("min_length"):
        kwargs["min_length"] = max(0, setting("min_length") - removed)


def _in_caller_terms(model: object, kwargs: dict, terms: CallerTerms) -> dict:
    """``generate``'s arguments with everything that reads the sequence given the caller's."""
    kwargs = dict(kwargs)
    _lengths(model, kwargs, terms.removed)
    if kwargs.get("stopping_criteria") is not None:
        kwargs["stopping_criteria"] = _stopping_criteria(kwargs["stopping_criteria"], terms)
    if kwargs.get("logits_processor") is not None:
        kwargs["logits_processor"] = _logits_processors(kwargs["logits_processor"], terms)
    if kwargs.get("streamer") is not None:
        kwargs["streamer"] = StreamerOfCallerPrompt(kwargs["streamer"], terms)
    allowed = kwargs.get("prefix_allowed_tokens_fn")
    if allowed is not None:
        kwargs["prefix_allowed_tokens_fn"] = lambda batch_id, row: allowed(batch_id, terms.row(batch_id, row))
    return kwargs


@functools.cache
def _positional() -> tuple[str, ...]:
    """The names of ``generate``'s positional parameters after ``inputs``."""
    params = inspect.signature(GenerationMixin.generate).parameters.values()
    return tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)[2:]


def _by_name(args: tuple, kwargs: dict) -> dict:
    """``generate``'s positional arguments after ``inputs``, by name."""
    return {**dict(zip(_positional(), args)), **kwargs}


class PrunedGeneration(Swapped):
    """Swapped into a patched vision-language generation model (see the module docstring)."""

    keeps_name = True  # transformers writes the class name into saved configs

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        base = self._pruneattn_base
        if already_read(base):  # e.g. this model drafting for itself inside its own generate
            return super().generate(inputs, *args, **kwargs)
        call = _by_name(args, kwargs)
        if inputs is not None:
            call["input_ids"] = inputs
        prepared = prepare(base._pruneattn_vlm, base, call)
        if prepared is None:
            with model_terms(base):
                return super().generate(inputs, *args, **kwargs)
        run = dict(prepared.call)
        name = "input_ids" if call.get("input_ids") is not None else "inputs_embeds"
        caller, model = call.get(name), run.get(name)
        terms = None
        if prepared.view is not None and caller is not None and caller.shape[1] != model.shape[1]:
            if name == "input_ids":
                terms = CallerTerms(caller, model.shape[1])
                run = _in_caller_terms(self, run, terms)
            else:  # from embeddings generate returns the new tokens only: only the length limits count the prompt
                _lengths(self, run, caller.shape[1] - model.shape[1])
        with model_terms(base):
            out = super().generate(**run)
        if prepared.view is not None:
            for cache in [call.get(n) for n in CACHES] + [getattr(out, "cache", None)]:
                remember(cache, prepared.view)
        if terms is None:
            return out
        if isinstance(out, torch.Tensor):
            return terms.sequences(out)
        out.sequences = terms.sequences(out.sequences)
        return out
