"""Hugging Face processors built offline for the tiny vision-language models of the tests: a ``tokenizers``
WordLevel tokenizer whose ids are the test models' (words ``w3`` .. ``w98`` are ids 3 .. 98), with the image
tokens of LLaVA / PaliGemma (``<image>``, 99) and Qwen (``<|image_pad|>``, 90, between ``<|vision_start|>``
91 and ``<|vision_end|>`` 92), and the image processors of those models at the test towers' sizes."""
from __future__ import annotations

import numpy as np

SPECIAL = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|image_pad|>": 90, "<|vision_start|>": 91, "<|vision_end|>": 92,
           "<|video_pad|>": 93, "<image>": 99}
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL)
    vocab.update({f"w{i}": i for i in range(3, 99) if i not in SPECIAL.values()})
    words = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="w3",
        additional_special_tokens=[t for t in SPECIAL if t not in ("<pad>", "<s>", "</s>")],
    )
    tok.padding_side = "left"
    return tok


def llava_processor(strategy: str = "default", class_token: bool = True):
    """For the test LLaVA: 32 x 32 px images, 8 px patches (16 patches), CLIP's class token."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=8,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=int(class_token))


def paligemma_processor():
    """For the test PaliGemma: 32 x 32 px images, 16 patches."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    images = SiglipImageProcessor(size={"height": 32, "width": 32})
    images.image_seq_length = 16
    return PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer())


def qwen_processor(kind: str = "qwen2.5-vl"):
    """For the test Qwen2-VL / Qwen2.5-VL: 4 px patches, 2 x 2 merged units, images of any size."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    images = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8,
                                   max_pixels=64 * 64)
    videos = Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    cls = Qwen2_5_VLProcessor if kind == "qwen2.5-vl" else Qwen2VLProcessor
    return cls(image_processor=images, tokenizer=tokenizer(), video_processor=videos)


def images(*sizes: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """RGB images (height, width, 3) uint8 of these sizes."""
    g = np.random.default_rng(seed)
    return [g.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


KINDS = ("llava", "paligemma", "qwen2.5-vl", "qwen2-vl")


def case(kind: str, seed: int = 0):
    """(model, processor, texts, images) of one tiny family: two prompts of different lengths holding one
    and two images (LLaVA, Qwen) or one each (PaliGemma), images of different sizes."""
    import test_vlm
    import test_vlm_qwen

    if kind == "llava":
        return (test_vlm.llava(seed=seed), llava_processor(), ["w5 <image> w6", "w7 w8 <image> w9 <image> w10"],
                images((40, 48), (32, 32), (50, 30)))
    if kind == "paligemma":
        return test_vlm.paligemma(seed=seed), paligemma_processor(), ["<image> w5 w6 w8", "<image> w7"], images((32, 32), (40, 30))
    texts = ["w5 " + QWEN_IMAGE + " w6", "w7 " + QWEN_IMAGE + " w8 " + QWEN_IMAGE]
    return test_vlm_qwen._model(kind, seed=seed), qwen_processor(kind), texts, images((32, 48), (16, 16), (24, 16))


def inputs(processor, texts, pictures) -> dict:
    """The processor's outputs as a model takes them (float64 pixels for the float64 Qwen models; no labels)."""
    out = dict(processor(text=texts, images=pictures, return_tensors="pt", padding=True))
    out.pop("labels", None)
    if out["pixel_values"].dim() == 2:  # Qwen's patches: the test models run in float64
        out["pixel_values"] = out["pixel_values"].double()
    return out


def image_token(kind: str) -> int:
    return 99 if kind in ("llava", "paligemma") else 90
