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
# The image tokens of InternVL, Gemma 3, Mistral 3 and Idefics3 / SmolVLM (ids 72 .. 89): added tokens, special
# only where a processor reads them by name (so that LLaVA's decoded text keeps them as any word).
ADDED = {"<IMG_CONTEXT>": 80, "<img>": 81, "</img>": 82, "<start_of_image>": 83, "<end_of_image>": 84,
         "<image_soft_token>": 85, "[IMG]": 86, "[IMG_BREAK]": 87, "[IMG_END]": 88, "<fake_token_around_image>": 89,
         "<global-img>": 79, "<end_of_utterance>": 72, "<video>": 74, "<row_1_col_1>": 75, "<row_1_col_2>": 76,
         "<row_2_col_1>": 77, "<row_2_col_2>": 78}
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
GLM_IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"


def tokenizer(**named: str):
    """The test tokenizer; ``named``: tokens a processor reads as named attributes (``boi_token="<start_of_image>"``
    gives ``tokenizer.boi_token`` and ``tokenizer.boi_token_id``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {**SPECIAL, **ADDED}
    vocab.update({f"w{i}": i for i in range(3, 99) if i not in vocab.values()})
    words = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="w3",
        extra_special_tokens=named,
    )
    tok.add_tokens([t for t in SPECIAL if t not in ("<pad>", "<s>", "</s>")], special_tokens=True)
    tok.add_tokens([t for t in ADDED if t not in named.values()])
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


def internvl_processor():
    """For the test InternVL: 32 x 32 px tiles (up to 4, and a thumbnail), 4 px patches, 16 tokens per tile."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    images = GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                   max_patches=4)
    words = tokenizer(context_image_token="<IMG_CONTEXT>", start_image_token="<img>", end_image_token="</img>",
                      video_token="<video>")
    return InternVLProcessor(image_processor=images, tokenizer=words, video_processor=InternVLVideoProcessor(),
                             image_seq_length=16)


def gemma3_processor():
    """For the test Gemma 3: 64 x 64 px images, 4 px patches, 16 tokens of 4 x 4 patches per image."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    images = Gemma3ImageProcessor(size={"height": 64, "width": 64})
    words = tokenizer(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
    return Gemma3Processor(image_processor=images, tokenizer=words, image_seq_length=16)


def mistral3_processor():
    """For the test Mistral 3: images of any size up to 32 px, 4 px patches, 2 x 2 merged units."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    images = PixtralImageProcessor(size={"longest_edge": 32}, patch_size=4)
    return PixtralProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=4, spatial_merge_size=2)


def tiles_processor(kind: str):
    """For the test SmolVLM / Idefics3: 32 x 32 px tiles of images up to 64 px (and the whole image), 4 px
    patches, 16 tokens per tile (2 x 2 pixel shuffle)."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm import processing_smolvlm

    sizes = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    if kind == "idefics3":
        return Idefics3Processor(image_processor=Idefics3ImageProcessor(**sizes), tokenizer=tokenizer(), image_seq_len=16)
    from transformers import SmolVLMVideoProcessor

    if processing_smolvlm.num2words is None:  # only its video prompts spell numbers out; none here
        processing_smolvlm.num2words = str
    return SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**sizes), tokenizer=tokenizer(),
                            video_processor=SmolVLMVideoProcessor(), image_seq_len=16)


def images(*sizes: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """RGB images (height, width, 3) uint8 of these sizes."""
    g = np.random.default_rng(seed)
    return [g.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


KINDS_MROPE = ("qwen2.5-vl", "qwen2-vl")
NEW_MROPE = ("qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe", "glm4.1v", "glm4.5v", "glm4.6v")
KINDS = ("llava", "paligemma", *KINDS_MROPE, *NEW_MROPE, "internvl", "gemma3", "mistral3", "smolvlm", "idefics3")
_UNIT_TEXTS = {"internvl": "<IMG_CONTEXT>", "gemma3": "<start_of_image>", "mistral3": "[IMG]", "smolvlm": "<image>",
               "idefics3": "<image>"}


def mrope(kind: str) -> bool:
    """Whether the family gives its tokens (t, h, w) position ids."""
    return kind in KINDS_MROPE or kind in NEW_MROPE


def case(kind: str, seed: int = 0):
    """(model, processor, texts, images) of one tiny family: two prompts of different lengths holding one
    and two images (LLaVA, Qwen, GLM, and the families whose connector joins windows) or one each (PaliGemma),
    images of different sizes (InternVL: 3, 1 and 3 tiles; SmolVLM / Idefics3: 5, 1 and 3)."""
    import test_vlm
    import test_vlm_qwen
    import test_vlm_qwen3_glm
    import vlm_unit_models

    if kind in _UNIT_TEXTS:
        image = _UNIT_TEXTS[kind]
        processor = {"internvl": internvl_processor, "gemma3": gemma3_processor, "mistral3": mistral3_processor}.get(
            kind, lambda: tiles_processor(kind))()
        pictures = images((40, 64), (32, 32), (20, 30))
        if kind in ("gemma3", "smolvlm", "idefics3"):  # their processors take each prompt's images as a list
            pictures = [pictures[:1], pictures[1:]]
        return (vlm_unit_models.build(kind, seed), processor, [f"w5 {image} w6", f"w7 w8 {image} w9 {image} w10"],
                pictures)
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
    import vlm_unit_models

    if kind in vlm_unit_models.IMAGE_TOKEN:
        return vlm_unit_models.IMAGE_TOKEN[kind]
    return 99 if not mrope(kind) else 100 if kind.startswith("glm") else 90
