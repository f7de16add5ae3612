"""Hugging Face processors built offline for the tiny vision-language models of the tests: a ``tokenizers``
WordLevel tokenizer whose ids are the test models' (words ``w3`` .. ``w98`` are ids 3 .. 98), with the image
tokens of LLaVA / PaliGemma (``<image>``, 99), Qwen (``<|image_pad|>``, 90, between ``<|vision_start|>``
91 and ``<|vision_end|>`` 92) and GLM (``<|image|>``, 100, between ``<|begin_of_image|>`` 101 and
``<|end_of_image|>`` 102), and the image processors of those models at the test towers' sizes."""
from __future__ import annotations

import numpy as np

SPECIAL = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|image_pad|>": 90, "<|vision_start|>": 91, "<|vision_end|>": 92,
           "<|video_pad|>": 93, "<image>": 99, "<|image|>": 100, "<|begin_of_image|>": 101, "<|end_of_image|>": 102,
           "<|video|>": 103, "<|begin_of_video|>": 104, "<|end_of_video|>": 105}
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
GLM_IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"


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
    """For the test Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5: 4 px patches, 2 x 2 merged units, images of
    any size."""
    import transformers
    from transformers import Qwen2VLImageProcessor

    images = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8,
                                   max_pixels=64 * 64)
    name = {"qwen2.5-vl": "Qwen2_5_VL", "qwen2-vl": "Qwen2VL"}.get(kind, "Qwen3VL")  # Qwen3.5 takes Qwen3-VL's
    videos = getattr(transformers, f"{'Qwen2VL' if name == 'Qwen2_5_VL' else name}VideoProcessor")(
        patch_size=4, merge_size=2, temporal_patch_size=2)
    return getattr(transformers, f"{name}Processor")(image_processor=images, tokenizer=tokenizer(), video_processor=videos)


def glm_processor(kind: str = "glm4.1v"):
    """For the test GLM-4.1V / 4.5V / 4.6V: 4 px patches, 2 x 2 merged units, images of any size."""
    import transformers

    name = "Glm46V" if kind == "glm4.6v" else "Glm4v"
    size = {"shortest_edge": 8 * 8, "longest_edge": 64 * 64}
    images = getattr(transformers, f"{name}ImageProcessor")(patch_size=4, merge_size=2, temporal_patch_size=2, size=size)
    videos = getattr(transformers, f"{name}VideoProcessor")(patch_size=4, merge_size=2, temporal_patch_size=2)
    return getattr(transformers, f"{name}Processor")(image_processor=images, tokenizer=tokenizer(), video_processor=videos)


def images(*sizes: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """RGB images (height, width, 3) uint8 of these sizes."""
    g = np.random.default_rng(seed)
    return [g.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


NEW_MROPE = ("qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe", "glm4.1v", "glm4.5v", "glm4.6v")
KINDS = ("llava", "paligemma", "qwen2.5-vl", "qwen2-vl", *NEW_MROPE)


def mrope(kind: str) -> bool:
    """Whether the family gives its tokens (t, h, w) position ids."""
    return kind not in ("llava", "paligemma")


def case(kind: str, seed: int = 0):
    """(model, processor, texts, images) of one tiny family: two prompts of different lengths holding one
    and two images (LLaVA, Qwen, GLM) or one each (PaliGemma), images of different sizes."""
    import test_vlm
    import test_vlm_qwen
    import test_vlm_qwen3_glm

    if kind == "llava":
        return (test_vlm.llava(seed=seed), llava_processor(), ["w5 <image> w6", "w7 w8 <image> w9 <image> w10"],
                images((40, 48), (32, 32), (50, 30)))
    if kind == "paligemma":
        return test_vlm.paligemma(seed=seed), paligemma_processor(), ["<image> w5 w6 w8", "<image> w7"], images((32, 32), (40, 30))
    image = GLM_IMAGE if kind.startswith("glm") else QWEN_IMAGE
    texts = ["w5 " + image + " w6", "w7 " + image + " w8 " + image]
    if kind in NEW_MROPE:
        model = test_vlm_qwen3_glm.model(kind, seed=seed)
        processor = glm_processor(kind) if kind.startswith("glm") else qwen_processor(kind)
    else:
        model, processor = test_vlm_qwen._model(kind, seed=seed), qwen_processor(kind)
    return model, processor, texts, images((32, 48), (16, 16), (24, 16))


def inputs(processor, texts, pictures) -> dict:
    """The processor's outputs as a model takes them (float64 pixels for the float64 Qwen models; no labels)."""
    out = dict(processor(text=texts, images=pictures, return_tensors="pt", padding=True))
    out.pop("labels", None)
    if out["pixel_values"].dim() == 2:  # Qwen's patches: the test models run in float64
        out["pixel_values"] = out["pixel_values"].double()
    return out


def image_token(kind: str) -> int:
    return 99 if not mrope(kind) else 100 if kind.startswith("glm") else 90
