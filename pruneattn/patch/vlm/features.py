"""``get_image_features`` of a patched model whose tower keeps merged units (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Qwen3.5, GLM-4.xV): the tower's output holds each image's kept units only, so it is split per image by
each image's kept count (the model's own method splits by each image's full count); so are its DeepStack
features (Qwen3-VL). ``get_video_features`` is refused: the patched tower would prune the frames, which
the model's video prompts do not expect. Everything else is the model's.
"""
from __future__ import annotations

import torch
from transformers.utils.generic import can_return_tuple

from pruneattn.patch.swap import Swapped
from pruneattn.patch.vlm.checks import videos_refused

try:  # transformers: how the model's own method takes modality-prefixed arguments
    from transformers.utils.generic import accepts_precomputed_kwargs
except ImportError:  # pragma: no cover - older transformers: arguments as given

    def accepts_precomputed_kwargs(modality: str):
        return lambda f: f


def split_per_image(output: object, grid: torch.Tensor, unit: int) -> object:
    """``output``'s per-unit rows (``pooler_output``, DeepStack features) split into one tensor per image:
    each image's kept units (``kept_units``), or all of its units where no pruning block ran."""
    kept = output.get("kept_units")
    if kept is None:
        counts = (grid.prod(-1) // unit).tolist()
    else:
        counts = (kept >= 0).sum(dim=1).tolist()
    output.pooler_output = torch.split(output.pooler_output, counts)
    if output.get("deepstack_features") is not None:
        output.deepstack_features = [torch.split(f, counts) for f in output.deepstack_features]
    return output


class SplitsKeptUnits(Swapped):
    """Swapped into the base model of a patched vision-language model whose tower keeps merged units."""

    keeps_name = True

    @accepts_precomputed_kwargs(modality="image")
    @can_return_tuple  # return_dict from the call, else the config's, as the model's own method
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **kwargs):
        plan = self._pruneattn_vlm
        tower = getattr(self, plan.entry.tower)
        output = tower(pixel_values.type(tower.dtype), grid_thw=image_grid_thw, return_dict=True, **kwargs)
        return split_per_image(output, image_grid_thw, plan.unit)

    def get_video_features(self, *args, **kwargs):
        raise videos_refused(self._pruneattn_vlm)
