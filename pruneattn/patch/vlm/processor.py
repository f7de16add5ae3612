"""``pruneattn.patch_processor``: a Hugging Face processor that writes the planned prompt.

How many tokens an image keeps depends only on its size and the patch's settings
(:class:`~pruneattn.patch.vlm.tokens.ImageTokens`), so the processor can insert exactly that many
placeholders, as serving engines plan multimodal tokens before they schedule a request. The patched
model then reads the prompt as it is: the caller's sequence and the model's are the same, so whatever
reads the sequence (``generate``, streamers, stopping criteria, caches, a caller's own decoding loop,
assisted decoding, pipelines) works as for any model. Which units are kept is still decided in the tower.

The processor's class is swapped (as the model's blocks are) for one whose ``replace_image_token`` (the
text each image's placeholder becomes) and ``_get_num_multimodal_tokens`` (the counts a serving engine
asks for) give the kept count; ``pruneattn.unpatch(processor)`` restores it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pruneattn.patch.swap import Swapped, original_class, swap
from pruneattn.patch.vlm.tokens import ImageTokens, VisionLanguagePlan


@dataclass(frozen=True)
class ProcessorPlan:
    """What a patched processor writes per image (frozen, on the processor)."""

    tokens: ImageTokens
    image_token: str
    model: str  # the model's class, for messages

    def text(self, full_text: str) -> str:
        """The planned text of one image whose unpatched text is ``full_text``."""
        count = full_text.count(self.image_token)
        if full_text != self.image_token * count:
            raise ValueError(
                f"pruneattn: this processor writes other tokens than {self.image_token!r} for an image; "
                "pruneattn plans images written as a run of placeholders only"
            )
        return self.image_token * self.tokens.planned(count)


class PlansImageTokens(Swapped):
    """Swapped into a processor patched by :func:`patch_processor`."""

    keeps_name = True  # transformers saves the processor's class name with it

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self._pruneattn_tokens.text(super().replace_image_token(image_inputs, image_idx, **kwargs))

    def _get_num_multimodal_tokens(self, *args, **kwargs):
        data = super()._get_num_multimodal_tokens(*args, **kwargs)
        counts = getattr(data, "num_image_tokens", None)
        if counts is not None:
            data.num_image_tokens = [self._pruneattn_tokens.tokens.planned(n) for n in counts]
        return data


def model_plan(model: nn.Module) -> VisionLanguagePlan:
    """The frozen settings of a patched vision-language ``model`` (TypeError where it is not one)."""
    found = [m.__dict__["_pruneattn_vlm"] for m in model.modules() if "_pruneattn_vlm" in m.__dict__]
    if not found:
        raise TypeError(
            f"pruneattn: this {type(model).__name__} is not a vision-language model patched by pruneattn.patch; "
            "patch the model first, then its processor"
        )
    return found[0]


def _check_agrees(processor: object, plan: VisionLanguagePlan, model: nn.Module) -> None:
    """Refuse a processor whose prompts the model would not read: another image token, or another count of
    placeholders per image than the model's tower yields."""
    tokenizer = getattr(processor, "tokenizer", None)
    token = getattr(processor, "image_token", None)
    if token is None or tokenizer is None:
        raise TypeError(f"pruneattn.patch_processor: this {type(processor).__name__} has no image token to plan")
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id != plan.image_token_id:
        raise ValueError(
            f"pruneattn.patch_processor: the processor's image token {token!r} is id {token_id}, the model's image "
            f"token id is {plan.image_token_id}: they belong to different models"
        )
    if plan.entry.grid is not None:  # images of any size: the image processor must merge as the tower does
        merge = getattr(getattr(processor, "image_processor", None), "merge_size", None)
        if merge is not None and merge * merge != plan.unit:
            raise ValueError(
                f"pruneattn.patch_processor: the image processor merges {merge} x {merge} patches, the model's "
                f"tower {int(plan.unit ** 0.5)} x {int(plan.unit ** 0.5)}: they belong to different models"
            )
        return
    size = [[plan.image_size, plan.image_size]]
    try:
        full = original_class(processor)._get_num_multimodal_tokens(processor, image_sizes=size)["num_image_tokens"][0]
    except (AttributeError, KeyError, TypeError):
        return  # the processor cannot say; the model checks every prompt it gets
    patches = (plan.image_size // plan.patch_size) ** 2
    if full != plan.tokens.full(patches):
        raise ValueError(
            f"pruneattn.patch_processor: the processor writes {full} image tokens per image where this "
            f"{type(model).__name__}'s tower yields {plan.tokens.full(patches)} (check the processor's patch_size, "
            "vision_feature_select_strategy and num_additional_image_tokens against the model's config)"
        )


def patch_processor(processor: object, model: nn.Module) -> object:
    """Make ``processor`` insert, per image, the image tokens the patched ``model``'s language model reads
    (see the module docstring), in place; raises before any change where they would not agree."""
    if not hasattr(processor, "replace_image_token"):
        raise TypeError(
            f"pruneattn.patch_processor expects a Hugging Face multimodal processor (with replace_image_token), "
            f"got {type(processor).__name__}"
        )
    plan = model_plan(model)
    _check_agrees(processor, plan, model)
    swap(processor, PlansImageTokens)  # a patched processor is patched again from its original class
    processor._pruneattn_tokens = ProcessorPlan(plan.tokens, processor.image_token, type(model).__name__)
    return processor
